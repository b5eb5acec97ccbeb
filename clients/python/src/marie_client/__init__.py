"""Marie's Python gRPC client: ``MarieClient(address, api_key)``.

The generated messages are in ``marie.providers.v1.provider_service_pb2``
(also ``marie.auth.v1``, ``marie.memory.v1``), re-exported here as ``pb``.
"""

from marie.providers.v1 import provider_service_pb2 as pb

from marie_client.chat import ChatResult, ChatStream
from marie_client.client import MarieClient
from marie_client.errors import MarieError

__version__ = "1.0.0"

__all__ = ["ChatResult", "ChatStream", "MarieClient", "MarieError", "__version__", "pb"]
