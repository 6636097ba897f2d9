"""The binary GGUF reader: metadata and tensor table parsed from a memory-mapped file.

`gguf.GGUFReader` builds one numpy view per array element, which costs ~3 s on SmolLM2's 49k-token
vocabulary alone; this reader takes ~0.1 s and is tested against `GGUFReader`. Tensor data stays
memory-mapped; `dequantize_tensor` turns one tensor into fp32 with the gguf library's arithmetic.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmstack.errors import LmstackError

GGUF_MAGIC = b"GGUF"
# Tensor types we dequantize (all through gguf.quants). Others are rejected with a clear error.
SUPPORTED_QUANTS = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)

# GGUF metadata value types (GGUFValueType): fixed-size scalars as struct formats.
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (rows last-but-one, columns last): GGUF's dims reversed
    qtype: int  # gguf.GGMLQuantizationType value
    data: np.ndarray  # uint8 view into the mapped file, shape (*shape[:-1], bytes_per_row)

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"type {self.qtype}"


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    """Sequential little-endian reads from the mapped header, with truncation checks."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise LmstackError(
                f"{self.path} is truncated or corrupt: {what} runs past the end of the file "
                f"({self.size:,} bytes); re-download or re-export it"
            )

    def scalar(self, vtype: int, what: str):
        fmt = _SCALAR[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str):
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type = self.scalar(4, what)
            count = self.scalar(10, what)
            if item_type == _STRING:
                return self._strings(count, what)
            if item_type in _NUMPY:
                width = np.dtype(_NUMPY[item_type]).itemsize
                self.need(count * width, what)
                arr = np.frombuffer(self.buf, dtype=_NUMPY[item_type], count=count, offset=self.pos)
                self.pos += count * width
                return arr.tolist()
            return [self.value(item_type, what) for _ in range(count)]
        if vtype not in _SCALAR:
            raise LmstackError(f"{self.path} is corrupt: unknown metadata value type {vtype} in {what}")
        return self.scalar(vtype, what)

    def _strings(self, count: int, what: str) -> list[str]:
        # The hot loop for vocabularies and merges (~100k strings): plain struct + bytes slicing.
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, what)
            append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor data stays memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"GGUF file {str(path)!r} not found; pass an existing .gguf file")
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise LmstackError(f"{path} is empty; it is not a GGUF file") from None
    cur = _Cursor(buf, path)
    cur.need(4, "the magic number")
    if buf[:4] != GGUF_MAGIC:
        raise LmstackError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a llama.cpp .gguf")
    cur.pos = 4
    version = cur.scalar(4, "the version")
    if version not in (2, 3):
        raise LmstackError(f"{path} is GGUF version {version}; supported are versions 2 and 3")
    n_tensors = cur.scalar(10, "the tensor count")
    n_kv = cur.scalar(10, "the metadata count")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.scalar(4, f"metadata {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar(4, f"tensor {name!r}")
        dims = [cur.scalar(10, f"tensor {name!r}") for _ in range(n_dims)]
        qtype = cur.scalar(4, f"tensor {name!r}")
        offset = cur.scalar(10, f"tensor {name!r}")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    whole = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for name, shape, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise LmstackError(
                f"{path}: tensor {name!r} has unknown GGML type {qtype}; supported types: {', '.join(SUPPORTED_QUANTS)}"
            ) from None
        cols = shape[-1] if shape else 1
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        if cols % block:
            raise LmstackError(f"{path} is corrupt: tensor {name!r} row of {cols} is not a multiple of {block}")
        row_bytes = cols // block * type_size
        start = data_start + offset
        end = start + rows * row_bytes
        if end > len(buf):
            raise LmstackError(
                f"{path} is truncated or corrupt: tensor {name!r} needs bytes up to {end:,} but the file has "
                f"{len(buf):,}; re-download or re-export it"
            )
        data = whole[start:end].reshape(*shape[:-1], row_bytes) if shape else whole[start:end]
        tensors[name] = GGUFTensor(name, shape, qtype, data)
    return GGUFFile(path, version, metadata, tensors)


def dequantize_tensor(t: GGUFTensor, path: Path) -> torch.Tensor:
    """A GGUF tensor as a writable fp32 torch tensor.

    The arithmetic is the gguf library's (`gguf.quants.<TYPE>.dequantize_blocks`); we only feed it
    cache-sized chunks and write into one preallocated array. `gguf.quants.dequantize` itself cuts every
    tensor into 16-row groups and concatenates the results, which is ~5x slower and holds two copies
    (tests check both give identical values).
    """
    if t.type_name not in SUPPORTED_QUANTS:
        raise LmstackError(
            f"{path}: tensor {t.name!r} is stored as {t.type_name}, which lmstack cannot dequantize; "
            f"supported types: {', '.join(SUPPORTED_QUANTS)}. Re-quantize it with llama-quantize"
        )
    qtype = GGMLQuantizationType(t.qtype)
    rows = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim else t.data.reshape(1, -1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    # Allocated by torch (64-byte aligned like every torch tensor), filled through a numpy view of it.
    result = torch.empty(rows.shape[0], rows.shape[1] // type_size * block, dtype=torch.float32)
    out = result.numpy()
    if qtype == GGMLQuantizationType.F32:
        out[:] = rows.view(np.float32)  # a copy: the mapping is read-only
    elif qtype == GGMLQuantizationType.F16:
        out[:] = rows.view(np.float16)
    else:
        quant = getattr(gguf.quants, qtype.name)
        step = max(1, (1 << 16) // out.shape[1])  # ~256 KB of output per call stays in cache
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            blocks = quant.dequantize_blocks(chunk.reshape(-1, type_size))
            out[start : start + step] = blocks.reshape(chunk.shape[0], -1)
    return result.reshape(t.shape)
