"""The response cache: exact-match answers of earlier calls, per owner, for
chat, text completions and embeddings (`responses.py`), kept in SQLite
(`sqlite_store.py`) or OpenSearch (`opensearch_store.py`)."""
