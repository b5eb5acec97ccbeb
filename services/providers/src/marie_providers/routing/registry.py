"""The model registry: cached model lists across providers, search, and model-name resolution.

Listings are cached per provider for a TTL and refreshed by one upstream call
however many requests want it at once. Resolving an explicit
"<provider>/<model>" never calls an upstream: it is on the chat hot path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from marie.providers.v1 import provider_service_pb2 as pb
from marie_kit.errors import ServiceError

from marie_providers.errors import DOMAIN, model_not_found, provider_not_found
from marie_providers.routing.model_access import UNRESTRICTED, ModelAccess, model_not_allowed
from marie_providers.upstream.provider import Provider

log = logging.getLogger("marie.providers.registry")

# Ollama's convention: a name without a tag means the "latest" tag.
DEFAULT_TAG = ":latest"
# A bare name missing from a cached listing triggers a refresh (it may have just
# been pulled), but not more often than this: typos must not hammer upstreams.
MISS_REFRESH_SECONDS = 5.0
# Details calls made at once when a capability filter needs every model's details.
DETAILS_CONCURRENCY = 8

Clock = Callable[[], float]


@dataclass(frozen=True)
class _Listing:
    """One provider's model list as fetched at `fetched_at` (monotonic seconds)."""

    models: tuple[pb.ModelInfo, ...]
    by_name: dict[str, pb.ModelInfo]
    fetched_at: float


@dataclass(frozen=True)
class _Details:
    model: pb.ModelInfo
    fetched_at: float


def capability_name(capability: pb.ModelCapability) -> str:
    """The word a search matches for a capability: "tools" for MODEL_CAPABILITY_TOOLS."""
    return pb.ModelCapability.Name(capability).removeprefix("MODEL_CAPABILITY_").lower()


def _merge(listed: pb.ModelInfo, details: pb.ModelInfo) -> pb.ModelInfo:
    """The listing's entry completed with what only the details call knows."""
    merged = pb.ModelInfo()
    merged.CopyFrom(listed)
    merged.context_length = details.context_length or listed.context_length
    merged.max_tokens = details.max_tokens or listed.max_tokens
    merged.capabilities[:] = details.capabilities
    for field in ("description", "parameters", "quantization", "family", "format"):
        if not getattr(merged, field):
            setattr(merged, field, getattr(details, field))
    for key, value in details.metadata.items():
        merged.metadata.setdefault(key, value)
    merged.details_loaded = True
    return merged


