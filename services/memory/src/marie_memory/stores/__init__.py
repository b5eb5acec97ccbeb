"""The stores behind the memory service: their shared interface, SQLite and OpenSearch."""
