"""MinHash + LSH throughput: lmstack's vectorized numpy MinHash against datasketch, same run, same data.

    python benchmarks/dedup_throughput.py            # 100k synthetic 200-word documents
    python benchmarks/dedup_throughput.py --docs 10000

Both sides use word 5-grams of the same simplified text, 112 permutations and LSH with 14 bands x 8
rows. Every 10th document is followed by a planted near-duplicate (a few words replaced, a sentence
swapped); recall is the share of planted pairs that end up together (same LSH bucket / same cluster).
Single process on both sides, so docs/s is per core. Peak memory is this process's max RSS.
Measured on 2 cores, 100k docs: lmstack 10,000-13,500 docs/s, datasketch 1,640-1,970 (6.1-6.8x).
Recall over 6 permutation seeds at 20k docs: lmstack 0.882-0.912 (mean 0.900), datasketch
0.885-0.914 (mean 0.904), expectation from the true Jaccard 0.903.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import numpy as np

from lmstack.data.curate.dedup import DedupConfig, MinHasher, near_duplicate_clusters
from lmstack.data.curate.text import simplify

WORDS_PER_DOC = 200
DUP_EVERY = 10


def make_corpus(n_docs: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(30_000)]
    docs: list[str] = []
    pairs: list[tuple[int, int]] = []
    while len(docs) < n_docs:
        words = rng.choices(vocab, k=WORDS_PER_DOC)
        docs.append(" ".join(words))
        if len(docs) % DUP_EVERY == 0 and len(docs) < n_docs:
            near = list(words)
            for i in rng.sample(range(WORDS_PER_DOC), 4):  # 4 substitutions
                near[i] = rng.choice(vocab)
            cut = rng.randrange(20, WORDS_PER_DOC - 20)  # move the last stretch to the front
            near = near[cut + 180 - WORDS_PER_DOC + 20 :] + near[: cut + 180 - WORDS_PER_DOC + 20]
            pairs.append((len(docs) - 1, len(docs)))
            docs.append(" ".join(near))
    return docs, pairs


def expected_recall(docs: list[str], pairs: list[tuple[int, int]], cfg: DedupConfig) -> float:
    """Mean over planted pairs of the LSH detection probability 1 - (1 - J^rows)^bands."""

    def shingles(doc: str) -> set[str]:
        words = simplify(doc).split()
        return {" ".join(words[j : j + cfg.ngram]) for j in range(len(words) - cfg.ngram + 1)}

    jaccard = np.array([len(a & b) / len(a | b) for a, b in ((shingles(docs[i]), shingles(docs[j])) for i, j in pairs)])
    return float(np.mean(1 - (1 - jaccard**cfg.rows) ** cfg.bands))


def run_lmstack(docs: list[str], cfg: DedupConfig) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    signatures = MinHasher(cfg.num_perm, cfg.ngram, "word", cfg.seed).signatures(docs)
    labels = near_duplicate_clusters(signatures, cfg)
    return time.perf_counter() - start, labels


def run_datasketch(docs: list[str], cfg: DedupConfig) -> tuple[float, list[set[int]]]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    sketches = []
    for i, doc in enumerate(docs):
        words = simplify(doc).split()
        shingles = {" ".join(words[j : j + cfg.ngram]).encode() for j in range(len(words) - cfg.ngram + 1)}
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch(list(shingles))
        lsh.insert(i, m)
        sketches.append(m)
    neighbours = [set(lsh.query(m)) for m in sketches]
    return time.perf_counter() - start, neighbours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--skip-datasketch", action="store_true")
    args = parser.parse_args()
    cfg = DedupConfig(ngram=5, bands=14, rows=8)
    docs, pairs = make_corpus(args.docs)
    print(f"{len(docs):,} documents of {WORDS_PER_DOC} words, {len(pairs):,} planted near-duplicate pairs")
    print(f"expected recall {expected_recall(docs, pairs, cfg):.4f} (from the pairs' true Jaccard; each run's")
    print("  recall scatters around it by the draw of its permutations, for both implementations)")

    seconds, labels = run_lmstack(docs, cfg)
    ours = len(docs) / seconds
    recall = np.mean([labels[a] == labels[b] for a, b in pairs])
    print(f"lmstack     {ours:10,.0f} docs/s   recall {recall:.4f}   ({seconds:.1f} s)")
    if not args.skip_datasketch:
        seconds, neighbours = run_datasketch(docs, cfg)
        theirs = len(docs) / seconds
        recall_ds = np.mean([b in neighbours[a] for a, b in pairs])
        print(f"datasketch  {theirs:10,.0f} docs/s   recall {recall_ds:.4f}   ({seconds:.1f} s)")
        print(f"ratio       {ours / theirs:10.2f}x")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory {peak_mb:10,.0f} MB (max RSS of this process, both runs)")


if __name__ == "__main__":
    main()
