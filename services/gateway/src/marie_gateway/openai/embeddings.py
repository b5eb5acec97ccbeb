"""`POST /v1/embeddings`: texts or token ids to vectors (floats or base64),
over the providers service (scope `embeddings`)."""

from __future__ import annotations

import array
import base64

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from marie_gateway.access.keys import SCOPE_EMBEDDINGS
from marie_gateway.core import Gateway
from marie_gateway.http import caching
from marie_gateway.http.bodies import JSONResponse, parse_body
from marie_gateway.http.context import current_request_id
from marie_gateway.http.errors import from_rpc_error
from marie_gateway.openai.schemas import EmbeddingsRequest

_INPUT_TYPES = {
    None: pb.EMBEDDING_INPUT_TYPE_UNSPECIFIED,
    "query": pb.EMBEDDING_INPUT_TYPE_QUERY,
    "search_query": pb.EMBEDDING_INPUT_TYPE_QUERY,
    "document": pb.EMBEDDING_INPUT_TYPE_DOCUMENT,
    "passage": pb.EMBEDDING_INPUT_TYPE_DOCUMENT,
    "search_document": pb.EMBEDDING_INPUT_TYPE_DOCUMENT,
}


class EmbeddingRoutes:
    """Handler of `/v1/embeddings`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/embeddings", self.embeddings, methods=["POST"])]

    async def embeddings(self, request: Request) -> Response:
        gw = self.gw
        principal = await gw.authorize(request, SCOPE_EMBEDDINGS)
        tally = await gw.admit(request, principal, "embeddings")
        body = parse_body(EmbeddingsRequest, await gw.read_body(request))
        tally.requested = body.model
        embed = pb.CreateEmbeddingsRequest(
            model=body.model,
            dimensions=body.dimensions or 0,
            user=body.user or "",
            input_type=_INPUT_TYPES[body.input_type],
        )
        given = [body.input] if isinstance(body.input, str) else body.input
        if given and isinstance(given[0], int):
            embed.token_inputs.add(ids=given)  # one input as token ids
        elif given and isinstance(given[0], list):
            for ids in given:
                embed.token_inputs.add(ids=ids)
        else:
            embed.inputs.extend(given)  # type: ignore[arg-type]  # texts, by elimination
        if (policy := caching.request_policy(request.headers)) is not None:
            embed.cache.CopyFrom(policy)
        try:
            reply = await gw.backends().providers.CreateEmbeddings(
                embed,
                timeout=gw.settings.request_timeout_seconds,
                metadata=principal.model_call_metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, current_request_id())
            if error.param == "token_inputs":
                # The client sent `input`; the contract's name for token ids means nothing to it.
                error.param = "input"
            raise error from None
        if reply.cache == pb.CACHE_RESULT_HIT:
            tally.add_cached(reply.model)
        else:
            tally.add(reply.model, reply.usage)
        as_base64 = body.encoding_format == "base64"
        data = [
            {
                "object": "embedding",
                "index": e.index,
                "embedding": (
                    base64.b64encode(array.array("f", e.values).tobytes()).decode()
                    if as_base64
                    else list(e.values)
                ),
            }
            for e in reply.embeddings
        ]
        usage = {
            "prompt_tokens": reply.usage.prompt_tokens,
            "total_tokens": reply.usage.total_tokens,
        }
        header = caching.answer_header(reply.cache)
        return JSONResponse(
            {"object": "list", "data": data, "model": reply.model, "usage": usage},
            headers={header[0].decode(): header[1].decode()} if header else None,
        )
