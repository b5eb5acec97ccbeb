"""One error type for the whole suite: a gRPC status code plus a google.rpc.ErrorInfo.

Services raise `ServiceError`; the server interceptor turns it into a rich
status. Clients turn a failed call back into a `ServiceError` with
`ServiceError.from_rpc_error`, so reason and metadata survive every hop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# An error's message and ErrorInfo travel as trailing metadata (grpc-message,
# percent-encoded, and grpc-status-details-bin, base64), which a peer refuses
# past 8 KiB (the call then fails as RESOURCE_EXHAUSTED, a fake rate limit).
# Messages often echo what the caller sent (an id it asked for), so every
# part is clipped to a size that keeps the whole well under that limit, in
# UTF-8 bytes: at worst about 1.5 KiB of grpc-message and 4 KiB of details.
MAX_MESSAGE_BYTES = 512
MAX_METADATA_KEY_BYTES = 64
MAX_METADATA_VALUE_BYTES = 256
MAX_METADATA_ENTRIES = 8
_ELLIPSIS = "…"


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, ending with "…" when cut."""
    if len(text) * 4 <= limit or len(encoded := text.encode()) <= limit:
        return text
    room = limit - len(_ELLIPSIS.encode())
    return encoded[:room].decode(errors="ignore") + _ELLIPSIS


def _clipped_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if len(out) == MAX_METADATA_ENTRIES:
            break
        out[clip(key, MAX_METADATA_KEY_BYTES)] = clip(value, MAX_METADATA_VALUE_BYTES)
    return out


class ServiceError(Exception):
    """An error with a gRPC status code, a stable UPPER_SNAKE reason and metadata.

    The message and metadata are clipped (`clip`) so that the status always
    fits in a peer's metadata limit, whatever the caller's values were."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        domain: str = "marie",
        metadata: Mapping[str, str] | None = None,
        trailers: Mapping[str, str] | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.domain = domain
        self.metadata: dict[str, str] = _clipped_metadata(metadata)
        #: Plain trailing metadata sent beside the status (e.g. `retry-after`).
        self.trailers: dict[str, str] = dict(trailers or {})

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.reason!r}, {self.message!r})"

    def to_status(self) -> grpc.Status:
        """The rich status: code, message and ErrorInfo in the status details."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=self.domain, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        status = rpc_status.to_status(proto)
        if not self.trailers:
            return status
        return _Status(
            status.code, status.details, (*status.trailing_metadata, *self.trailers.items())
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> ServiceError:
        """Rebuild the error a peer raised, ErrorInfo included when it sent one."""
        code = error.code()
        message = error.details() or code.name
        reason, domain, metadata = code.name, "marie", {}
        for key, value in error.trailing_metadata() or ():
            if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        return cls(code, reason, message, domain=domain, metadata=metadata)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def invalid_argument(field: str, message: str, *, domain: str = "marie") -> ServiceError:
    """INVALID_ARGUMENT naming the offending field in ErrorInfo metadata."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        message,
        domain=domain,
        metadata={"field": field},
    )
