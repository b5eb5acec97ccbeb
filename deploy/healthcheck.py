"""Container health probe for Marie's services (the images' HEALTHCHECK).

    python healthcheck.py grpc PORT_VARIABLE DEFAULT_PORT
    python healthcheck.py http PORT_VARIABLE DEFAULT_PORT

`grpc` asks the local grpc.health.v1 service for the overall status (service
""); `http` asks the gateway's GET /readyz. Exit 0 when ready, 1 otherwise,
with one line on stderr saying why. The port is read from the named
environment variable so that the probe follows the service's own setting.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from typing import Any

TIMEOUT_SECONDS = 4.0


def grpc_ready(port: int) -> tuple[bool, str]:
    import grpc  # noqa: PLC0415 - only the gRPC images have it
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # The published stubs declare no methods on HealthStub.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            return False, f"health check failed: {exc.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def http_ready(port: int) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except OSError as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] not in ("grpc", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, variable, default = argv[1], argv[2], argv[3]
    port = int(os.environ.get(variable) or default)
    ready, detail = (grpc_ready if kind == "grpc" else http_ready)(port)
    if not ready:
        print(f"not ready: {detail}", file=sys.stderr)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
