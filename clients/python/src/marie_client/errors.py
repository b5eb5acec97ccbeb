"""Failed calls as one exception type: the gRPC code plus Marie's ErrorInfo.

Marie's services put a google.rpc.Status with an ErrorInfo (a stable
UPPER_SNAKE reason, a domain and string metadata such as ``field``) in the
``grpc-status-details-bin`` trailer. :class:`MarieError` carries it decoded.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class MarieError(Exception):
    """A call that failed: ``code`` (grpc.StatusCode), ``reason``, ``domain``,
    ``metadata`` (e.g. ``{"field": "sampling.temperature"}``) and ``message``.

    When the peer sent no ErrorInfo (a proxy, a transport failure), ``reason``
    is the code's name and ``metadata`` is empty.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or code.name
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        return f"MarieError({self.code.name}, reason={self.reason!r}, message={self.message!r})"

    @property
    def field(self) -> str | None:
        """The request field an INVALID_ARGUMENT names, if any."""
        return self.metadata.get("field")

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> MarieError:
        """Decode a failed call into a MarieError."""
        code = error.code()
        message = error.details() or code.name
        for key, value in error.trailing_metadata() or ():
            if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return cls(
                        code,
                        message,
                        reason=info.reason,
                        domain=info.domain,
                        metadata=dict(info.metadata),
                    )
        return cls(code, message)
