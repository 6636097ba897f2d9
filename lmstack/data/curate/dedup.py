"""Deduplication: exact (hash of the simplified text) and near-duplicate (MinHash + LSH + union-find).

MinHash is vectorized in numpy instead of datasketch's per-shingle Python loop:
1. tokens (words as UTF-8 byte runs, or characters as code points) are hashed all at once with a
   polynomial prefix-sum hash over the whole batch's bytes, then mixed with splitmix64;
2. n consecutive token hashes are combined into one 32-bit shingle hash per position;
3. all permutations are one (n_shingles, n_perm) multiply-shift universal-hash op,
   h(x) = ((a*x + b) mod 2**64) >> 32 (Dietzfelbinger et al. 1997), reduced with a per-document min.
LSH cuts the signature into `bands` x `rows`; documents sharing any band key are candidates, joined by
vectorized union-find (min-label propagation with pointer jumping). The smallest index of each cluster
(first seen) is kept. With `threshold`, a candidate link needs an estimated Jaccard >= threshold too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from lmstack.data.curate.text import CJK_SHARE_THRESHOLD, cjk_share, simplify
from lmstack.errors import require

_U64 = np.uint64
_POLY_BASE = 0x100000001B3  # odd, so it has an inverse mod 2**64
_POLY_BASE_INV = pow(_POLY_BASE, -1, 2**64)
_SHINGLE_BASE = _U64(0x9E3779B97F4A7C15)
_CHUNK_CHARS = 1 << 20  # documents are hashed in chunks of about this many characters (cache-sized)
_BATCH_SHINGLES = 1 << 13  # rows of the (shingles, n_perm) matrix per step: 8k x 112 x 8 B = 7 MB


@dataclass
class DedupConfig:
    exact: bool = True
    minhash: bool = True
    # word | char | auto (character 5-grams for Chinese/Japanese/Korean, word 5-grams otherwise)
    unit: str = "auto"
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    threshold: float = 0.0  # > 0: a candidate pair also needs estimated Jaccard >= threshold
    seed: int = 1
    lines: bool = False  # also remove repeated lines (every occurrence after the first, corpus-wide)
    min_line_chars: int = 20  # shorter lines ("Home", "Share") are layout, left to the quality filters
    cluster_examples: int = 5

    def __post_init__(self) -> None:
        require(self.unit in ("word", "char", "auto"), f"dedup.unit must be word, char or auto, got {self.unit!r}")
        require(self.ngram >= 1, f"dedup.ngram must be >= 1, got {self.ngram}")
        require(self.bands >= 1 and self.rows >= 1, "dedup.bands and dedup.rows must be >= 1")
        require(0.0 <= self.threshold <= 1.0, f"dedup.threshold must be in [0, 1], got {self.threshold}")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


def exact_key(text: str) -> int:
    """64-bit hash of the simplified text (case, punctuation and whitespace differences ignored)."""
    return int.from_bytes(hashlib.blake2b(simplify(text).encode("utf-8"), digest_size=8).digest(), "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


_POWER_TABLES: dict[int, np.ndarray] = {}


def _powers(base: int, count: int) -> np.ndarray:
    """base**0 .. base**(count-1) mod 2**64, cached: the table is data-independent and costly to build."""
    table = _POWER_TABLES.get(base)
    if table is None or table.size < count:
        size = max(count, _CHUNK_CHARS * 2)
        table = np.full(size, base, dtype=_U64)
        table[0] = 1
        table = np.cumprod(table, dtype=_U64)  # wraps mod 2**64, which is the arithmetic we want
        _POWER_TABLES[base] = table
    return table[:count]


def word_token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash per word, document index per word) for simplified texts, without a per-word Python loop."""
    encoded = [t.encode("utf-8") for t in texts]
    buf = np.frombuffer(b" ".join(encoded) + b" ", dtype=np.uint8)
    is_word = buf != 32
    prev_space = np.concatenate(([True], ~is_word[:-1]))
    next_space = np.concatenate((~is_word[1:], [True]))
    starts = np.flatnonzero(is_word & prev_space)
    ends = np.flatnonzero(is_word & next_space)
    if starts.size == 0:
        return np.zeros(0, _U64), np.zeros(0, np.int64)
    with np.errstate(over="ignore"):
        prefix = np.zeros(buf.size + 1, dtype=_U64)
        np.cumsum(buf.astype(_U64) * _powers(_POLY_BASE_INV, buf.size), dtype=_U64, out=prefix[1:])
        # sum_j b_j * p**(end - j): the same value wherever the word sits in the buffer
        token_hash = _splitmix64((prefix[ends + 1] - prefix[starts]) * _powers(_POLY_BASE, buf.size)[ends])
    doc_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
    doc_of_token = np.searchsorted(doc_starts, starts, side="right") - 1
    return token_hash, doc_of_token


