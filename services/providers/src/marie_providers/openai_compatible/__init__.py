"""Any OpenAI-compatible endpoint: its HTTP client (SSE streaming) and the OpenAI translation."""
