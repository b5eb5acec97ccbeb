"""Fakes of external services, speaking their real wire protocols."""

from .ollama import (
    FakeModel,
    FakeOllama,
    RecordedRequest,
    default_models,
    fake_embedding,
    split_reply,
)

__all__ = [
    "FakeModel",
    "FakeOllama",
    "RecordedRequest",
    "default_models",
    "fake_embedding",
    "split_reply",
]
