"""Two auth replicas on one SQLite file, two gateways (each on its own
replica): a revocation through either replica reaches both gateways within
a second; with its auth replica down, a gateway keeps serving keys it
validated recently and answers 503 (not 401) for keys it does not know.

Real processes (`marie-auth`, `marie-gateway`) on free ports. The key checks
go through the gateways' `/_authz` route, which validates keys exactly as the
HTTP API does, so no providers service is needed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from google.rpc import code_pb2

from tests.envoy import refusal_status
from tests.stack import MARIE, free_ports, stop_process

BIN = Path(sys.executable).parent
CHECK = "/_authz/marie.providers.v1.ProviderService/ListModels"


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        stop_process(self.process, timeout=15)


def spawn(name: str, command: str, env: dict[str, str], port: int, log_dir: Path) -> Proc:
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(BIN / command)], env=env, stdout=out, stderr=out)
    return Proc(process, port, log)


STARTUP_SECONDS = 90.0


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@dataclass
class Replicas:
    env: dict[str, str]
    auths: list[Proc]
    gateways: list[Proc]

    def check(self, gateway: int, key: str) -> int:
        url = f"http://127.0.0.1:{self.gateways[gateway].port}{CHECK}"
        return httpx.post(url, headers={"authorization": f"Bearer {key}"}, timeout=10).status_code

    def marie(self, auth: int, *args: str) -> dict[str, object]:
        env = {**self.env, "MARIE_AUTH_ADDR": f"127.0.0.1:{self.auths[auth].port}"}
        done = subprocess.run(
            [str(MARIE), "keys", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "no auth service" not in done.stderr
        result: dict[str, object] = orjson.loads(done.stdout)
        return result


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    auth_a, auth_b, gw_1, gw_2, providers = free_ports(5)
    env = {
        **os.environ,
        "MARIE_DATA_DIR": str(tmp_path / "data"),
        "MARIE_GRACE_SECONDS": "1",
        "MARIE_PROVIDERS_PORT": str(providers),
    }
    started: list[Proc] = []
    try:
        auths = [
            spawn(f"auth-{p}", "marie-auth", {**env, "MARIE_AUTH_PORT": str(p)}, p, tmp_path)
            for p in (auth_a, auth_b)
        ]
        started += auths
        gateways = [
            spawn(
                f"gateway-{g}",
                "marie-gateway",
                {**env, "MARIE_GATEWAY_PORT": str(g), "MARIE_AUTH_PORT": str(a)},
                g,
                tmp_path,
            )
            for g, a in ((gw_1, auth_a), (gw_2, auth_b))
        ]
        started += gateways
        for gw in gateways:
            # Start-up, not behaviour: four processes importing at once take
            # well over 20 s on a loaded two-core machine.
            wait_for(
                lambda gw=gw: httpx.get(f"http://127.0.0.1:{gw.port}/healthz").status_code == 200,
                STARTUP_SECONDS,
            )
        yield Replicas(env, auths, gateways)
    finally:
        for proc in started:
            proc.stop()


def test_a_revocation_through_one_auth_replica_reaches_both_gateways_within_a_second(
    replicas: Replicas,
) -> None:
    created = replicas.marie(0, "create", "--name", "shared")
    key, key_id = str(created["key"]), str(created["id"])
    # Both gateways validate it (each through its own replica) and cache it.
    wait_for(lambda: replicas.check(0, key) == 200 and replicas.check(1, key) == 200)
    for _ in range(3):
        assert replicas.check(0, key) == 200
        assert replicas.check(1, key) == 200

    # Revoked through the *other* replica than gateway 0's.
    replicas.marie(1, "revoke", key_id)
    revoked_at = time.monotonic()
    wait_for(lambda: replicas.check(0, key) == 401 and replicas.check(1, key) == 401, 5)
    assert time.monotonic() - revoked_at < 1.0


def test_with_auth_down_warm_keys_work_and_cold_keys_get_503(replicas: Replicas) -> None:
    warm = str(replicas.marie(0, "create", "--name", "warm")["key"])
    cold = str(replicas.marie(0, "create", "--name", "cold")["key"])
    wait_for(lambda: replicas.check(0, warm) == 200)

    replicas.auths[0].stop()
    # Gateway 0's replica is gone: the key it validated recently still works...
    for _ in range(5):
        assert replicas.check(0, warm) == 200
    # ...a valid key it never saw cannot be checked: 503, not 401.
    r = httpx.post(
        f"http://127.0.0.1:{replicas.gateways[0].port}{CHECK}",
        headers={"authorization": f"Bearer {cold}"},
    )
    assert r.status_code == 503
    refused = refusal_status(r)
    assert refused.code == code_pb2.UNAVAILABLE  # as Envoy maps the 503
    assert refused.message.startswith("A Marie service is unavailable right now")
    # The other gateway, on the live replica, knows both.
    assert replicas.check(1, cold) == 200
    assert replicas.check(1, warm) == 200
