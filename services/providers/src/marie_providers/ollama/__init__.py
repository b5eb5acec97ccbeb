"""Ollama: its HTTP client (NDJSON streaming) and the translation of its JSON API."""