class ModelRegistry:
    """Every configured provider's models, cached, searchable and resolvable."""

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        ttl_seconds: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self._providers: dict[str, Provider] = {}
        for provider in providers:
            if provider.name in self._providers:
                raise ValueError(f"two providers are named {provider.name!r}")
            self._providers[provider.name] = provider
        self._ttl = ttl_seconds
        self._clock = clock
        self._listing_cache: dict[str, _Listing] = {}
        self._refreshes: dict[str, asyncio.Task[_Listing]] = {}
        self._details: dict[tuple[str, str], _Details] = {}

    # -- providers ---------------------------------------------------------

    @property
    def providers(self) -> list[Provider]:
        """The providers, in configuration order."""
        return list(self._providers.values())

    def provider(self, name: str) -> Provider:
        """The provider called `name`; NOT_FOUND (PROVIDER_NOT_FOUND) when there is none."""
        try:
            return self._providers[name]
        except KeyError:
            raise provider_not_found(name, list(self._providers)) from None

    def select(self, name: str = "") -> list[Provider]:
        """The provider called `name`, or every provider when `name` is empty."""
        return [self.provider(name)] if name else self.providers

    async def aclose(self) -> None:
        """Stop refreshes in flight and close every provider."""
        for task in self._refreshes.values():
            task.cancel()
        for provider in self._providers.values():
            try:
                await provider.aclose()
            except Exception:
                log.exception("error while closing provider %s", provider.name)

    # -- listings ----------------------------------------------------------

    def _fresh(self, fetched_at: float, max_age: float | None = None) -> bool:
        return self._clock() - fetched_at < (self._ttl if max_age is None else max_age)

    async def _fetch(self, provider: Provider) -> _Listing:
        models = tuple(await provider.list_models())
        if provider.listing_is_detailed:
            for model in models:
                model.details_loaded = True
        listing = _Listing(models, {m.name: m for m in models}, self._clock())
        self._listing_cache[provider.name] = listing
        return listing

    async def _listing(self, provider: Provider, *, max_age: float | None = None) -> _Listing:
        """The provider's listing if cached less than `max_age` (default: the TTL) ago,
        else fetched by one upstream call shared by every waiter."""
        cached = self._listing_cache.get(provider.name)
        if cached is not None and self._fresh(cached.fetched_at, max_age):
            return cached
        task = self._refreshes.get(provider.name)
        if task is None:
            task = asyncio.ensure_future(self._fetch(provider))
            self._refreshes[provider.name] = task
            task.add_done_callback(lambda done: self._refresh_done(provider.name, done))
        # Shielded: one waiter giving up (a cancelled call) must not cancel the
        # refresh the other waiters are sharing.
        return await asyncio.shield(task)

    def _refresh_done(self, name: str, task: asyncio.Task[_Listing]) -> None:
        if self._refreshes.get(name) is task:
            del self._refreshes[name]
        # Retrieve the outcome so a refresh every waiter abandoned logs no warning.
        if not task.cancelled():
            task.exception()

    async def _details_for(self, provider: Provider, name: str) -> pb.ModelInfo:
        key = (provider.name, name)
        cached = self._details.get(key)
        if cached is not None and self._fresh(cached.fetched_at):
            return cached.model
        details = await provider.model_details(name)
        self._details[key] = _Details(details, self._clock())
        return details

    async def _listings(
        self, providers: list[Provider], *, max_age: float | None = None
    ) -> tuple[list[tuple[Provider, _Listing]], list[tuple[Provider, ServiceError]]]:
        """The providers' listings, fetched at once, and the providers whose listing failed."""
        results = await asyncio.gather(
            *(self._listing(p, max_age=max_age) for p in providers),
            return_exceptions=True,
        )
        listings: list[tuple[Provider, _Listing]] = []
        failed: list[tuple[Provider, ServiceError]] = []
        for owner, result in zip(providers, results, strict=True):
            if isinstance(result, ServiceError):
                failed.append((owner, result))
            elif isinstance(result, BaseException):
                raise result
            else:
                listings.append((owner, result))
        return listings, failed

    async def _with_details(
        self, models: list[tuple[Provider, pb.ModelInfo]]
    ) -> list[pb.ModelInfo]:
        """The models completed with their details (capabilities, context), loaded at need."""
        limit = asyncio.Semaphore(DETAILS_CONCURRENCY)

        async def complete(owner: Provider, listed: pb.ModelInfo) -> pb.ModelInfo:
            if listed.details_loaded:
                return listed
            async with limit:
                try:
                    details = await self._details_for(owner, listed.name)
                except ServiceError as exc:
                    # A model deleted since the listing, or a flaky upstream: the
                    # listing's entry is still worth returning.
                    log.warning("no details for %s: %s", listed.id, exc.message)
                    return listed
            return _merge(listed, details)

        return list(await asyncio.gather(*(complete(owner, m) for owner, m in models)))

    async def list_models(
        self,
        provider: str = "",
        *,
        force_refresh: bool = False,
        capability: pb.ModelCapability = pb.MODEL_CAPABILITY_UNSPECIFIED,
        access: ModelAccess = UNRESTRICTED,
    ) -> tuple[list[pb.ModelInfo], list[pb.ProviderError]]:
        """Models ordered by provider then name, and the providers whose listing failed.

        Every model comes with its details (capabilities, context length):
        listings don't tell them, so they are loaded at need, a bounded number
        at once, and cached like listings. A model whose details call failed is
        listed without them (`details_loaded` false says those fields are
        pending). Raises the first provider's error when every selected
        provider failed.
        """
        selected = self.select(provider)
        listings, failed = await self._listings(selected, max_age=0 if force_refresh else None)
        models = self._allowed(_flatten(listings), access)
        _raise_if_all_failed(selected, failed)
        errors = [
            pb.ProviderError(provider=owner.name, reason=exc.reason, message=exc.message)
            for owner, exc in failed
        ]
        completed = await self._with_details(models)
        if capability == pb.MODEL_CAPABILITY_UNSPECIFIED:
            return completed, errors
        return [m for m in completed if capability in m.capabilities], errors

    # -- single models -----------------------------------------------------

    async def get_model(
        self, model: str, provider: str = "", access: ModelAccess = UNRESTRICTED
    ) -> pb.ModelInfo:
        """One model with details loaded; NOT_FOUND (MODEL_NOT_FOUND) when unknown
        or outside the caller's allowance (the two are not told apart)."""
        try:
            owner, name = await self.resolve(model, provider, access)
        except ServiceError as exc:
            if exc.reason == "MODEL_NOT_ALLOWED":
                raise model_not_found(model) from None
            raise
        details = await self._details_for(owner, name)
        try:
            listing = await self._listing(owner)
        except ServiceError:
            # The details answered; a failing listing only costs the size and digest.
            return details
        listed = _find(listing, name)
        return _merge(listed, details) if listed is not None else details

    def canonical(self, provider: str, name: str) -> str | None:
        """The canonical form of a model name of `provider` (None: no such provider)."""
        owner = self._providers.get(provider)
        return owner.canonical_model_name(name) if owner is not None else None

    def _may_use(self, access: ModelAccess, owner: Provider, name: str) -> bool:
        return access.allows(owner.name, owner.canonical_model_name(name), self.canonical)

    def _allowed(
        self, models: list[tuple[Provider, pb.ModelInfo]], access: ModelAccess
    ) -> list[tuple[Provider, pb.ModelInfo]]:
        if not access.restricted:
            return models
        return [(o, m) for o, m in models if self._may_use(access, o, m.name)]

    async def resolve(
        self, model: str, provider: str = "", access: ModelAccess = UNRESTRICTED
    ) -> tuple[Provider, str]:
        """The provider serving `model` and that provider's own name for it.

        "<provider>/<name>" (or `provider` set) is taken as given without calling
        the upstream: an unknown name fails there, as NOT_FOUND. A bare name is
        looked up in the cached listings and must be served by exactly one provider.
        A model outside `access` is PERMISSION_DENIED (MODEL_NOT_ALLOWED) whether
        it exists or not, decided before any upstream generates anything.
        """
        explicit: Provider | None = None
        name = model
        if provider:
            explicit = self.provider(provider)
            name = model.removeprefix(f"{explicit.name}/")
        else:
            # Split on the first "/" only for a configured provider: hub ids
            # ("meta-llama/Llama-3.1-8B-Instruct") contain slashes of their own.
            prefix, slash, rest = model.partition("/")
            if slash and rest and prefix in self._providers:
                explicit, name = self._providers[prefix], rest
        if explicit is not None:
            if not self._may_use(access, explicit, name):
                raise model_not_allowed(explicit.model_id(name))
            return explicit, name
        hub = self._hub_provider(model)
        try:
            found = await self._lookup(model)
            if not found:
                # The model may have been pulled since the listing was cached.
                found = await self._lookup(model, max_age=min(self._ttl, MISS_REFRESH_SECONDS))
        except ServiceError:
            if hub is None:
                raise
            found = []  # a listing failed; the hub id still goes to the router
        if not found and hub is not None:
            # A hub id ("meta-llama/Llama-3.1-8B-Instruct:fastest") that no
            # listing names: the Hugging Face router serves any hub id, with
            # any routing suffix, and answers NOT_FOUND for an unknown one.
            if not self._may_use(access, hub, model):
                raise model_not_allowed(hub.model_id(model))
            return hub, model
        if access.restricted:
            found = [(o, n) for o, n in found if self._may_use(access, o, n)]
            if not found:
                raise model_not_allowed(model)
        if len(found) == 1:
            return found[0]
        if not found:
            raise model_not_found(model)
        candidates = ", ".join(owner.model_id(name) for owner, name in found)
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "AMBIGUOUS_MODEL",
            f"model {model!r} is served by several providers; name one of: {candidates}",
            domain=DOMAIN,
            metadata={"model": model, "candidates": candidates},
        )

    def _hub_provider(self, model: str) -> Provider | None:
        """The one provider serving any Hugging Face hub id, when `model` is shaped
        like a hub id (`owner/name`, optionally `:provider`, `:fastest` or `:cheapest`)
        and exactly one such provider is configured; else None."""
        owner, slash, rest = model.partition("/")
        if not slash or not owner or not rest.split(":", 1)[0] or "/" in rest:
            return None
        hubs = [p for p in self.providers if p.serves_any_hub_id]
        return hubs[0] if len(hubs) == 1 else None

    async def _lookup(
        self, name: str, *, max_age: float | None = None
    ) -> list[tuple[Provider, str]]:
        """Every provider listing `name`; raises a listing error when it could hide the model."""
        listings, failed = await self._listings(self.providers, max_age=max_age)
        found = [
            (owner, listed.name)
            for owner, listing in listings
            if (listed := _find(listing, name)) is not None
        ]
        # Not found anywhere we could look: an unreachable provider may well
        # have it, and "unavailable" tells the caller more than "not found".
        if not found and failed:
            raise failed[0][1]
        return found

    # -- search ------------------------------------------------------------

    async def search(
        self,
        query: str,
        provider: str = "",
        limit: int = 50,
        access: ModelAccess = UNRESTRICTED,
    ) -> list[pb.ModelInfo]:
        """Models matching every term of `query`, best first: exact name, prefix, substring."""
        terms = query.lower().split()
        phrase = " ".join(terms)
        selected = self.select(provider)
        listings, failed = await self._listings(selected)
        _raise_if_all_failed(selected, failed)
        # Capabilities are searchable, and only details know them.
        models = await self._with_details(self._allowed(_flatten(listings), access))
        ranked: list[tuple[int, int, pb.ModelInfo]] = []
        for order, info in enumerate(models):
            fields = [info.id, info.name, info.description, info.family]
            fields.extend(capability_name(c) for c in info.capabilities)
            haystack = "\n".join(fields).lower()
            if all(term in haystack for term in terms):
                ranked.append((_rank(info, phrase), order, info))
        ranked.sort(key=lambda item: item[:2])
        return [info for _, _, info in ranked[:limit]]

    # -- health ------------------------------------------------------------

    async def health(self, provider: str = "") -> list[pb.ProviderHealth]:
        """Probe the selected providers at once; a healthy one also reports its model count."""

        async def check(owner: Provider) -> pb.ProviderHealth:
            health = await owner.probe()
            if health.status == pb.HEALTH_STATUS_HEALTHY:
                try:
                    health.models_count = len((await self._listing(owner)).models)
                except ServiceError as exc:
                    health.status = pb.HEALTH_STATUS_UNHEALTHY
                    health.available = False
                    health.error = exc.message
            return health

        return list(await asyncio.gather(*(check(p) for p in self.select(provider))))


def _raise_if_all_failed(
    selected: list[Provider], failed: list[tuple[Provider, ServiceError]]
) -> None:
    """Partial results are results; none at all is the first provider's error."""
    if failed and len(failed) == len(selected):
        raise failed[0][1]


def _flatten(listings: list[tuple[Provider, _Listing]]) -> list[tuple[Provider, pb.ModelInfo]]:
    return [(owner, model) for owner, listing in listings for model in listing.models]


def _find(listing: _Listing, name: str) -> pb.ModelInfo | None:
    found = listing.by_name.get(name)
    if found is None and ":" not in name:
        found = listing.by_name.get(name + DEFAULT_TAG)
    return found


def _rank(info: pb.ModelInfo, phrase: str) -> int:
    name, model_id = info.name.lower(), info.id.lower()
    if phrase in (name, model_id, name.removesuffix(DEFAULT_TAG)):
        return 0
    if name.startswith(phrase) or model_id.startswith(phrase):
        return 1
    return 2
