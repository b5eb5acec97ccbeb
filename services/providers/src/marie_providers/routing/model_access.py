"""Which models a caller may use: the API key's allowed-model patterns, which the
gateway (or Envoy's key check) passes as `x-marie-allowed-models` metadata.

The check runs here, on the resolved model, because only the providers know
which names are the same model (`ollama/llama3.2` is `ollama/llama3.2:latest`)
and because it must run before any upstream call. A caller restricted to some
models gets the same answer for a model that exists and one that does not, so
the difference cannot tell it what exists outside its allowance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
from marie_kit.errors import ServiceError
from marie_kit.identity import allowed_models_from_metadata

from marie_providers.errors import DOMAIN

# provider name -> canonical form of one of its model names (None: unknown provider).
Canonical = Callable[[str, str], str | None]


@dataclass(frozen=True, slots=True)
class ModelAccess:
    """A caller's allowed models: `provider/model` ids and `provider/*` patterns."""

    patterns: tuple[str, ...]

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> ModelAccess:
        """The restriction a call carries; unrestricted when it carries none."""
        value = allowed_models_from_metadata(metadata)
        return cls(tuple(unquote(p) for p in value.split(",") if p)) if value else UNRESTRICTED

    @property
    def restricted(self) -> bool:
        return bool(self.patterns)

    def allows(self, provider: str, name: str, canonical: Canonical) -> bool:
        """Whether the model `name` (already canonical) of `provider` is allowed."""
        if not self.patterns:
            return True
        for pattern in self.patterns:
            owner, slash, model = pattern.partition("/")
            if not slash or owner != provider:
                continue
            if model == "*":
                return True
            if model.endswith("*"):
                # Prefix patterns of keys made before patterns were checked.
                if name.startswith(model[:-1]):
                    return True
            elif canonical(provider, model) == name:
                return True
        return False


UNRESTRICTED = ModelAccess(())


def model_not_allowed(model: str) -> ServiceError:
    """PERMISSION_DENIED for a model outside the caller's allowance, existing or not."""
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
        f"This API key may not use the model '{model}'.",
        domain=DOMAIN,
        metadata={"model": model},
    )
