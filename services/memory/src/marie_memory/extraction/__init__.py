"""Fact extraction by an LLM (mem0's two steps) and the durable queue that runs it."""
