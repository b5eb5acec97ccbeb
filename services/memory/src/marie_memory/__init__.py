"""Marie's memory service: conversations, messages and long-term memories of each
user, with keyword, vector and hybrid search and LLM fact extraction.

What other code uses:

- `MemorySettings` — `MARIE_MEMORY_*` settings;
- `Store` (`stores.contract`) and the records in `records` — the storage interface;
- `SqliteStore` (`stores.sqlite`) — the embedded store;
- `MemoryComponent` — the service for `marie_kit.server.start_server` / `serve`.
"""
