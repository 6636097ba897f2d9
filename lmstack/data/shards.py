"""Token shards: the artifact pretraining and evaluation read, written by `lmstack data tokenize`.

A shard directory holds
  meta.json            format, dtype, vocab size, eos id, per split: shard files, tokens, documents, bytes
  tokenizer/           a copy of the tokenizer used, so a run never pairs shards with the wrong vocabulary
  train_000000.bin ... flat little-endian uint16 (vocab <= 65,535) or uint32 token ids
  val_000000.bin ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import LmstackError
from lmstack.utils.io import atomic_path

SHARD_TOKENS = 100_000_000  # tokens per shard file
META_FORMAT = "lmstack-tokens-v1"


class TokenShardWriter:
    """Appends token arrays to one split's numbered shard files; each shard is written atomically when full."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
        """One document (or span of one) with the number of UTF-8 bytes of text it encodes."""
        arr = np.asarray(ids, dtype=self.dtype)
        self.pending.append(arr)
        self.pending_tokens += arr.size
        self.tokens += arr.size
        self.documents += 1
        self.bytes += n_bytes
        if self.pending_tokens >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        with atomic_path(self.out_dir / name) as tmp:
            np.concatenate(self.pending).tofile(tmp)
        self.shards.append(name)
        self.pending, self.pending_tokens = [], 0

    def summary(self) -> dict[str, Any]:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise LmstackError(
            f"no meta.json in {str(data_dir)!r}; create token shards first with "
            "`lmstack data tokenize --input TEXT --tokenizer DIR --out DIR`"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != META_FORMAT:
        raise LmstackError(f"{path} is not an lmstack token-shard index (format {meta.get('format')!r})")
    return meta


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    """All shards of a split as one array (memory-mapped; concatenated only when there are several)."""
    meta = load_meta(data_dir)
    info = meta["splits"].get(split)
    if not info or not info["shards"]:
        raise LmstackError(f"{data_dir} has no {split!r} tokens; re-tokenize with a non-zero --val-fraction")
    arrays = []
    for name in info["shards"]:
        path = Path(data_dir) / name
        if not path.is_file():
            raise LmstackError(f"shard {path} listed in meta.json is missing; re-run `lmstack data tokenize`")
        arrays.append(np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r"))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
