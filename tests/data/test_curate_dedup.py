"""Dedup: precision/recall on planted near-duplicates (English and Chinese), exact, lines, union-find."""

from __future__ import annotations

import random

import numpy as np

from lmstack.data.curate.dedup import (
    DedupConfig,
    LineDeduper,
    MinHasher,
    connected_components,
    deduplicate,
)

POEM_CHARS = (
    "床前明月光疑是地上霜举头望低思故乡春眠不觉晓处闻啼鸟夜来风雨声花落知多少白日依山尽黄河入海流欲穷千里目更上一层楼"
)


def english_corpus(rng: random.Random, n: int) -> list[str]:
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(5000)]
    return [" ".join(rng.choices(vocab, k=150)) for _ in range(n)]


def chinese_corpus(rng: random.Random, n: int) -> list[str]:
    return ["，".join("".join(rng.choices(POEM_CHARS, k=7)) for _ in range(40)) + "。" for _ in range(n)]


def near_copy(text: str, rng: random.Random, chinese: bool) -> str:
    """A few edits and a reordering: swap the two halves, change ~1% of the units."""
    units = list(text) if chinese else text.split()
    cut = len(units) // 2
    units = units[cut:] + units[:cut]
    for i in rng.sample(range(len(units)), max(1, len(units) // 100)):
        units[i] = rng.choice(POEM_CHARS) if chinese else "edited"
    return ("" if chinese else " ").join(units)


def test_near_duplicate_precision_and_recall_english_and_chinese():
    rng = random.Random(0)
    originals = english_corpus(rng, 150) + chinese_corpus(rng, 150)
    texts, planted = list(originals), []
    for i in rng.sample(range(len(originals)), 60):
        planted.append((i, len(texts)))
        texts.append(near_copy(originals[i], rng, chinese=i >= 150))
    result = deduplicate(texts, DedupConfig(exact=False))
    found = {(int(result.cluster[b]), b) for _, b in planted if not result.keep[b]}
    recall = np.mean([result.cluster[a] == result.cluster[b] for a, b in planted])
    dropped = np.flatnonzero(~result.keep)
    precision = np.mean([i >= len(originals) for i in dropped]) if dropped.size else 1.0
    assert recall >= 0.95, recall
    assert precision == 1.0  # every dropped document is a planted copy
    assert all(result.keep[a] for a, _ in planted)  # exactly one per cluster: the original is kept
    assert len(found) == len(planted)


def test_exact_dedup_ignores_case_punctuation_and_spacing():
    texts = ["Hello, World!  This is it.", "hello world this is it", "Something else entirely here."]
    result = deduplicate(texts)
    assert result.keep.tolist() == [True, False, True]
    assert result.reason[1] == "exact_duplicate"


def test_threshold_rejects_weak_candidates():
    rng = random.Random(1)
    base = english_corpus(rng, 1)[0]
    words = base.split()
    copy = " ".join(words[:120] + ["x"] * 30)  # Jaccard about 0.7
    loose = deduplicate([base, copy], DedupConfig(exact=False, bands=20, rows=2))
    strict = deduplicate([base, copy], DedupConfig(exact=False, bands=20, rows=2, threshold=0.95))
    assert not loose.keep[1] and strict.keep[1]


def test_signatures_estimate_jaccard_without_bias():
    rng = random.Random(2)
    hasher = MinHasher(num_perm=256, ngram=5, unit="word")
    errors = []
    for text in english_corpus(rng, 30):
        words = text.split()
        other = " ".join(words[:100] + english_corpus(rng, 1)[0].split()[:50])
        sig = hasher.signatures([text, other])

        def shingles(t):
            w = t.split()
            return {" ".join(w[i : i + 5]) for i in range(len(w) - 4)}

        a, b = shingles(text), shingles(other)
        errors.append((sig[0] == sig[1]).mean() - len(a & b) / len(a | b))
    assert abs(np.mean(errors)) < 0.02


def test_short_and_empty_documents():
    sig = MinHasher().signatures(["", "two words", "two words", "床前"])
    assert (sig[0] == 0xFFFFFFFF).all()
    assert (sig[1] == sig[2]).all() and not (sig[1] == sig[3]).all()


def test_union_find_joins_chains():
    labels = connected_components(6, np.array([4, 2, 1]), np.array([5, 3, 2]))
    assert labels.tolist() == [0, 1, 1, 1, 4, 4]


def test_line_dedup_keeps_first_occurrence():
    deduper = LineDeduper(min_chars=10)
    assert deduper.repeated_lines("Subscribe to our newsletter\nshort\nfirst unique line here") == []
    assert deduper.repeated_lines("new line of text here\nSubscribe to our newsletter\nshort") == [1]
