"""The memory service's errors: stable reasons in the "marie.memory" ErrorInfo domain."""

from __future__ import annotations

import grpc
from marie_kit.errors import ServiceError
from marie_kit.errors import invalid_argument as _invalid_argument

DOMAIN = "marie.memory"


def invalid_argument(field: str, message: str) -> ServiceError:
    return _invalid_argument(field, message, domain=DOMAIN)


def conversation_not_found(conversation_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
        f"conversation {conversation_id!r} not found",
        domain=DOMAIN,
        metadata={"conversation_id": conversation_id},
    )


def memory_not_found(memory_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        "MEMORY_NOT_FOUND",
        f"memory {memory_id!r} not found",
        domain=DOMAIN,
        metadata={"memory_id": memory_id},
    )


def model_not_found(model: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "MODEL_NOT_FOUND",
        f"extraction model {model!r} is unknown to the providers service",
        domain=DOMAIN,
        metadata={"model": model},
    )


def model_not_allowed(model: str) -> ServiceError:
    """The extraction model is outside the allowed models of the key that asked."""
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
        f"This API key may not use the extraction model {model!r}.",
        domain=DOMAIN,
        metadata={"model": model},
    )


def embeddings_not_configured() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "EMBEDDINGS_NOT_CONFIGURED",
        "vector search needs an embedding model (MARIE_MEMORY_EMBEDDING_MODEL)",
        domain=DOMAIN,
    )


def extraction_model_not_configured() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXTRACTION_MODEL_NOT_CONFIGURED",
        "inference needs an extraction model: name one in the request or set "
        "MARIE_MEMORY_EXTRACTION_MODEL",
        domain=DOMAIN,
    )


#: ErrorInfo metadata of PROVIDER_UNAVAILABLE: the providers service's own reason
#: (e.g. CIRCUIT_OPEN), and the seconds it asked callers to wait, when it did.
CAUSE_KEY = "cause"
RETRY_AFTER_KEY = "retry_after_seconds"


def provider_unavailable(what: str, *, cause: ServiceError | None = None) -> ServiceError:
    metadata = {}
    if cause is not None:
        metadata[CAUSE_KEY] = cause.reason
        if RETRY_AFTER_KEY in cause.metadata:
            metadata[RETRY_AFTER_KEY] = cause.metadata[RETRY_AFTER_KEY]
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
        f"the providers service failed while {what}; safe to retry",
        domain=DOMAIN,
        metadata=metadata,
    )


def extraction_failed(why: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "EXTRACTION_FAILED",
        f"the extraction model's output could not be used ({why}); nothing was changed",
        domain=DOMAIN,
    )


def job_not_found(job_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        "JOB_NOT_FOUND",
        f"extraction job {job_id[:64]!r} not found",
        domain=DOMAIN,
        metadata={"job_id": job_id[:64]},
    )


def store_unavailable(message: str = "the memory store is not open") -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE", message, domain=DOMAIN)


def store_unreachable() -> ServiceError:
    """A write the store's node did not answer (unreachable, timed out, failing)."""
    return store_unavailable(
        "the memory store could not be reached or failed; the write may or may not be"
        " stored: retry it with the same request_id"
    )