def char_token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash per non-space character, document index per character)."""
    arrays = [np.frombuffer(t.replace(" ", "").encode("utf-32-le"), dtype=np.uint32) for t in texts]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    if lengths.sum() == 0:
        return np.zeros(0, _U64), np.zeros(0, np.int64)
    codes = np.concatenate(arrays).astype(_U64)
    with np.errstate(over="ignore"):
        token_hash = _splitmix64(codes)
    return token_hash, np.repeat(np.arange(len(texts)), lengths)


def shingle_hashes(token_hash: np.ndarray, doc_of_token: np.ndarray, n_docs: int, n: int):
    """32-bit hash of every n consecutive tokens inside one document; a document shorter than n
    tokens gets one shingle of all its tokens. Returns (hashes, document index per hash)."""
    m = token_hash.size
    counts = np.bincount(doc_of_token, minlength=n_docs) if m else np.zeros(n_docs, np.int64)
    with np.errstate(over="ignore"):
        if m >= n:
            window = np.zeros(m - n + 1, dtype=_U64)
            for k in range(n):
                window = window * _SHINGLE_BASE + token_hash[k : m - n + 1 + k]
            inside = doc_of_token[: m - n + 1] == doc_of_token[n - 1 :]
            full, full_doc = window[inside], doc_of_token[: m - n + 1][inside]
        else:
            full, full_doc = np.zeros(0, _U64), np.zeros(0, np.int64)
        short_docs = np.flatnonzero((counts > 0) & (counts < n))
        if short_docs.size:
            first = np.concatenate(([0], np.cumsum(counts)))
            extra = np.zeros(short_docs.size, dtype=_U64)
            for i, d in enumerate(short_docs):
                for h in token_hash[first[d] : first[d + 1]]:
                    extra[i] = extra[i] * _SHINGLE_BASE + h
            full = np.concatenate((full, extra))
            full_doc = np.concatenate((full_doc, short_docs))
            order = np.argsort(full_doc, kind="stable")
            full, full_doc = full[order], full_doc[order]
        return _splitmix64(full) >> _U64(32), full_doc


class MinHasher:
    """Vectorized MinHash signatures: (n_docs, num_perm) uint32. Empty documents get all-ones rows."""

    def __init__(self, num_perm: int = 112, ngram: int = 5, unit: str = "auto", seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | _U64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.num_perm, self.ngram, self.unit = num_perm, ngram, unit

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        simple = [simplify(t) for t in texts]
        if self.unit == "auto":
            char_mode = np.array([cjk_share(t) >= CJK_SHARE_THRESHOLD for t in simple], dtype=bool)
        else:
            char_mode = np.full(len(texts), self.unit == "char", dtype=bool)
        parts_hash, parts_doc = [], []
        for mode, tokenize in ((False, word_token_hashes), (True, char_token_hashes)):
            index = np.flatnonzero(char_mode == mode)
            if index.size == 0:
                continue
            token_hash, doc_of_token = tokenize([simple[i] for i in index])
            sh, sh_doc = shingle_hashes(token_hash, doc_of_token, index.size, self.ngram)
            parts_hash.append(sh)
            parts_doc.append(index[sh_doc])
        hashes, docs = np.concatenate(parts_hash), np.concatenate(parts_doc)
        order = np.argsort(docs, kind="stable")
        return hashes[order], docs[order]

    def signatures(self, texts: list[str]) -> np.ndarray:
        sig = np.full((len(texts), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        start = 0
        while start < len(texts):
            stop, chars = start, 0
            while stop < len(texts) and (stop == start or chars + len(texts[stop]) <= _CHUNK_CHARS):
                chars += len(texts[stop])
                stop += 1
            sig[start:stop] = self._chunk_signatures(texts[start:stop])
            start = stop
        return sig

    def _chunk_signatures(self, texts: list[str]) -> np.ndarray:
        sig = np.full((len(texts), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        hashes, docs = self.shingles(texts)
        bounds = np.searchsorted(docs, np.arange(len(texts) + 1))
        start_doc = 0
        while start_doc < len(texts):
            # take whole documents until the step holds about _BATCH_SHINGLES rows
            stop_doc = max(start_doc + 1, int(np.searchsorted(bounds, bounds[start_doc] + _BATCH_SHINGLES)) - 1)
            stop_doc = min(stop_doc, len(texts))
            lo, hi = bounds[start_doc], bounds[stop_doc]
            if hi > lo:
                self._fill(sig, hashes[lo:hi], docs[lo:hi])
            start_doc = stop_doc
        return sig

    def _fill(self, sig: np.ndarray, hashes: np.ndarray, docs: np.ndarray) -> None:
        with np.errstate(over="ignore"):
            values = np.multiply.outer(hashes, self.a)  # (n_shingles, num_perm)
            values += self.b
        firsts = np.flatnonzero(np.concatenate(([True], docs[1:] != docs[:-1])))
        # the shift is monotonic, so it commutes with min and runs on the small reduced matrix only
        sig[docs[firsts]] = np.minimum.reduceat(values, firsts, axis=0) >> _U64(32)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64: one hash per band of `rows` signature values."""
    require(signatures.shape[1] >= bands * rows, "signatures are shorter than bands * rows")
    n = signatures.shape[0]
    keys = np.empty((n, bands), dtype=_U64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            key = np.full(n, b, dtype=_U64)
            for r in range(rows):
                key = key * _SHINGLE_BASE + signatures[:, b * rows + r].astype(_U64)
            keys[:, b] = _splitmix64(key)
    return keys


def candidate_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first member of a bucket, other member) for every band; each bucket becomes a star."""
    lefts, rights = [], []
    for b in range(keys.shape[1]):
        order = np.argsort(keys[:, b], kind="stable")
        sorted_keys = keys[order, b]
        same = np.concatenate(([False], sorted_keys[1:] == sorted_keys[:-1]))
        if not same.any():
            continue
        run_start = np.maximum.accumulate(np.where(same, 0, np.arange(order.size)))
        lefts.append(order[run_start[same]])
        rights.append(order[same])
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(lefts), np.concatenate(rights)


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Label of each node = the smallest node index in its component (vectorized union-find)."""
    parent = np.arange(n)
    if left.size == 0:
        return parent
    while True:
        low = np.minimum(parent[left], parent[right])
        np.minimum.at(parent, parent[left], low)
        np.minimum.at(parent, parent[right], low)
        while True:  # pointer jumping: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        if np.array_equal(parent[left], parent[right]):
            return parent


