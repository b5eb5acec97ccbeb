"""`marie up`: start every service as its own process, wait until each is
ready, and stop them all cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass

import grpc
import httpx
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, wait_until_serving

# Extra time past the services' own grace period before stragglers are killed.
KILL_MARGIN_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 60.0
HEALTH_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class ServiceSpec:
    """One service process: its module and how to tell it is ready."""

    name: str
    module: str
    port: int
    grpc: bool  # ready through gRPC health; else through HTTP /readyz


@dataclass
class Running:
    spec: ServiceSpec
    process: asyncio.subprocess.Process


def services_from_env(env: dict[str, str]) -> list[ServiceSpec]:
    """The suite in start order (dependencies first), ports from the environment."""

    def port(var: str, default: int) -> int:
        raw = env.get(var, str(default))
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise SystemExit(f"invalid settings: {var}: must be a port number (got {raw!r})")
        return int(raw)

    return [
        ServiceSpec("providers", "marie_providers", port("MARIE_PROVIDERS_PORT", 50051), True),
        ServiceSpec("auth", "marie_auth", port("MARIE_AUTH_PORT", 50053), True),
        ServiceSpec("gateway", "marie_gateway", port("MARIE_GATEWAY_PORT", 8000), False),
    ]


async def _wait_ready(spec: ServiceSpec, host: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    if spec.grpc:
        waiter = asyncio.create_task(
            wait_until_serving(f"{host}:{spec.port}", timeout=READY_TIMEOUT_SECONDS)
        )
    else:
        waiter = asyncio.create_task(
            _wait_http_ready(f"http://{host}:{spec.port}/readyz", deadline)
        )
    exited = asyncio.create_task(process.wait())
    done, _ = await asyncio.wait((waiter, exited), return_when=asyncio.FIRST_COMPLETED)
    if exited in done:
        waiter.cancel()
        raise RuntimeError(f"{spec.name} exited with code {process.returncode} while starting")
    exited.cancel()
    waiter.result()


async def _wait_http_ready(url: str, deadline: float) -> None:
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {READY_TIMEOUT_SECONDS:.0f}s")
            await asyncio.sleep(0.1)


async def _stop_all(running: list[Running], grace: float) -> None:
    """SIGTERM in reverse start order, then SIGKILL whatever outlives the grace period."""
    for item in reversed(running):
        if item.process.returncode is None:
            item.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(item.process.wait(), grace + KILL_MARGIN_SECONDS)
            except TimeoutError:
                print(f"marie: {item.spec.name} did not stop in time; killing it", file=sys.stderr)
                item.process.kill()
                await item.process.wait()


async def up(env: dict[str, str]) -> int:
    """Start the suite; returns the exit code once it has stopped.

    `env` is passed to every service; its MARIE_DATA_DIR must be absolute so
    all services share one data directory whatever their working directory."""
    specs = services_from_env(env)
    host = "127.0.0.1"
    grace = float(env.get("MARIE_GRACE_SECONDS", "10"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running: list[Running] = []
    code = 0
    try:
        for spec in specs:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                spec.module,
                env=env,
                # Children ignore the terminal's Ctrl-C: this supervisor stops them in order.
                start_new_session=True,
            )
            running.append(Running(spec, process))
            await _wait_ready(spec, host, process)
            print(f"marie: {spec.name} ready on {host}:{spec.port}", flush=True)
        gateway = next(s for s in specs if s.name == "gateway")
        providers = next(s for s in specs if s.name == "providers")
        print(_banner(host, specs, gateway.port, env["MARIE_DATA_DIR"]), flush=True)
        print(await _provider_health(f"{host}:{providers.port}"), flush=True)
        exits = [asyncio.create_task(r.process.wait()) for r in running]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*exits, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in exits:
            task.cancel()
        for r in running:
            if r.process.returncode is not None:
                print(
                    f"marie: {r.spec.name} exited with code {r.process.returncode}", file=sys.stderr
                )
                code = 1
    except (RuntimeError, TimeoutError) as exc:
        print(f"marie: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("marie: stopping…", flush=True)
        await _stop_all(running, grace)
    print("marie: stopped", flush=True)
    return code


async def _provider_health(target: str) -> str:
    """One line per provider saying whether chats will work, and what to do if not."""
    async with insecure_channel(target) as channel:
        stub = pb_grpc.ProviderServiceStub(channel)
        try:
            reply = await stub.GetProviderHealth(
                pb.GetProviderHealthRequest(), timeout=HEALTH_TIMEOUT_SECONDS
            )
            configured = await stub.ListProviders(
                pb.ListProvidersRequest(), timeout=HEALTH_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            return f"Providers: health unknown ({exc.code().name})"
    urls = {p.name: p.base_url for p in configured.providers}
    lines = ["Providers:"]
    for h in reply.providers:
        if h.available:
            lines.append(f"  {h.provider:<10} healthy, {h.models_count} models")
        else:
            # The person at the terminal is the operator: the URL is theirs to fix.
            where = f" (at {urls[h.provider]})" if urls.get(h.provider) else ""
            lines.append(f"  {h.provider:<10} NOT AVAILABLE{where}: {h.error}")
    if len(lines) == 1:
        lines.append("  none configured")
    return "\n".join(lines)


def _banner(host: str, specs: list[ServiceSpec], gateway_port: int, data_dir: str) -> str:
    lines = ["", "Marie is up.", ""]
    for s in specs:
        kind = "gRPC" if s.grpc else "HTTP"
        lines.append(f"  {s.name:<10} {kind}  {host}:{s.port}")
    lines += [
        f"  data       {data_dir}",
        "",
        "Create an API key:",
        "  .venv/bin/marie keys create --name dev",
        "Then call it:",
        f"  curl http://{host}:{gateway_port}/v1/models -H 'Authorization: Bearer <key>'",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)
