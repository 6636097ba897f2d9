"""Text files -> token shards: the artifact pretraining reads.

Output directory:
  meta.json            format, dtype, vocab size, eos id, per split: shard files, tokens, documents, bytes
  tokenizer/           a copy of the tokenizer used, so a run never pairs shards with the wrong vocabulary
  train_000000.bin ... flat little-endian uint16 (vocab <= 65,535) or uint32 token ids
  val_000000.bin ...

Every document is followed by the eos id, so the model learns where documents end. The split is by
document: a seeded hash of the document's index decides train or val, so reruns give the same split.
Inputs: .txt/.md (a file is a document), .jsonl (one JSON object per line, field `text`), .parquet
(column `text`), and directories of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmstack.errors import LmstackError
from lmstack.utils.io import atomic_path, atomic_write_text

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
SHARD_TOKENS = 100_000_000  # tokens per shard file
META_FORMAT = "lmstack-tokens-v1"


def resolve_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand directories, check that every input exists and that some text is there."""
    if not inputs:
        raise LmstackError("no input given; pass --input FILE_OR_DIR (.txt, .md, .jsonl or .parquet)")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise LmstackError(f"directory {str(path)!r} holds no .txt, .md, .jsonl or .parquet files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise LmstackError(f"{str(path)!r}: unsupported file type; use .txt, .md, .jsonl or .parquet")
            files.append(path)
        else:
            raise LmstackError(f"input {str(path)!r} does not exist; check the path")
    if all(f.stat().st_size == 0 for f in files):
        raise LmstackError(f"the inputs are empty: {', '.join(map(str, files))}; give files with text")
    return files


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        elif suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, text_field)


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LmstackError(f"{path}:{line_no}: malformed JSON ({exc.msg}); fix or remove that line") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise LmstackError(f"{path}:{line_no}: no string field {field!r}; pass --text-field NAME")
            if text.strip():
                yield text


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise LmstackError(f"{path}: not a readable parquet file ({exc})") from None
    if field not in table.schema_arrow.names:
        raise LmstackError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _in_val(index: int, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


# Worker state for multi-process encoding: each process loads the tokenizer once.
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    from lmstack.tokenizer import Tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_TOKENIZER = Tokenizer.load(tokenizer_dir)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return _WORKER_TOKENIZER.encode_batch(texts)


def _batched(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Appends token arrays to numbered shard files; each shard is written atomically when full."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
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
        return {
            "shards": self.shards,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
        }


def tokenize_corpus(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    workers: int = 0,
    seed: int = 0,
    text_field: str = "text",
) -> dict[str, Any]:
    """Encode documents with an eos after each into memmap-able shards + meta.json. Returns the meta."""
    from lmstack.tokenizer import Tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise LmstackError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = resolve_inputs(inputs)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise LmstackError(f"tokenizer in {tokenizer_dir} has no eos token; documents need a separator")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    writers = {split: _ShardWriter(out, split, dtype) for split in ("train", "val")}
    workers = workers or min(4, os.cpu_count() or 1)

    docs = list(iter_documents(files, text_field))
    if not docs:
        raise LmstackError(f"no non-empty documents in {', '.join(map(str, inputs))}")
    if val_fraction > 0 and len(docs) < 2:
        docs = _split_single_document(docs[0], val_fraction)
    index = 0
    batches = _batched(iter(docs), 256)
    bar = tqdm(total=len(docs), desc="tokenize", unit="doc", file=sys.stderr, disable=None)
    pool = (
        ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) if workers > 1 else None
    )
    try:
        encoded_batches = pool.map(_encode_chunk, batches) if pool else (tokenizer.encode_batch(b) for b in batches)
        for batch_docs, batch_ids in zip(_batched(iter(docs), 256), encoded_batches, strict=True):
            for text, ids in zip(batch_docs, batch_ids, strict=True):
                split = "val" if val_fraction > 0 and _in_val(index, seed, val_fraction) else "train"
                writers[split].add([*ids, tokenizer.eos_id], len(text.encode("utf-8")))
                index += 1
            bar.update(len(batch_docs))
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    _ensure_both_splits(writers, val_fraction)
    for w in writers.values():
        w.flush()
    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    meta = {
        "format": META_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "tokenizer": "tokenizer",
        "sources": [str(f) for f in files],
        "splits": {split: w.summary() for split, w in writers.items()},
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def _split_single_document(text: str, val_fraction: float) -> list[str]:
    """One long document cannot be split by document; cut it at a line break near the end instead."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
    return [text[:cut], text[cut:]]


def _ensure_both_splits(writers: dict[str, _ShardWriter], val_fraction: float) -> None:
    """With few documents the hash may put none in val (or train); move the last one over."""
    train, val = writers["train"], writers["val"]
    if val_fraction > 0 and val.documents == 0 and train.documents > 1:
        last = train.pending.pop()
        train.tokens -= last.size
        train.documents -= 1
        val.add(last.tolist(), 0)
    if train.documents == 0:
        raise LmstackError("every document landed in the validation split; lower --val-fraction")


# --- Reading shards (used by training and evaluation) -------------------------------------------


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
