"""Quality-filter throughput: lmstack's curation blocks against datatrove's, same documents, same rules.

    python benchmarks/curate_throughput.py              # ~20k documents, 3 alternating rounds
    python benchmarks/curate_throughput.py --docs 5000 --rounds 5

The corpus is the standard library's docstrings (real English technical prose, `lmstack.data.builtin`) with
1 in 20 documents planted as an exact copy and 1 in 20 as a near copy, cycled to the requested size.
Both sides run gopher_repetition -> gopher_quality -> c4 -> fineweb in one process (the blocks
of FineWeb's recipe; FineWeb's duplicate-line ratio at the paper's 0.1 on both sides). Both split English
words with spaCy's rule-based tokenizer; lmstack splits each document once for all blocks and counts
n-gram repetition on hashed n-grams. MinHash dedup is compared separately (benchmarks/dedup_throughput.py).
Rounds alternate between the two; the median docs/s of each is reported, with keep/drop agreement.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from lmstack.data.builtin import write_builtin_corpus
from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.curate.filters import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig


def make_corpus(n_docs: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        write_builtin_corpus(path, max_bytes=8_000_000)
        base = [json.loads(line)["text"] for line in path.open()]
    rng = random.Random(0)
    docs: list[str] = []
    while len(docs) < n_docs:
        text = base[len(docs) % len(base)]
        docs.append(text)
        if len(docs) % 20 == 0:
            docs.append(text)  # exact copy
        elif len(docs) % 20 == 10:
            words = text.split()
            for i in rng.sample(range(len(words)), max(1, len(words) // 50)):
                words[i] = "changed"
            docs.append(" ".join(words))  # near copy
    return docs[:n_docs]


def run_lmstack(texts: list[str]) -> tuple[float, list[str]]:
    blocks = [
        GopherRepetitionConfig().build(),
        GopherQualityConfig().build(),
        C4Config().build(),
        FineWebConfig().build(),
    ]
    start = time.perf_counter()
    docs = iter(Document(t, str(i)) for i, t in enumerate(texts))
    for block in blocks:
        docs = block.run(docs, BlockStats(block.name))
    kept = [d.id for d in docs]
    return time.perf_counter() - start, kept


def run_datatrove(texts: list[str]) -> tuple[float, list[str]]:
    from datatrove.data import Document as DatatroveDocument
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    steps = [
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(),
        FineWebQualityFilter(char_duplicates_ratio=0.1),
    ]
    start = time.perf_counter()
    docs = iter(DatatroveDocument(text=t, id=str(i)) for i, t in enumerate(texts))
    for step in steps:
        docs = step.run(docs)
    kept = [d.id for d in docs]
    return time.perf_counter() - start, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts = make_corpus(args.docs)
    print(f"{len(texts):,} documents, {sum(map(len, texts)) / 1e6:.1f} MB; {args.rounds} alternating rounds")
    ours, theirs = [], []
    for _ in range(args.rounds):
        seconds, kept_ours = run_lmstack(texts)
        ours.append(len(texts) / seconds)
        seconds, kept_theirs = run_datatrove(texts)
        theirs.append(len(texts) / seconds)
    a, b = set(kept_ours), set(kept_theirs)
    agreement = 1 - len(a ^ b) / len(texts)
    print(f"lmstack     {statistics.median(ours):8,.0f} docs/s (median)   keeps {len(a):,}")
    print(f"datatrove   {statistics.median(theirs):8,.0f} docs/s (median)   keeps {len(b):,}")
    print(
        f"ratio       {statistics.median(ours) / statistics.median(theirs):8.2f}x   keep/drop agreement {agreement:.4f}"
    )


if __name__ == "__main__":
    main()
