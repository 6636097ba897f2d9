"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

The GPT-3 recipe (Brown et al. 2020, appendix C) with its default of 13 words: every evaluation item
contributes its word 13-grams (items shorter than that contribute themselves whole, if they have at
least `min_item_words` words, so "Yes." never removes anything). Words are compared after `simplify`
(case, punctuation and spacing ignored). N-grams are hashed with the same vectorized token hashing as
MinHash, so checking a document is a numpy set-membership test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmstack.data.curate.base import Filter
from lmstack.data.curate.dedup import shingle_hashes, word_token_hashes
from lmstack.data.curate.document import Document
from lmstack.data.curate.text import simplify
from lmstack.errors import LmstackError, require


@dataclass
class DecontamConfig:
    eval_sets: list[str] = field(default_factory=list)  # .txt (an item per line), .jsonl/.json (text_fields)
    text_fields: list[str] = field(default_factory=lambda: ["text", "question", "answer", "prompt", "context"])
    ngram: int = 13
    min_item_words: int = 8

    def build(self, base: Path = Path(".")) -> DecontamFilter:
        require(bool(self.eval_sets), "decontaminate needs `eval_sets:` (files of evaluation items)")
        require(self.ngram >= 1, f"decontaminate.ngram must be >= 1, got {self.ngram}")
        return DecontamFilter(self, base)


def load_eval_items(path: Path, text_fields: list[str]) -> list[str]:
    if not path.is_file():
        raise LmstackError(f"evaluation set {str(path)!r} not found; fix decontaminate.eval_sets")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    else:
        raise LmstackError(f"evaluation set {str(path)!r}: use .txt (one item per line), .jsonl or .json")
    items = []
    for record in records:
        if isinstance(record, str):
            items.append(record)
        elif isinstance(record, dict):
            items.extend(_strings(record[f]) for f in text_fields if f in record)
    return [i for i in items if i.strip()]


def _strings(value) -> str:
    """Flatten a field (a string, or a list such as multiple-choice options) into one text."""
    if isinstance(value, list):
        return " ".join(_strings(v) for v in value)
    return str(value)


def ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram (whole text if shorter), with the text index of each."""
    token_hash, doc_of_token = word_token_hashes([simplify(t) for t in texts])
    return shingle_hashes(token_hash, doc_of_token, len(texts), n)


class DecontamFilter(Filter):
    name = "decontaminate"

    def __init__(self, cfg: DecontamConfig, base: Path):
        self.cfg = cfg
        self.index: dict[int, np.ndarray] = {}  # n-gram length -> sorted hashes of that length
        self.set_of_hash: dict[int, str] = {}
        for raw in cfg.eval_sets:
            path = Path(raw) if Path(raw).is_absolute() else base / raw
            items = load_eval_items(path, cfg.text_fields)
            lengths = np.array([len(simplify(i).split()) for i in items])
            usable = [i for i, k in zip(items, lengths, strict=True) if k >= cfg.min_item_words]
            for k in sorted({min(int(k), cfg.ngram) for k in lengths if k >= cfg.min_item_words}):
                group = [i for i in usable if min(len(simplify(i).split()), cfg.ngram) == k]
                hashes, _ = ngram_hashes(group, k)
                self.index[k] = np.union1d(self.index.get(k, np.zeros(0, np.uint64)), hashes)
                self.set_of_hash.update(dict.fromkeys(hashes.tolist(), path.stem))

    def reason_to_drop(self, doc: Document) -> str | None:
        for k, table in self.index.items():
            hashes, _ = ngram_hashes([doc.text], k)
            hits = hashes[np.isin(hashes, table)]
            if hits.size:
                return f"overlap_{self.set_of_hash[int(hits[0])]}"
        return None
