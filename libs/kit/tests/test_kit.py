"""The service kit, exercised through a real gRPC server on an ephemeral port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from marie_kit.apikeys import display_form, generate_key, is_well_formed, key_digest
from marie_kit.channels import insecure_channel, is_serving
from marie_kit.context import request_id_var
from marie_kit.errors import ServiceError
from marie_kit.server import RunningServer, start_server
from marie_kit.settings import ServiceSettings, load_settings
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from tests.stack import free_ports

SERVICE = "test.v1.Probe"


def _identity(b: bytes) -> bytes:
    return b


class ProbeComponent:
    """A tiny service: methods that echo the request id, fail, or stream then fail."""

    service_names: Sequence[str] = (SERVICE,)
    domain = "marie.test"

    def __init__(self, name: str = "probe") -> None:
        self.name = name
        self.release = asyncio.Event()
        self.release.set()
        self.closed = False
        self.stopping_called = False

    def register(self, server: grpc.aio.Server) -> None:
        async def echo_id(request: bytes, context: Any) -> bytes:
            return request_id_var.get().encode()

        async def who(request: bytes, context: Any) -> bytes:
            return self.name.encode()

        async def peer(request: bytes, context: Any) -> bytes:
            return str(context.peer()).encode()

        async def fail_known(request: bytes, context: Any) -> bytes:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                "THING_NOT_FOUND",
                "no thing named x",
                domain=self.domain,
                metadata={"name": "x"},
            )

        async def fail_unknown(request: bytes, context: Any) -> bytes:
            raise RuntimeError("secret internals /etc/passwd")

        async def fail_echoing(request: bytes, context: Any) -> bytes:
            # What services do with an id they cannot find: name it back.
            name = request.decode()
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                "THING_NOT_FOUND",
                f"no thing named {name!r}",
                domain=self.domain,
                metadata={"name": name, **{f"extra_{i}": name for i in range(20)}},
            )

        async def stream_then_fail(request: bytes, context: Any) -> AsyncIterator[bytes]:
            yield b"one"
            yield b"two"
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR", "upstream broke")

        async def slow_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            for part in (b"a", b"b", b"c"):
                await asyncio.sleep(0.2)
                yield part

        handlers = {
            "SlowStream": grpc.unary_stream_rpc_method_handler(slow_stream, _identity, _identity),
            "EchoId": grpc.unary_unary_rpc_method_handler(echo_id, _identity, _identity),
            "Who": grpc.unary_unary_rpc_method_handler(who, _identity, _identity),
            "Peer": grpc.unary_unary_rpc_method_handler(peer, _identity, _identity),
            "FailKnown": grpc.unary_unary_rpc_method_handler(fail_known, _identity, _identity),
            "FailUnknown": grpc.unary_unary_rpc_method_handler(fail_unknown, _identity, _identity),
            "FailEchoing": grpc.unary_unary_rpc_method_handler(fail_echoing, _identity, _identity),
            "StreamThenFail": grpc.unary_stream_rpc_method_handler(
                stream_then_fail, _identity, _identity
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def start(self) -> None:
        await self.release.wait()

    async def stopping(self) -> None:
        self.stopping_called = True

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
async def probe() -> AsyncIterator[tuple[RunningServer, ProbeComponent]]:
    component = ProbeComponent()
    running = await start_server([component])
    yield running, component
    await running.stop(0)


def _unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}", _identity, _identity)


async def test_request_id_from_metadata_reaches_the_handler(
    probe: tuple[RunningServer, ProbeComponent],
) -> None:
    running, _ = probe
    async with insecure_channel(running.target) as channel:
        reply = await _unary(channel, "EchoId")(b"", metadata=(("x-request-id", "abc-123"),))
    assert reply == b"abc-123"


async def test_request_id_is_created_when_absent(
    probe: tuple[RunningServer, ProbeComponent],
) -> None:
    running, _ = probe
    async with insecure_channel(running.target) as channel:
        first = await _unary(channel, "EchoId")(b"")
        second = await _unary(channel, "EchoId")(b"")
    assert len(first) == 24 and first != second


async def test_service_error_arrives_with_code_reason_and_metadata(
    probe: tuple[RunningServer, ProbeComponent],
) -> None:
    running, _ = probe
    async with insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _unary(channel, "FailKnown")(b"")
    error = ServiceError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert (error.reason, error.domain, error.metadata) == (
        "THING_NOT_FOUND",
        "marie.test",
        {"name": "x"},
    )
    assert error.message == "no thing named x"


@pytest.mark.parametrize("name", ["a" * 5000, "\U0001f600" * 3000])
async def test_an_error_echoing_a_long_value_keeps_its_code(
    probe: tuple[RunningServer, ProbeComponent], name: str
) -> None:
    # Echoed whole, the value overflows the client's metadata limit (8 KiB)
    # and the call fails as RESOURCE_EXHAUSTED: a fake rate limit.
    running, _ = probe
    async with insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _unary(channel, "FailEchoing")(name.encode())
    error = ServiceError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "THING_NOT_FOUND"
    assert error.message.startswith("no thing named '" + name[:10])
    assert error.message.endswith("…") and len(error.message.encode()) <= 512
    assert error.metadata["name"].startswith(name[:10])
    assert len(error.metadata["name"].encode()) <= 256
    assert len(error.metadata) <= 8


async def test_unhandled_exception_is_internal_without_internals(
    probe: tuple[RunningServer, ProbeComponent],
) -> None:
    running, _ = probe
    async with insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _unary(channel, "FailUnknown")(b"", metadata=(("x-request-id", "rid-7"),))
    error = ServiceError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "INTERNAL"
    assert "passwd" not in error.message and "Traceback" not in error.message
    assert "rid-7" in error.message


async def test_stream_error_after_items_keeps_the_items(
    probe: tuple[RunningServer, ProbeComponent],
) -> None:
    running, _ = probe
    received = []
    async with insecure_channel(running.target) as channel:
        call = channel.unary_stream(f"/{SERVICE}/StreamThenFail", _identity, _identity)(b"")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for item in call:
                received.append(item)
    assert received == [b"one", b"two"]
    assert ServiceError.from_rpc_error(caught.value).reason == "UPSTREAM_ERROR"


async def test_health_is_not_serving_until_components_started() -> None:
    component = ProbeComponent()
    component.release.clear()
    (port,) = free_ports(1)
    starting = asyncio.create_task(start_server([component], port=port))
    async with insecure_channel(f"127.0.0.1:{port}") as channel:
        # The server answers health checks while the component is still starting.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                break
            except grpc.aio.AioRpcError:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        component.release.set()
        running = await starting
        assert await is_serving(channel, SERVICE)
        await running.health.enter_graceful_shutdown()
        assert not await is_serving(channel, SERVICE)
    await running.stop(0)
    assert component.stopping_called and component.closed


async def test_reflection_lists_the_services(probe: tuple[RunningServer, ProbeComponent]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: PLC0415

    running, _ = probe
    async with insecure_channel(running.target) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(cast(Any, channel))
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_health_check_answers_for_the_whole_server(
    probe: tuple[RunningServer, ProbeComponent],
) -> None:
    running, _ = probe
    async with insecure_channel(running.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIE_PROBE_", extra="ignore", frozen=True)


def test_bad_setting_exits_with_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MARIE_PROBE_PORT", "not-a-port")
    with pytest.raises(SystemExit) as caught:
        load_settings(_Settings)
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("invalid settings: MARIE_PROBE_PORT:") and "not-a-port" in err


class _SecretSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIE_PROBE_", extra="ignore", frozen=True)
    pepper: SecretStr | None = Field(default=None, min_length=8)


def test_bad_secret_setting_is_reported_without_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MARIE_PROBE_PEPPER", "hunter2")
    with pytest.raises(SystemExit):
        load_settings(_SecretSettings)
    err = capsys.readouterr().err
    assert "MARIE_PROBE_PEPPER" in err and "hunter2" not in err


def test_generated_keys_are_well_formed_and_checksummed() -> None:
    key = generate_key()
    assert is_well_formed(key)
    assert key != generate_key()
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert not is_well_formed(flipped)
    assert not is_well_formed(key[:-1])
    assert display_form(key) == f"mk-…{key[-4:]}"


def test_key_digest_uses_the_pepper() -> None:
    key = generate_key()
    assert key_digest(key) != key_digest(key, b"pepper")
    assert key not in key_digest(key)


async def test_port_in_use_is_a_clear_os_error() -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await start_server([ProbeComponent()], port=port)


async def test_shutdown_lets_in_flight_streams_finish_within_the_grace_period() -> None:
    running = await start_server([ProbeComponent()])
    async with insecure_channel(running.target) as channel:
        call = channel.unary_stream(f"/{SERVICE}/SlowStream", _identity, _identity)(b"")
        first = await call.read()
        stopping = asyncio.create_task(running.stop(5))
        rest = [await call.read(), await call.read()]
        assert await call.read() is grpc.aio.EOF
        await stopping
    assert [first, *rest] == [b"a", b"b", b"c"]
    assert await call.code() == grpc.StatusCode.OK


async def test_shutdown_takes_new_calls_during_the_drain_delay_while_not_serving() -> None:
    """A load balancer that polls health needs time to see NOT_SERVING: until
    the drain delay is over, a new call is answered rather than refused."""
    running = await start_server([ProbeComponent()])
    async with insecure_channel(running.target) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.stop(1, drain_delay=60))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _unary(channel, "Peer")(b"")
        stopping.cancel()
        await running.stop(0)
        with pytest.raises(grpc.aio.AioRpcError):
            await _unary(channel, "Peer")(b"", timeout=2)


async def test_shutdown_cancels_streams_still_running_after_the_grace_period() -> None:
    running = await start_server([ProbeComponent()])
    async with insecure_channel(running.target) as channel:
        call = channel.unary_stream(f"/{SERVICE}/SlowStream", _identity, _identity)(b"")
        await call.read()
        await running.stop(0.1)
        with pytest.raises(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass


async def test_connections_are_renewed_after_their_max_age_and_streams_outlive_it() -> None:
    """A client connection older than the server's max age is replaced (new
    calls arrive from a new client port; a DNS client resolves again), while
    a stream running across the age finishes whole on the old one."""
    running = await start_server([ProbeComponent()], max_connection_age=0.3)
    try:
        async with insecure_channel(running.target) as channel:
            first = await _unary(channel, "Peer")(b"")
            stream = channel.unary_stream(f"/{SERVICE}/SlowStream", _identity, _identity)(b"")
            parts = [part async for part in stream]  # 0.6 s, across the age
            assert parts == [b"a", b"b", b"c"]
            assert await stream.code() == grpc.StatusCode.OK
            later = await _unary(channel, "Peer")(b"")
        assert first != later
    finally:
        await running.stop(0)


async def test_connections_live_on_without_a_max_age() -> None:
    running = await start_server([ProbeComponent()])
    try:
        async with insecure_channel(running.target) as channel:
            first = await _unary(channel, "Peer")(b"")
            await asyncio.sleep(0.6)
            assert await _unary(channel, "Peer")(b"") == first
    finally:
        await running.stop(0)


async def test_channels_spread_calls_over_every_resolved_replica() -> None:
    first = await start_server([ProbeComponent("one")])
    second = await start_server([ProbeComponent("two")])
    try:
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        async with insecure_channel(target) as channel:
            answers = {await _unary(channel, "Who")(b"") for _ in range(10)}
    finally:
        await first.stop(0)
        await second.stop(0)
    assert answers == {b"one", b"two"}


async def _reflect(channel: grpc.aio.Channel, service: str, request: Any) -> Any:
    from grpc_reflection.v1alpha import reflection_pb2  # noqa: PLC0415

    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    async for reply in call(iter([request])):
        return reply
    raise AssertionError("no reply")


@pytest.mark.parametrize(
    "service", ["grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"]
)
async def test_reflection_finds_the_file_of_a_method(
    probe: tuple[RunningServer, ProbeComponent], service: str
) -> None:
    """`grpcurl describe pkg.Service.Method` asks for a method symbol."""
    from google.protobuf import descriptor_pb2  # noqa: PLC0415
    from grpc_reflection.v1alpha import reflection_pb2  # noqa: PLC0415
    from marie.providers.v1 import provider_service_pb2  # noqa: F401, PLC0415

    running, _ = probe
    async with insecure_channel(running.target) as channel:
        reply = await _reflect(
            channel,
            service,
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="marie.providers.v1.ProviderService.ListModels"
            ),
        )
        missing = await _reflect(
            channel,
            service,
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="marie.providers.v1.ProviderService.NoSuchMethod"
            ),
        )
        listed = await _reflect(
            channel, service, reflection_pb2.ServerReflectionRequest(list_services="")
        )
    assert not reply.HasField("error_response")
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    assert "marie/providers/v1/provider_service.proto" in [f.name for f in files]
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
