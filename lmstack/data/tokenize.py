"""Text files -> token shards (`lmstack.data.shards` describes the directory), what pretraining reads.

Every document is followed by the eos id, so the model learns where documents end.

The validation split holds about `val_fraction` of the text (counted in bytes), chosen by `plan_split`:
  documents  when there are enough of them: a seeded hash of each document's index decides train or
             val (reruns give the same split), used when it puts at least MIN_VAL_DOCUMENTS documents
             and between half and twice the requested share of the bytes in val;
  spans      otherwise (a folder of a few big files, one book, a few huge documents among small
             ones): the last `val_fraction` of every document, cut at a line break near the cut, is
             held out, so both splits see every source. Each piece is followed by the eos id.
When neither gets close to the requested share (documents too short to cut) a warning says so. Bytes
are counted for every split, so evaluation reports bits per byte on either.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmstack.data.files import iter_documents, resolve_inputs
from lmstack.data.shards import META_FORMAT, TokenShardWriter
from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer
from lmstack.utils.io import atomic_write_text

MIN_VAL_DOCUMENTS = 4  # fewer held-out documents than this is a split by luck, not by fraction


@dataclass
class SplitPlan:
    """What goes where: the corpus as (text, split) pieces in order, how it was split, the val share."""

    pieces: list[tuple[str, str]]
    method: str  # "documents" | "spans" | "none" (val_fraction 0)
    val_share: float  # fraction of the corpus's UTF-8 bytes in the val split
    warning: str | None = None


def _in_val(index: int, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _near(share: float, fraction: float) -> bool:
    return fraction / 2 <= share <= 2 * fraction


def plan_split(docs: list[str], val_fraction: float, seed: int) -> SplitPlan:
    """Split by document when that lands near `val_fraction` of the bytes, else by spans inside documents."""
    if val_fraction == 0:
        return SplitPlan([(doc, "train") for doc in docs], "none", 0.0)
    sizes = [len(doc.encode("utf-8")) for doc in docs]
    total = sum(sizes)
    in_val = [_in_val(i, seed, val_fraction) for i in range(len(docs))]
    val_bytes = sum(size for size, v in zip(sizes, in_val, strict=True) if v)
    if MIN_VAL_DOCUMENTS <= sum(in_val) < len(docs) and _near(val_bytes / total, val_fraction):
        pieces = [(doc, "val" if v else "train") for doc, v in zip(docs, in_val, strict=True)]
        return SplitPlan(pieces, "documents", val_bytes / total)
    pieces = []
    for doc in docs:
        cut = _span_cut(doc, val_fraction)
        pieces += [(part, split) for part, split in ((doc[:cut], "train"), (doc[cut:], "val")) if part]
    val_bytes = sum(len(text.encode("utf-8")) for text, split in pieces if split == "val")
    if val_bytes == 0:
        raise LmstackError(
            "too little text to hold out a validation split (every document is a single character); "
            "give more text or pass --val-fraction 0"
        )
    plan = SplitPlan(pieces, "spans", val_bytes / total)
    if not _near(plan.val_share, val_fraction):
        plan.warning = (
            f"the validation split holds {plan.val_share:.1%} of the text instead of the requested "
            f"{val_fraction:.1%}: the documents are too short to cut near that fraction; give longer "
            "documents or adjust --val-fraction"
        )
    return plan


def _span_cut(text: str, val_fraction: float) -> int:
    """Where the held-out tail of `text` starts: about `val_fraction` of it from the end, moved to the
    nearest line break (else space) within a quarter of the tail's length, never empty on either side."""
    if len(text) < 2:
        return len(text)
    target = min(max(1, round(len(text) * (1 - val_fraction))), len(text) - 1)
    reach = max(1, (len(text) - target) // 4)
    lo, hi = max(1, target - reach), min(len(text) - 1, target + reach)
    for sep in ("\n", " "):
        before, after = text.rfind(sep, lo, target + 1), text.find(sep, target, hi + 1)
        candidates = [i + 1 for i in (before, after) if i != -1 and i + 1 < len(text)]
        if candidates:
            return min(candidates, key=lambda i: abs(i - target))
    return target


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
    plan = plan_split(docs, val_fraction, seed)
    del docs
    if plan.warning:
        print(f"warning: {plan.warning}", file=sys.stderr)
    texts = [text for text, _ in plan.pieces]
    bar = tqdm(total=len(texts), desc="tokenize", unit="doc", file=sys.stderr, disable=None)
    pool = (
        ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) if workers > 1 else None
    )
    try:
        batches = _batched(iter(texts), 256)
        encoded_batches = pool.map(_encode_chunk, batches) if pool else (tokenizer.encode_batch(b) for b in batches)
        pieces = iter(plan.pieces)
        for batch_ids in encoded_batches:
            for ids in batch_ids:
                text, split = next(pieces)
                writers[split].add([*ids, tokenizer.eos_id], len(text.encode("utf-8")))
            bar.update(len(batch_ids))
    finally:
        bar.close()
        if pool:
            pool.shutdown()
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
        "split": {
            "method": plan.method,
            "val_fraction": val_fraction,
            "val_share_of_bytes": round(plan.val_share, 6),
            **({"warning": plan.warning} if plan.warning else {}),
        },
        "splits": {split: w.summary() for split, w in writers.items()},
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta
