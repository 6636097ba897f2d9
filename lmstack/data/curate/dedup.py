"""Deduplication: exact (hash of the simplified text) and near-duplicate (MinHash + LSH + union-find).

MinHash is vectorized in numpy instead of datasketch's per-shingle Python loop:
1. tokens (words as UTF-8 byte runs, or characters as code points) are hashed all at once with a
   polynomial prefix-sum hash over the whole batch's bytes, then mixed with splitmix64;
2. n consecutive token hashes are combined into one 32-bit shingle hash per position;
3. all permutations are one (n_shingles, n_perm) multiply-shift universal-hash op,
   h(x) = ((a*x + b) mod 2**64) >> 32 (Dietzfelbinger et al. 1997), reduced with a per-document min.
LSH cuts the signature into `bands` x `rows`; documents sharing any band key are candidates. A candidate
pair is then verified: by default against the true Jaccard of the two documents' shingle sets (computed
for candidates only), or, with `verify: estimate`, against the Jaccard estimated from the signatures.

Clustering is greedy star clustering, not union-find: documents are visited in input order, an unassigned
document becomes a representative (kept), and it absorbs its verified neighbours that are still
unassigned (dropped). So a document is dropped only when it is similar to the document it is merged into;
a chain A~B~C with A and C unrelated keeps C. Connected components that hold more than one representative
(where union-find would have chained unrelated documents together) are counted in `DedupResult.chains`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

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
    # A candidate pair is a duplicate when its Jaccard similarity reaches `threshold`, measured on the
    # shingle sets themselves (verify: exact) or estimated from the MinHash signatures (verify: estimate,
    # faster, noisier: with 112 hashes the estimate's standard deviation is about 0.04 at J = 0.75).
    threshold: float = 0.75
    verify: str = "exact"
    seed: int = 1
    lines: bool = False  # also remove repeated lines (every occurrence after the first, corpus-wide)
    min_line_chars: int = 20  # shorter lines ("Home", "Share") are layout, left to the quality filters
    cluster_examples: int = 5

    def __post_init__(self) -> None:
        require(self.unit in ("word", "char", "auto"), f"dedup.unit must be word, char or auto, got {self.unit!r}")
        require(self.ngram >= 1, f"dedup.ngram must be >= 1, got {self.ngram}")
        require(self.bands >= 1 and self.rows >= 1, "dedup.bands and dedup.rows must be >= 1")
        require(0.0 <= self.threshold <= 1.0, f"dedup.threshold must be in [0, 1], got {self.threshold}")
        require(self.verify in ("exact", "estimate"), f"dedup.verify must be exact or estimate, got {self.verify!r}")

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
    """Vectorized MinHash signatures: (n_docs, num_perm) uint32. Documents without shingles (empty after
    simplification) get all-ones rows, which `near_duplicate_clusters` never links."""

    def __init__(self, num_perm: int = 112, ngram: int = 5, unit: str = "auto", seed: int = 1):
        rng = np.random.default_rng(seed)
        # Multiply-shift needs odd multipliers drawn from all 64 bits (the high bits decide the output).
        self.a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | _U64(1)
        self.b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
        self.num_perm, self.ngram, self.unit = num_perm, ngram, unit

    def _char_mode(self, simple: list[str]) -> np.ndarray:
        if self.unit == "auto":
            return np.array([cjk_share(t) >= CJK_SHARE_THRESHOLD for t in simple], dtype=bool)
        return np.full(len(simple), self.unit == "char", dtype=bool)

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(32-bit shingle hash, document index) for every shingle position, grouped by document."""
        simple = [simplify(t) for t in texts]
        return self._simplified_shingles(simple, self._char_mode(simple))

    def _simplified_shingles(self, simple: list[str], char_mode: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts_hash, parts_doc = [np.zeros(0, _U64)], [np.zeros(0, np.int64)]
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

    def shingle_sets(self, texts: list[str]) -> list[np.ndarray]:
        """Sorted unique shingle hashes per document: what the exact Jaccard check compares."""
        short = [i for i, t in enumerate(texts) if len(t) <= _CHUNK_CHARS]
        hashes, docs = self.shingles([texts[i] for i in short])
        bounds = np.searchsorted(docs, np.arange(len(short) + 1))
        sets: list[np.ndarray] = [np.zeros(0, _U64)] * len(texts)
        for k, i in enumerate(short):
            sets[i] = np.unique(hashes[bounds[k] : bounds[k + 1]])
        for i in set(range(len(texts))) - set(short):
            simple = simplify(texts[i])
            char_mode = self._char_mode([simple])
            pieces = _overlapping_pieces(simple, _CHUNK_CHARS, self.ngram - 1, bool(char_mode[0]))
            sets[i] = np.unique(np.concatenate([self._simplified_shingles([p], char_mode)[0] for p in pieces]))
        return sets

    def signatures(self, texts: list[str]) -> np.ndarray:
        sig = np.full((len(texts), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        start = 0
        while start < len(texts):
            if len(texts[start]) > _CHUNK_CHARS:  # a huge document: hashed piece by piece
                sig[start] = self._long_signature(texts[start])
                start += 1
                continue
            stop, chars = start, 0
            while stop < len(texts) and len(texts[stop]) <= _CHUNK_CHARS and chars + len(texts[stop]) <= _CHUNK_CHARS:
                chars += len(texts[stop])
                stop += 1
            stop = max(stop, start + 1)
            sig[start:stop] = self._chunk_signatures(texts[start:stop])
            start = stop
        return sig

    def _long_signature(self, text: str) -> np.ndarray:
        """The signature of one huge document from overlapping pieces, so memory stays bounded.

        Pieces overlap by ngram - 1 tokens, so every shingle of the whole text lies inside some piece; the
        minimum over pieces of each hash is then the minimum over the whole shingle set. The unit (word or
        character) is decided once for the whole document."""
        simple = simplify(text)
        char_mode = bool(self._char_mode([simple])[0])
        sig = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        for piece in _overlapping_pieces(simple, _CHUNK_CHARS, self.ngram - 1, char_mode):
            hashes, docs = self._simplified_shingles([piece], np.array([char_mode]))
            if hashes.size:
                sig = np.minimum(sig, self._min_hashes(hashes, docs, 1)[0])
        return sig

    def _chunk_signatures(self, texts: list[str]) -> np.ndarray:
        hashes, docs = self.shingles(texts)
        return self._min_hashes(hashes, docs, len(texts))

    def _min_hashes(self, hashes: np.ndarray, docs: np.ndarray, n_docs: int) -> np.ndarray:
        """Per-document minimum of every permutation, over slices of at most _BATCH_SHINGLES rows, so the
        (shingles, num_perm) matrix never exceeds ~7 MB whatever the documents' sizes."""
        sig = np.full((n_docs, self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        for lo in range(0, hashes.size, _BATCH_SHINGLES):
            part, part_docs = hashes[lo : lo + _BATCH_SHINGLES], docs[lo : lo + _BATCH_SHINGLES]
            with np.errstate(over="ignore"):
                values = np.multiply.outer(part, self.a)  # (rows, num_perm)
                values += self.b
            firsts = np.flatnonzero(np.concatenate(([True], part_docs[1:] != part_docs[:-1])))
            # the shift is monotonic, so it commutes with min and runs on the small reduced matrix only
            mins = (np.minimum.reduceat(values, firsts, axis=0) >> _U64(32)).astype(np.uint32)
            rows = part_docs[firsts]  # unique within a slice; a document may continue from the last slice
            sig[rows] = np.minimum(sig[rows], mins)
        return sig


def _overlapping_pieces(simple: str, size: int, overlap_tokens: int, char_mode: bool) -> list[str]:
    """Split simplified text into pieces of about `size` characters that share `overlap_tokens` tokens."""
    pieces, start = [], 0
    while start < len(simple):
        stop = min(len(simple), start + size)
        if not char_mode and stop < len(simple):
            space = simple.rfind(" ", start, stop)
            stop = space if space > start else stop  # cut between words
        pieces.append(simple[start:stop])
        if stop >= len(simple):
            break
        following = _back_up(simple, stop, overlap_tokens, char_mode)
        start = following if following > start else stop  # always move forward, even inside a giant word
    return pieces


def _back_up(simple: str, stop: int, tokens: int, char_mode: bool) -> int:
    """The start of the next piece: `tokens` words (or non-space characters) before `stop`."""
    pos = stop
    for _ in range(tokens):
        if char_mode:
            pos -= 1
            while pos > 0 and simple[pos] == " ":
                pos -= 1
        else:
            pos = simple.rfind(" ", 0, pos - 1) + 1 if pos > 0 else 0
    return max(pos, 0)


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
    """Unique pairs (i < j) that share a band bucket: each member is paired with the bucket's first member
    (a star) and with the member before it (a chain), so verification can still link two documents that
    are similar to each other but not to the bucket's first member."""
    lefts, rights = [], []
    for b in range(keys.shape[1]):
        order = np.argsort(keys[:, b], kind="stable")
        sorted_keys = keys[order, b]
        same = np.concatenate(([False], sorted_keys[1:] == sorted_keys[:-1]))
        if not same.any():
            continue
        run_start = np.maximum.accumulate(np.where(same, 0, np.arange(order.size)))
        members = np.flatnonzero(same)
        lefts += [order[run_start[members]], order[members - 1]]
        rights += [order[members], order[members]]
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    left, right = np.concatenate(lefts), np.concatenate(rights)
    low, high = np.minimum(left, right), np.maximum(left, right)
    pairs = np.unique(np.stack([low[low != high], high[low != high]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


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


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays."""
    if a.size == 0 or b.size == 0:
        return 0.0
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


ShingleSource = Callable[[np.ndarray], dict[int, np.ndarray]]  # document indexes -> their shingle sets


def verified_pairs(
    signatures: np.ndarray, cfg: DedupConfig, shingle_source: ShingleSource | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LSH candidates that pass the similarity check: (left, right, similarity), left < right."""
    has_shingles = ~(signatures == 0xFFFFFFFF).all(axis=1)  # empty documents never link
    left, right = candidate_pairs(band_keys(signatures, cfg.bands, cfg.rows))
    usable = has_shingles[left] & has_shingles[right]
    left, right = left[usable], right[usable]
    if left.size == 0:
        return left, right, np.zeros(0)
    if cfg.verify == "estimate":
        similarity = (signatures[left] == signatures[right]).mean(axis=1)
    else:
        require(shingle_source is not None, "dedup.verify: exact needs the documents' shingle sets")
        sets = shingle_source(np.unique(np.concatenate([left, right])))
        similarity = np.array([jaccard(sets[int(i)], sets[int(j)]) for i, j in zip(left, right, strict=True)])
    ok = similarity >= cfg.threshold
    return left[ok], right[ok], similarity[ok]


def star_clusters(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Representative of each document under greedy star clustering in input order.

    Visiting documents in order, an unassigned document becomes a representative and claims every still
    unassigned neighbour after it. Each dropped document is therefore similar to its own representative."""
    representative = np.full(n, -1, dtype=np.int64)
    order = np.argsort(left, kind="stable")
    left, right = left[order], right[order]
    bounds = np.searchsorted(left, np.arange(n + 1))
    for i in np.unique(left):
        if representative[i] >= 0:
            continue
        representative[i] = i
        neighbours = right[bounds[i] : bounds[i + 1]]
        free = neighbours[representative[neighbours] < 0]
        representative[free] = i
    unassigned = representative < 0
    representative[unassigned] = np.flatnonzero(unassigned)
    return representative


def near_duplicate_clusters(
    signatures: np.ndarray, cfg: DedupConfig, shingle_source: ShingleSource | None = None
) -> tuple[np.ndarray, int]:
    """(representative per document, number of chained components split), from verified LSH pairs.

    A document is kept iff it is its own representative. The second value counts connected components of
    the similarity graph that hold more than one representative: chains that union-find would have merged
    although their ends are not similar (reported as false-merge-prone clusters)."""
    n = signatures.shape[0]
    left, right, _ = verified_pairs(signatures, cfg, shingle_source)
    representative = star_clusters(n, left, right)
    component = connected_components(n, left, right)
    reps = np.flatnonzero(representative == np.arange(n))
    _, reps_per_component = np.unique(component[reps], return_counts=True)
    return representative, int((reps_per_component > 1).sum())


@dataclass
class DedupResult:
    keep: np.ndarray  # bool per document
    reason: list[str | None]  # "exact_duplicate" | "near_duplicate" | None per document
    cluster: np.ndarray  # representative (kept document) of each document's near-duplicate cluster
    chains: int = 0  # similarity-graph components split into several clusters (would have chained)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # verified near-duplicate pairs (i < j)


def deduplicate(texts: list[str], cfg: DedupConfig | None = None) -> DedupResult:
    """In-memory dedup of a list of texts: the same decisions the pipeline's global stage makes."""
    cfg = cfg or DedupConfig()
    exact = np.array([exact_key(t) for t in texts], dtype=np.uint64) if cfg.exact else None
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.unit, cfg.seed)
    sig = hasher.signatures(texts) if cfg.minhash else None

    def shingle_source(index: np.ndarray) -> dict[int, np.ndarray]:
        return dict(zip(index.tolist(), hasher.shingle_sets([texts[i] for i in index]), strict=True))

    return decide(len(texts), exact, sig, cfg, shingle_source)


def decide(
    n: int,
    exact: np.ndarray | None,
    signatures: np.ndarray | None,
    cfg: DedupConfig,
    shingle_source: ShingleSource | None = None,
) -> DedupResult:
    """Keep the first of each exact-duplicate group, then one representative per near-duplicate cluster.

    `shingle_source` maps document indexes (0..n-1) to their shingle sets for the exact Jaccard check."""
    keep = np.ones(n, dtype=bool)
    reason: list[str | None] = [None] * n
    if exact is not None and n:
        _, first = np.unique(exact, return_index=True)
        keep[:] = False
        keep[first] = True
        for i in np.flatnonzero(~keep):
            reason[i] = "exact_duplicate"
    cluster, chains, pairs = np.arange(n), 0, []
    if signatures is not None and n:
        survivors = np.flatnonzero(keep)

        def survivor_sets(index: np.ndarray) -> dict[int, np.ndarray]:
            assert shingle_source is not None
            sets = shingle_source(survivors[index])
            return {int(i): sets[int(survivors[i])] for i in index}

        source = survivor_sets if shingle_source is not None else None
        labels, chains = near_duplicate_clusters(signatures[survivors], cfg, source)
        cluster[survivors] = survivors[labels]
        merged = np.flatnonzero(labels != np.arange(survivors.size))
        for k in merged:
            keep[survivors[k]] = False
            reason[survivors[k]] = "near_duplicate"
        pairs = [(int(survivors[labels[k]]), int(survivors[k])) for k in merged]
    return DedupResult(keep, reason, cluster, chains, pairs)


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
