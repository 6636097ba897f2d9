"""Text files -> token shards (`lmstack.data.shards` describes the directory), what pretraining reads.

Every document is followed by the eos id, so the model learns where documents end. The split is by
document: a seeded hash of the document's index decides train or val, so reruns give the same split.
Inputs: every format `lmstack.data.files` reads (.txt/.md: a file is a document; .jsonl, .json, .csv,
.parquet: records with a text field), and directories of them.
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

from lmstack.data.files import iter_documents, resolve_inputs
from lmstack.data.shards import META_FORMAT, TokenShardWriter
from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer
from lmstack.utils.io import atomic_write_text


def _in_val(index: int, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


# Worker state for multi-process encoding: each process loads the tokenizer once.
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
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
    if not 0.0 <= val_fraction < 1.0:
        raise LmstackError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = resolve_inputs(inputs)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise LmstackError(f"tokenizer in {tokenizer_dir} has no eos token; documents need a separator")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    writers = {split: TokenShardWriter(out, split, dtype) for split in ("train", "val")}
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


def _ensure_both_splits(writers: dict[str, TokenShardWriter], val_fraction: float) -> None:
    """With few documents the hash may put none in val (or train); move the last one over."""
    train, val = writers["train"], writers["val"]
    if val_fraction > 0 and val.documents == 0 and train.documents > 1:
        last = train.pending.pop()
        train.tokens -= last.size
        train.documents -= 1
        val.add(last.tolist(), 0)
    if train.documents == 0:
        raise LmstackError("every document landed in the validation split; lower --val-fraction")
