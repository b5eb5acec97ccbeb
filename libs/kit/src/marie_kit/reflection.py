"""gRPC server reflection, as grpcurl and Postman use it.

grpcio-reflection answers `file_containing_symbol` through the descriptor
pool, which does not index methods: `grpcurl describe
marie.providers.v1.ProviderService.ListModels` failed. Here a method symbol is
answered with the file of its service. The service is also offered as
`grpc.reflection.v1` beside `v1alpha` (the same messages on the wire: current
clients ask for v1 first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"

# The type stubs do not describe the servicer's internals used below.
_Servicer: Any = ReflectionServicer
_add_servicer: Any = reflection_pb2_grpc.add_ServerReflectionServicer_to_server


class MethodAwareReflection(_Servicer):  # type: ignore[misc]
    """The standard servicer, answering method symbols too."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        reply = super()._file_containing_symbol(request, fully_qualified_name)
        if not reply.HasField("error_response"):
            return reply
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            self._pool.FindServiceByName(service).FindMethodByName(method)
        except KeyError:
            return reply
        return super()._file_containing_symbol(request, service)


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) for `service_names` on `server`."""
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = MethodAwareReflection(names)
    # v1alpha through its generated registration, v1 by name with the same
    # (wire-identical) messages.
    _add_servicer(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
