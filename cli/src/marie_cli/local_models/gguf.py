"""A GGUF file's block-quantised tensors rewritten as 16-bit floats.

The pinned llama-server build was compiled for processors with AVX-VNNI:
its 4- and 8-bit dot products use the VEX-encoded `vpdpbusd`, which other
AVX-512 processors (AMD Zen 4, Intel before Alder Lake) lack, so llama-server
dies with SIGILL on the first token of a Q4_1 model there. Its F16 path uses
no such instruction. On those machines the model is converted once (135 M
weights: ~270 MB, ~15 s) and cached beside the original.

Only what SmolLM2's file holds is handled: Q4_1 and Q8_0 tensors are
dequantised, F32/F16 ones copied; metadata is copied byte for byte except
`general.file_type`, which becomes MOSTLY_F16. GGUF v2/v3 layout: header,
key/values, tensor infos, padding to `general.alignment`, tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
MOSTLY_F16 = 1
# Key/value types: fixed sizes of the scalars; 8 is a string, 9 an array.
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4
# Bytes per block and weights per block of the types this reads.
BLOCKS = {F32: (4, 1), F16: (2, 1), Q4_1: (20, 32), Q8_0: (34, 32)}


class GGUFError(ValueError):
    """The file is not a GGUF this converter understands."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.at : self.at + size]
        if len(chunk) != size:
            raise GGUFError("truncated GGUF header")
        self.at += size
        return chunk

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.take(8))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_value(self, kind: int) -> None:
        if kind == STRING:
            self.string()
        elif kind == ARRAY:
            item, count = self.u32(), self.u64()
            if item in SCALAR_SIZES:
                self.take(SCALAR_SIZES[item] * count)
            else:
                for _ in range(count):
                    self.skip_value(item)
        elif kind in SCALAR_SIZES:
            self.take(SCALAR_SIZES[kind])
        else:
            raise GGUFError(f"unknown GGUF value type {kind}")


def _dequantise(kind: int, raw: bytes) -> np.ndarray:
    """Q4_1 or Q8_0 blocks as float16, in the same element order."""
    if kind == Q4_1:
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 20)
        scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        low = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[:, 4:20]
        quants = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
        return (quants * scale + low).astype(np.float16).reshape(-1)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 34)
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, 2:34].copy().view(np.int8).astype(np.float32)
    return (quants * scale).astype(np.float16).reshape(-1)


def _pad(out: BinaryIO, alignment: int) -> None:
    out.write(b"\0" * (-out.tell() % alignment))


@dataclass
class _Layout:
    """What the header says: everything the rewrite needs to know."""

    version: int
    metadata: bytes  # the key/values, `general.file_type` already MOSTLY_F16
    kv_count: int
    alignment: int
    tensors: list[tuple[bytes, list[int], int, int]]  # name, dims, type, offset
    data_start: int


def _layout(data: bytes, source: Path) -> _Layout:
    reader = _Reader(data)
    if reader.take(4) != MAGIC:
        raise GGUFError(f"{source} is not a GGUF file")
    version = reader.u32()
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported")
    tensor_count, kv_count = reader.u64(), reader.u64()
    kv_start = reader.at
    alignment = DEFAULT_ALIGNMENT
    file_type_at: int | None = None
    for _ in range(kv_count):
        key = reader.string()
        kind = reader.u32()
        if key == b"general.alignment" and kind == UINT32:
            alignment = struct.unpack_from("<I", data, reader.at)[0]
        if key == b"general.file_type" and kind == UINT32:
            file_type_at = reader.at - kv_start
        reader.skip_value(kind)
    metadata = bytearray(data[kv_start : reader.at])
    if file_type_at is not None:
        struct.pack_into("<I", metadata, file_type_at, MOSTLY_F16)
    tensors = []
    for _ in range(tensor_count):
        name = reader.string()
        dims = [reader.u64() for _ in range(reader.u32())]
        kind, offset = reader.u32(), reader.u64()
        if kind not in BLOCKS:
            raise GGUFError(f"tensor {name.decode()} has type {kind}, which is not converted")
        tensors.append((name, dims, kind, offset))
    data_start = reader.at + (-reader.at % alignment)
    return _Layout(version, bytes(metadata), kv_count, alignment, tensors, data_start)


def to_f16(source: Path, target: Path) -> None:
    """Write `target`: `source` with every Q4_1/Q8_0 tensor as F16."""
    data = source.read_bytes()
    layout = _layout(data, source)
    alignment = layout.alignment
    partial = target.with_name(target.name + ".part")
    with partial.open("wb") as out:
        out.write(MAGIC + struct.pack("<IQQ", layout.version, len(layout.tensors), layout.kv_count))
        out.write(layout.metadata)
        offset = 0
        converted: list[tuple[bytes, int]] = []
        for name, dims, kind, source_offset in layout.tensors:
            count = int(np.prod(dims))
            block_bytes, per_block = BLOCKS[kind]
            raw = data[layout.data_start + source_offset :][: count // per_block * block_bytes]
            body = raw if kind in (F32, F16) else _dequantise(kind, raw).tobytes()
            new_kind = kind if kind in (F32, F16) else F16
            out.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims)))
            out.write(struct.pack(f"<{len(dims)}Q", *dims))
            out.write(struct.pack("<IQ", new_kind, offset))
            converted.append((body, offset))
            offset += len(body) + (-len(body) % alignment)
        _pad(out, alignment)
        base = out.tell()
        for body, at in converted:
            out.write(b"\0" * (base + at - out.tell()))
            out.write(body)
        _pad(out, alignment)
    partial.replace(target)
