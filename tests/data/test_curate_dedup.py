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
    for verify in ("exact", "estimate"):
        loose = deduplicate([base, copy], DedupConfig(exact=False, bands=20, rows=2, threshold=0.5, verify=verify))
        strict = deduplicate([base, copy], DedupConfig(exact=False, bands=20, rows=2, threshold=0.95, verify=verify))
        assert not loose.keep[1] and strict.keep[1], verify


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


def _shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    def shingles(t: str) -> set[str]:
        w = t.split()
        return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_hard_negatives_stay_and_true_duplicates_go():
    """Pairs sharing about half their text (Jaccard 0.4-0.6) are different documents: all of them stay.
    The old default (any shared LSH band, no verification) dropped a share of them."""
    rng = random.Random(5)
    texts, hard_pairs, dup_pairs = [], [], []
    for _ in range(40):
        words = english_corpus(rng, 1)[0].split()
        fresh = english_corpus(rng, 1)[0].split()
        keep = rng.randint(98, 112)  # share about 2/3 of the words in one run -> Jaccard 0.4-0.6
        other = words[:keep] + fresh[: 150 - keep]
        a, b = " ".join(words), " ".join(other)
        hard_pairs.append((len(texts), len(texts) + 1, _shingle_jaccard(a, b)))
        texts += [a, b]
    for _ in range(20):
        words = english_corpus(rng, 1)[0].split()
        copy = list(words)
        copy[rng.randrange(150)] = "changed"
        dup_pairs.append((len(texts), len(texts) + 1))
        texts += [" ".join(words), " ".join(copy)]
    assert all(0.4 <= j <= 0.6 for _, _, j in hard_pairs), [j for _, _, j in hard_pairs]
    result = deduplicate(texts, DedupConfig(exact=False, bands=20, rows=3))  # loose LSH: many candidates
    assert all(result.keep[a] and result.keep[b] for a, b, _ in hard_pairs)
    assert not any(result.keep[b] for _, b in dup_pairs)
    old_style = deduplicate(texts, DedupConfig(exact=False, bands=20, rows=3, threshold=0.0, verify="estimate"))
    assert sum(not old_style.keep[b] for _, b, _ in hard_pairs) > 0  # the hazard the check removes


def test_chains_do_not_swallow_unrelated_documents():
    """A~B and B~C but A and C unrelated: B goes with A, C stays (union-find would have dropped it)."""
    rng = random.Random(6)
    x, y, z = (english_corpus(rng, 1)[0].split()[:60] for _ in range(3))
    a, b, c = " ".join(x + y), " ".join(x + y[:50] + z[:10]), " ".join(x[:20] + y[:50] + z[:60])
    assert _shingle_jaccard(a, b) >= 0.75 and _shingle_jaccard(a, c) < 0.5
    cfg = DedupConfig(exact=False, bands=30, rows=2, threshold=0.35)
    assert _shingle_jaccard(b, c) >= cfg.threshold > _shingle_jaccard(a, c)
    result = deduplicate([a, b, c], cfg)
    assert result.keep.tolist() == [True, False, True]
    assert result.cluster.tolist() == [0, 0, 2]
    assert result.chains == 1  # the a-b-c component is kept as two clusters, and that is reported


def test_empty_documents_do_not_form_one_cluster():
    texts = ["", "!!!", "   ", "... ---", "a real document with enough words to shingle it well"]
    result = deduplicate(texts, DedupConfig(exact=False))
    assert result.keep.all()


def test_hash_coefficients_use_all_64_bits():
    hasher = MinHasher(num_perm=256)
    assert (hasher.a >> np.uint64(63)).any() and (hasher.b >> np.uint64(63)).any()
    assert (hasher.a & np.uint64(1)).all()  # odd multipliers


def test_huge_document_signature_is_exact_and_memory_bounded():
    """A 50 MB document is hashed piece by piece: same signature as hashing it whole, bounded memory."""
    import resource

    from lmstack.data.curate import dedup as dedup_module

    rng = random.Random(7)
    vocab = ["".join(rng.choices("abcdefghij", k=rng.randint(3, 8))) for _ in range(50_000)]
    text = " ".join(rng.choices(vocab, k=8_000_000))[: 50 * 1024 * 1024]
    hasher = MinHasher(num_perm=112)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sig = hasher.signatures([text, "short text here"])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1500, grown_mb  # the old whole-document matrix needed 8M x 112 x 8 B = 7 GB
    sample = text[: 3 * dedup_module._CHUNK_CHARS + 12345]  # small enough to hash whole as a reference
    whole = hasher._chunk_signatures([sample])[0]
    assert (hasher._long_signature(sample) == whole).all()
    assert (sig[0] != 0xFFFFFFFF).all()


def test_line_dedup_keeps_first_occurrence():
    deduper = LineDeduper(min_chars=10)
    assert deduper.repeated_lines("Subscribe to our newsletter\nshort\nfirst unique line here") == []
    assert deduper.repeated_lines("new line of text here\nSubscribe to our newsletter\nshort") == [1]
