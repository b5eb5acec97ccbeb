"""Helpers for the providers service's tests: running servers, reading errors, dead URLs."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel
from marie_kit.errors import ServiceError
from marie_kit.server import RunningServer, start_server
from marie_providers.config import MarieConfig
from marie_providers.ollama.client import OllamaProvider
from marie_providers.service import ProviderFactory, ProvidersComponent
from marie_providers.settings import ProvidersSettings
from marie_providers.upstream.provider import Provider

from tests.stack import free_ports

STOP_GRACE_SECONDS = 0.5


@dataclass
class Service:
    """A running providers server and a client stub connected to it."""

    server: RunningServer
    stub: pb_grpc.ProviderServiceAsyncStub


@asynccontextmanager
async def running_service(
    settings: ProvidersSettings,
    providers: ProviderFactory | None = None,
    config: MarieConfig | None = None,
) -> AsyncIterator[Service]:
    """A real gRPC server on an ephemeral port, stopped (and its clients closed)
    on exit. Settings that name no data directory get a fresh one, so that no
    test reads another's (or an earlier run's) cached answers."""
    with tempfile.TemporaryDirectory(prefix="marie-providers-") as scratch:
        if "data_dir" not in settings.model_fields_set:
            settings = settings.model_copy(update={"data_dir": Path(scratch)})
        component = ProvidersComponent(settings, providers=providers, config=config)
        server = await start_server([component])
        try:
            async with insecure_channel(server.target) as channel:
                yield Service(server, pb_grpc.ProviderServiceStub(channel))
        finally:
            await server.stop(STOP_GRACE_SECONDS)


def ollama_providers(**urls: str) -> Callable[[ProvidersSettings], Sequence[Provider]]:
    """A factory of Ollama providers named by keyword: `ollama_providers(a=url1, b=url2)`."""

    def build(settings: ProvidersSettings) -> Sequence[Provider]:
        return [
            OllamaProvider(
                url,
                name=name,
                connect_timeout=settings.connect_timeout_seconds,
                read_timeout=settings.read_timeout_seconds,
                health_timeout=settings.health_timeout_seconds,
            )
            for name, url in urls.items()
        ]

    return build


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    (port,) = free_ports(1)
    return port


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}"


async def stream_outcome(
    call: AsyncIterable[pb.StreamChatCompletionResponse],
) -> tuple[list[pb.StreamChatCompletionResponse], ServiceError | None]:
    """Every chunk a streaming call sent, and the error it ended with (None when OK)."""
    chunks: list[pb.StreamChatCompletionResponse] = []
    try:
        async for chunk in call:
            chunks.append(chunk)
    except grpc.aio.AioRpcError as exc:
        return chunks, ServiceError.from_rpc_error(exc)
    return chunks, None


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.ROLE_USER, content=text)


def chat(model: str, *messages: pb.ChatMessage, **fields: Any) -> pb.StreamChatCompletionRequest:
    """A chat request; `messages` default to one user "hi there"."""
    return pb.StreamChatCompletionRequest(
        model=model, messages=list(messages) or [user("hi there")], **fields
    )
