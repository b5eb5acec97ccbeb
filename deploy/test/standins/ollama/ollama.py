#!/usr/bin/env python3
"""`ollama serve` and `ollama list` for the fake Ollama stand-in image.

`serve` runs tests/fakes/ollama.py on OLLAMA_HOST (default 0.0.0.0:11434)
with its default models plus `slow`, whose replies stream one piece every
50 ms (streams that are still open when a replica is killed), and `broken`,
which fails its answers midway (server errors for the dashboard's panels); `list` asks
the server, as the real command does (compose's health check)."""

import json
import os
import sys
import threading
import urllib.request

SLOW_REPLY = " ".join(f"word{i}" for i in range(60))


def address() -> tuple[str, int]:
    host, _, port = os.environ.get("OLLAMA_HOST", "0.0.0.0:11434").rpartition(":")
    return host or "0.0.0.0", int(port)


def serve() -> None:
    # Imported here: `list` (compose's health check, every 10 s) stays light.
    from tests.fakes.ollama import FakeModel, FakeOllama, default_models  # noqa: PLC0415

    host, port = address()
    models = [
        *default_models(),
        FakeModel("slow", reply=SLOW_REPLY, chunk_delay=0.05),
        FakeModel("broken", reply="one two three four", error_after=2),
    ]
    FakeOllama(models, host=host, port=port).start()
    print(f"fake ollama listening on {host}:{port}", flush=True)
    threading.Event().wait()


def list_models() -> None:
    _, port = address()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tags", timeout=5) as reply:
        for model in json.load(reply)["models"]:
            print(model["name"])


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    {"serve": serve, "list": list_models}[command]()
