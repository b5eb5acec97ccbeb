"""What one limited request (chat, embeddings, compare) used, as its answer
goes: the tokens are charged to the key's limits the moment they are known,
and the request's concurrency slot is given back when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from time import time as unix_time

from marie_gateway.access import Principal
from marie_gateway.limits import Grant, Limiter


@dataclass(slots=True)
class ModelUse:
    """Tokens one model used for the request (a comparison has several)."""

    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Tally:
    """One admitted request's account."""

    principal: Principal
    grant: Grant
    limiter: Limiter
    #: "chat", "embeddings" or "compare".
    operation: str
    #: Unix time of admission, and the monotonic clock at admission.
    time: float = field(default_factory=unix_time)
    started: float = field(default_factory=perf_counter)
    uses: list[ModelUse] = field(default_factory=list)
    #: Set when the request failed after its answer started (an error event).
    failed: bool = False
    finished: bool = False

    def add(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count what `model` used; charged to the key's token limits at once."""
        self.uses.append(ModelUse(model, prompt_tokens, completion_tokens))
        self.limiter.charge(self.grant, prompt_tokens + completion_tokens)

    def finish(self) -> bool:
        """The request ended: free its slot. False when it had already ended."""
        if self.finished:
            return False
        self.finished = True
        self.limiter.release(self.grant)
        return True
