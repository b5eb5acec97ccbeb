"""Anthropic Messages API: its HTTP client (typed SSE) and the translation of its messages."""
