"""The OpenAI-compatible surface, `/v1`: chat, legacy completions, embeddings,
models and the Responses API, over the providers service."""
