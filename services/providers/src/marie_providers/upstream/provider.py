"""The provider abstraction: what the registry and the servicer need from every upstream.

Protobuf messages are the domain types at this boundary: a provider builds the
chunks the servicer sends, so the hot path converts each upstream line once.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator

from marie.providers.v1 import provider_service_pb2 as pb

from marie_providers.errors import unsupported
from marie_providers.upstream.transport import Accepted


class Provider(ABC):
    """One configured upstream (an Ollama server, an OpenAI-compatible endpoint, …)."""

    #: Name used in model ids ("ollama" in "ollama/llama3.2:latest").
    name: str
    #: Kind of upstream API ("ollama", "openai", …).
    kind: str
    supports_streaming: bool = True
    supports_embeddings: bool = False
    #: Model used when a request names the provider but no model; may be empty.
    default_model: str = ""
    #: True when the listing already tells all a details call would (no per-model call
    #: can add anything): its entries count as having their details loaded.
    listing_is_detailed: bool = False
    #: The only model names this provider may serve (configuration's `models`); None: any.
    allowed_models: frozenset[str] | None = None
    #: True when the upstream serves any Hugging Face hub id, listed or not (the HF
    #: router): the registry sends it a bare hub id that no listing names.
    serves_any_hub_id: bool = False
    #: True when the upstream says which stop sequence ended a reply (the last
    #: chunk's `stop_sequence`); else a request's `report_stop_sequence` has
    #: the service find it (`upstream.stops`).
    reports_stop_sequence: bool = False
    #: Configuration's `embedding_input_type`: input_type is passed upstream.
    embedding_input_type: bool = False
    #: Configuration's `embedding_prefixes`, (query, document); None: no prefixes.
    embedding_prefixes: tuple[str, str] | None = None

    @property
    def embedding_handling(self) -> str:
        """How this provider applies an embeddings request's input_type
        (CreateEmbeddingsResponse.input_handling): passed on as is
        ("input_type", the adapter sends it), as prefixes of the texts
        ("prefixes:<digest>"), or not at all (""). It names the configuration,
        not the request, so every vector of one configuration compares with
        every other (and the response cache keys on it)."""
        if self.embedding_input_type:
            return "input_type"
        if self.embedding_prefixes is None:
            return ""
        query, document = self.embedding_prefixes
        return "prefixes:" + hashlib.sha256(f"{query}\0{document}".encode()).hexdigest()[:8]

    def embedding_request(
        self, request: pb.CreateEmbeddingsRequest
    ) -> tuple[pb.CreateEmbeddingsRequest, str]:
        """The request as this provider's `embed` takes it, and how its
        input_type was applied (`embedding_handling`)."""
        handling = self.embedding_handling
        if self.embedding_input_type or self.embedding_prefixes is None:
            return request, handling
        query, document = self.embedding_prefixes
        prefix = {
            pb.EMBEDDING_INPUT_TYPE_QUERY: query,
            pb.EMBEDDING_INPUT_TYPE_DOCUMENT: document,
        }.get(request.input_type, "")
        if not prefix or request.token_inputs:
            # Unspecified input_type: texts as the caller wrote them. Token ids
            # cannot take a text prefix.
            return request, handling
        prefixed = pb.CreateEmbeddingsRequest()
        prefixed.CopyFrom(request)
        del prefixed.inputs[:]
        prefixed.inputs.extend(prefix + text for text in request.inputs)
        return prefixed, handling

    @property
    @abstractmethod
    def base_url(self) -> str:
        """The upstream's base URL without credentials: safe to show and log."""

    @abstractmethod
    async def list_models(self) -> list[pb.ModelInfo]:
        """Every model the upstream offers, from its listing (details not loaded)."""

    @abstractmethod
    async def model_details(self, name: str) -> pb.ModelInfo:
        """One model with the fields only a details call gives; NOT_FOUND when unknown."""

    @abstractmethod
    def stream_chat(
        self,
        request: pb.StreamChatCompletionRequest,
        model_name: str,
        completion_id: str,
        created: int,
        *,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """Stream the completion of an already validated request as chunks;
        `accepted` is awaited once the upstream has accepted the request (its
        status is a success), before its first chunk.

        Closing the iterator early must close the upstream request.
        """

    def stream_completion(
        self,
        request: pb.StreamCompletionRequest,
        model_name: str,
        completion_id: str,
        created: int,
        *,
        accepted: Accepted | None = None,
    ) -> AsyncGenerator[pb.StreamChatCompletionResponse, None]:
        """Stream the continuation of a validated text prompt, as chat chunks whose
        `content` is the text (the servicer turns them into completion chunks):
        one chunk type lets completions share the router, the merger and the
        stream translators with chat; `accepted` as for `stream_chat`. The
        default: this upstream has none."""
        raise unsupported(
            self.name,
            "model",
            f"{self.name} ({self.kind}) has no text completions: use chat completions",
        )

    def first_chunk_is_whole_reply(
        self, request: pb.StreamChatCompletionRequest | pb.StreamCompletionRequest
    ) -> bool:
        """True when this provider answers `request` in one piece (it asks the upstream
        for the whole reply), so its first chunk comes only when generation ends:
        a first-token timeout would cut off a long reply."""
        return False

    @abstractmethod
    async def embed(
        self, request: pb.CreateEmbeddingsRequest, model_name: str
    ) -> pb.CreateEmbeddingsResponse:
        """Embed the request's inputs with `model_name`."""

    @abstractmethod
    async def probe(self) -> pb.ProviderHealth:
        """Check that the upstream answers; never raises for an upstream failure."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the upstream connections."""

    def canonical_model_name(self, model_name: str) -> str:
        """The one spelling of a model name that this upstream treats as the same
        model as `model_name` (used to compare names, never sent upstream)."""
        return model_name

    def model_id(self, model_name: str) -> str:
        """The globally unique id clients use for one of this provider's models."""
        return f"{self.name}/{model_name}"

    def to_proto(self) -> pb.Provider:
        """This provider as the API describes it."""
        return pb.Provider(
            name=self.name,
            kind=self.kind,
            base_url=self.base_url,
            supports_streaming=self.supports_streaming,
            supports_embeddings=self.supports_embeddings,
            default_model=self.default_model,
        )