def near_duplicate_clusters(signatures: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Cluster label per document (smallest member index); a document is kept iff label == its index."""
    n = signatures.shape[0]
    left, right = candidate_pairs(band_keys(signatures, cfg.bands, cfg.rows))
    if cfg.threshold > 0 and left.size:
        similarity = (signatures[left] == signatures[right]).mean(axis=1)
        left, right = left[similarity >= cfg.threshold], right[similarity >= cfg.threshold]
    return connected_components(n, left, right)


@dataclass
class DedupResult:
    keep: np.ndarray  # bool per document
    reason: list[str | None]  # "exact_duplicate" | "near_duplicate" | None per document
    cluster: np.ndarray  # near-duplicate cluster label per document (smallest member index)


def deduplicate(texts: list[str], cfg: DedupConfig | None = None) -> DedupResult:
    """In-memory dedup of a list of texts: the same decisions the pipeline's global stage makes."""
    cfg = cfg or DedupConfig()
    exact = np.array([exact_key(t) for t in texts], dtype=np.uint64) if cfg.exact else None
    sig = MinHasher(cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed).signatures(texts) if cfg.minhash else None
    return decide(len(texts), exact, sig, cfg)


def decide(n: int, exact: np.ndarray | None, signatures: np.ndarray | None, cfg: DedupConfig) -> DedupResult:
    """Keep the first of each exact-duplicate group, then the first of each near-duplicate cluster."""
    keep = np.ones(n, dtype=bool)
    reason: list[str | None] = [None] * n
    if exact is not None and n:
        _, first = np.unique(exact, return_index=True)
        keep[:] = False
        keep[first] = True
        for i in np.flatnonzero(~keep):
            reason[i] = "exact_duplicate"
    cluster = np.arange(n)
    if signatures is not None and n:
        survivors = np.flatnonzero(keep)
        labels = near_duplicate_clusters(signatures[survivors], cfg)
        cluster[survivors] = survivors[labels]
        for i in survivors[labels != np.arange(survivors.size)]:
            keep[i] = False
            reason[i] = "near_duplicate"
    return DedupResult(keep, reason, cluster)


class LineDeduper:
    """Corpus-wide line dedup: every occurrence of a long-enough line after the first is removed."""

    def __init__(self, min_chars: int):
        self.min_chars = min_chars
        self.seen: set[bytes] = set()

    def repeated_lines(self, text: str) -> list[int]:
        """Indexes (in `text.split("\\n")`) of lines seen before; records the rest as seen."""
        out = []
        for i, line in enumerate(text.split("\n")):
            line = line.strip()
            if len(line) < self.min_chars:
                continue
            key = hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest()
            if key in self.seen:
                out.append(i)
            else:
                self.seen.add(key)
        return out
