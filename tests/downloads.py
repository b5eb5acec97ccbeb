"""Pinned downloads for the tests' real components (OpenSearch's Maven
artifacts, Debian's Prometheus): fetched once into a cache, their SHA-256
checked against the pinned one every time they are used."""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
from pathlib import Path

DOWNLOAD_TIMEOUT_SECONDS = 120.0


class DownloadFailed(RuntimeError):
    """The file could not be downloaded, or is not the pinned one."""


def fetch_pinned(url: str, sha256: str, path: Path) -> Path:
    """`path`, downloaded from `url` first when missing; a file whose SHA-256
    is not `sha256` is removed and refused."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".part")
        try:
            with (
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as reply,
                partial.open("wb") as out,
            ):
                shutil.copyfileobj(reply, out, 1 << 20)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise DownloadFailed(f"cannot download {url}: {exc}") from exc
        partial.replace(path)
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        path.unlink()
        raise DownloadFailed(
            f"{path.name}: SHA-256 {digest.hexdigest()} is not the pinned "
            f"{sha256}; the cached file was removed"
        )
    return path
