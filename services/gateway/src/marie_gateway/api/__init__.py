"""Marie's own API, `/api`: models and search, comparison, conversations and
memories, keys and usage."""
