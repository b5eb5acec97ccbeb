"""The response cache on OpenSearch (`MARIE_PROVIDERS_CACHE_STORE=opensearch`),
shared by every providers replica: one document per entry, its id the key.

Expired entries and, past the size limit, the oldest ones are deleted by a
sweep that a write starts at most once per `SWEEP_SECONDS` (never on a
lookup). Between sweeps the index may run over its limit by what was
written meanwhile.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from marie_kit.settings import opensearch_hosts
from opensearchpy import AsyncOpenSearch, NotFoundError, RequestError

from marie_providers.cache.store import Entry

log = logging.getLogger("marie.providers.cache")

SWEEP_SECONDS = 60.0
#: Longest a write or sweep request may take (lookups are bounded by the caller).
WRITE_TIMEOUT_SECONDS = 10
#: Entries one eviction round reads, oldest first.
EVICT_PAGE = 1000
#: A sweep over the size limit frees a tenth of it more, so it is not at once over again.
_EVICT_FRACTION = 0.1

MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "tenant": {"type": "keyword"},
        "operation": {"type": "keyword"},
        "stored": {"type": "double"},
        "expires": {"type": "double"},
        "size": {"type": "long"},
        # Base64 of the serialized answer: stored, never indexed.
        "body": {"type": "binary"},
    },
}


class OpenSearchCacheStore:
    """Response cache entries in one OpenSearch index."""

    def __init__(self, client: AsyncOpenSearch, index: str, max_bytes: int) -> None:
        self._client = client
        self._index = index
        self._max_bytes = max_bytes
        self._swept = 0.0
        self._created = False

    @classmethod
    async def open(cls, url: str, *, prefix: str, max_bytes: int) -> OpenSearchCacheStore:
        """The store; it asks nothing of the cluster yet (a cache never keeps
        the service from starting): the index is made by the first write."""
        client = AsyncOpenSearch(hosts=opensearch_hosts(url), timeout=WRITE_TIMEOUT_SECONDS)
        return cls(client, f"{prefix}_providers_cache", max_bytes)

    async def _create(self) -> None:
        if await self._client.indices.exists(index=self._index):
            return
        try:
            await self._client.indices.create(index=self._index, body={"mappings": MAPPINGS})
        except RequestError as exc:  # another replica made it meanwhile
            if "already_exists" not in str(exc.error):
                raise

    async def get(self, key: str, tenant: str, now: float) -> Entry | None:
        try:
            found = await self._client.get(index=self._index, id=key)
        except NotFoundError:  # no such entry, or no index yet
            return None
        s = found["_source"]
        if s["tenant"] != tenant or s["expires"] <= now:
            return None
        return Entry(
            key, s["tenant"], s["operation"], s["stored"], s["expires"], base64.b64decode(s["body"])
        )

    async def put(self, entry: Entry) -> None:
        if not self._created:
            await self._create()
            self._created = True
        await self._client.index(
            index=self._index,
            id=entry.key,
            body={
                "tenant": entry.tenant,
                "operation": entry.operation,
                "stored": entry.stored,
                "expires": entry.expires,
                "size": len(entry.body),
                "body": base64.b64encode(entry.body).decode(),
            },
        )
        if time.monotonic() - self._swept >= SWEEP_SECONDS:
            self._swept = time.monotonic()
            await self.sweep(entry.stored)

    async def sweep(self, now: float) -> None:
        """Delete the expired entries, then the oldest while over the size limit."""
        await self._client.delete_by_query(
            index=self._index,
            body={"query": {"range": {"expires": {"lte": now}}}},
            refresh=True,
            conflicts="proceed",
        )
        answer = await self._client.search(
            index=self._index,
            body={"size": 0, "aggs": {"total": {"sum": {"field": "size"}}}},
        )
        total = int(answer["aggregations"]["total"]["value"])
        if total <= self._max_bytes:
            return
        free = total - self._max_bytes + int(self._max_bytes * _EVICT_FRACTION)
        hits = (
            await self._client.search(
                index=self._index,
                body={
                    "size": EVICT_PAGE,
                    "sort": [{"stored": "asc"}],
                    "_source": ["size"],
                },
            )
        )["hits"]["hits"]
        doomed: list[dict[str, Any]] = []
        for hit in hits:
            if free <= 0:
                break
            doomed.append({"delete": {"_index": self._index, "_id": hit["_id"]}})
            free -= int(hit["_source"]["size"])
        if doomed:
            await self._client.bulk(body=doomed, refresh=True)
        log.info("response cache evicted", extra={"entries": len(doomed)})

    async def close(self) -> None:
        await self._client.close()
