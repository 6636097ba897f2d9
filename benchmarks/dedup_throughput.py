"""MinHash + LSH dedup: lmstack against datasketch, same run, same data, same recall and precision rules.

    python benchmarks/dedup_throughput.py            # 100k synthetic 200-word documents
    python benchmarks/dedup_throughput.py --docs 20000

Both sides use word 5-grams of the same simplified text, 112 permutations and LSH with 14 bands x 8
rows. Every 10th document is followed by a planted near-duplicate (4 words replaced, the last stretch
moved to the front; true Jaccard about 0.8), and every 10th by a hard negative (a document sharing about
half its text with it, true Jaccard 0.4-0.6, which must be kept).

Each side makes its own keep/drop decisions the way it is used for dedup:
  lmstack     `deduplicate`-equivalent: LSH candidates, verified on the true Jaccard (threshold 0.75),
              greedy star clusters in input order;
  datasketch  the usual MinHashLSH loop: in input order, drop a document when the LSH returns an earlier
              kept document for it, else insert it.
Recall is the share of planted pairs whose copy is dropped as a duplicate of its original (direct pairs
for both). False merges are hard negatives dropped. Single process on both sides, so docs/s is per core.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import numpy as np

from lmstack.data.curate.dedup import DedupConfig, deduplicate
from lmstack.data.curate.text import simplify

WORDS_PER_DOC = 200
DUP_EVERY = 10


def make_corpus(n_docs: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """Documents, planted (original, near copy) pairs and (document, hard negative) pairs."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(30_000)]
    docs: list[str] = []
    pairs: list[tuple[int, int]] = []
    negatives: list[tuple[int, int]] = []
    while len(docs) < n_docs:
        words = rng.choices(vocab, k=WORDS_PER_DOC)
        docs.append(" ".join(words))
        if len(docs) % DUP_EVERY == 0 and len(docs) < n_docs:
            near = list(words)
            for i in rng.sample(range(WORDS_PER_DOC), 4):  # 4 substitutions
                near[i] = rng.choice(vocab)
            cut = rng.randrange(20, WORDS_PER_DOC - 20)  # move the last stretch to the front
            near = near[cut:] + near[:cut]
            pairs.append((len(docs) - 1, len(docs)))
            docs.append(" ".join(near))
        elif len(docs) % DUP_EVERY == 5 and len(docs) < n_docs:
            shared = rng.randint(130, 150)  # one shared run of about 2/3 of the words: Jaccard 0.4-0.6
            negatives.append((len(docs) - 1, len(docs)))
            docs.append(" ".join(words[:shared] + rng.choices(vocab, k=WORDS_PER_DOC - shared)))
    return docs, pairs, negatives


def _shingles(doc: str, n: int) -> set[str]:
    words = simplify(doc).split()
    return {" ".join(words[j : j + n]) for j in range(len(words) - n + 1)}


def true_jaccard(docs: list[str], pairs: list[tuple[int, int]], n: int) -> np.ndarray:
    return np.array(
        [len(a & b) / len(a | b) for a, b in ((_shingles(docs[i], n), _shingles(docs[j], n)) for i, j in pairs)]
    )


def run_lmstack(docs: list[str], cfg: DedupConfig) -> tuple[float, dict[int, int]]:
    """Seconds and {dropped document: the kept document it was merged into}."""
    start = time.perf_counter()
    result = deduplicate(docs, cfg)
    seconds = time.perf_counter() - start
    return seconds, {b: a for a, b in result.pairs}


def run_datasketch(docs: list[str], cfg: DedupConfig) -> tuple[float, dict[int, int]]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    merged: dict[int, int] = {}
    for i, doc in enumerate(docs):
        words = simplify(doc).split()
        shingles = {" ".join(words[j : j + cfg.ngram]).encode() for j in range(len(words) - cfg.ngram + 1)}
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch(list(shingles))
        found = lsh.query(m)
        if found:
            merged[i] = min(found)
        else:
            lsh.insert(i, m)
    return time.perf_counter() - start, merged


def score(merged: dict[int, int], pairs: list[tuple[int, int]], negatives: list[tuple[int, int]]) -> tuple[float, int]:
    recall = float(np.mean([merged.get(b) == a for a, b in pairs]))
    false_merges = sum(b in merged for _, b in negatives)
    return recall, false_merges


def _row(name: str, docs_per_s: float, recall: float, false_merges: int, seconds: float) -> None:
    print(f"{name:<11} {docs_per_s:10,.0f} docs/s   recall {recall:.4f}   false merges {false_merges:5d}", end="")
    print(f"   ({seconds:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--skip-datasketch", action="store_true")
    args = parser.parse_args()
    cfg = DedupConfig(exact=False, unit="word", ngram=5, bands=14, rows=8)
    docs, pairs, negatives = make_corpus(args.docs)
    j_pairs, j_neg = true_jaccard(docs, pairs, cfg.ngram), true_jaccard(docs, negatives, cfg.ngram)
    print(f"{len(docs):,} documents of {WORDS_PER_DOC} words: {len(pairs):,} planted near-duplicate pairs")
    print(f"  (true Jaccard {j_pairs.min():.2f}-{j_pairs.max():.2f}), {len(negatives):,} hard negatives")
    print(f"  (true Jaccard {j_neg.min():.2f}-{j_neg.max():.2f}, must be kept)")
    expected = float(np.mean(1 - (1 - j_pairs**cfg.rows) ** cfg.bands))
    print(f"LSH detection probability of the planted pairs {expected:.4f} (the recall either side can reach)")

    seconds, merged = run_lmstack(docs, cfg)
    ours = len(docs) / seconds
    recall, false_merges = score(merged, pairs, negatives)
    print(
        f"lmstack     {ours:10,.0f} docs/s   recall {recall:.4f}   false merges {false_merges:5d}   ({seconds:.1f} s)"
    )
    if not args.skip_datasketch:
        seconds, merged_ds = run_datasketch(docs, cfg)
        theirs = len(docs) / seconds
        recall_ds, false_ds = score(merged_ds, pairs, negatives)
        _row("datasketch", theirs, recall_ds, false_ds, seconds)
        print(f"ratio       {ours / theirs:10.2f}x docs/s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory {peak_mb:10,.0f} MB (max RSS of this process, both runs)")


if __name__ == "__main__":
    main()
