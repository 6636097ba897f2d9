"""Tokenizer speed: BPE training MB/s and encoding MB/s, lmstack vs SentencePiece (BPE), same corpus and threads.

Run:  python benchmarks/tokenizer_throughput.py [--mb 8] [--vocab-size 8192] [--threads 2] [--repeats 3]

Corpus: real text every machine has, the Python standard library's source files (code, comments and
docstrings), cut to --mb megabytes. lmstack trains byte-level BPE with HF `tokenizers` (Rust) and
encodes through `tiktoken` (the same ids, checked in tests/test_tokenizer.py); the peer is
SentencePiece's BPE trainer and encoder on the same text (`pip install sentencepiece`). A third row
encodes with `tokenizers` itself (the same vocabulary), the path lmstack takes for tokenizers that
tiktoken cannot mirror.

Every library gets the same number of threads (--threads): `tokenizers`' Rayon pool through
RAYON_NUM_THREADS (set before it first runs), tiktoken's `encode_batch(num_threads=...)` (its
default is 8 threads whatever the machine has), SentencePiece's `num_threads`. Encoding is one
batch call over all documents after a warm-up call; every figure is the median of --repeats runs.
Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def load_corpus(megabytes: float) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= megabytes * 1e6:
            break
    return docs


def median_seconds(run: Callable[[], object], repeats: int, warm_up: Callable[[], object] | None = None) -> float:
    if warm_up is not None:
        warm_up()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_lmstack(docs: list[str], args) -> dict[str, float]:
    from lmstack.tokenizer import train_tokenizer

    train_s = median_seconds(lambda: train_tokenizer(iter(docs), args.vocab_size), args.repeats)
    tok = train_tokenizer(iter(docs), args.vocab_size)
    fast = tok.fast_encoder  # what Tokenizer.encode_batch calls, with the thread count pinned
    assert fast is not None, "a byte-level BPE trained by lmstack always has its tiktoken twin"

    def encode_tiktoken(texts: list[str]) -> list[list[int]]:
        return fast.encode_batch(texts, num_threads=args.threads, allowed_special="all")

    def encode_tokenizers(texts: list[str]) -> list:
        return tok.backend.encode_batch_fast(texts, add_special_tokens=False)

    warm = docs[: max(1, len(docs) // 10)]
    ids = encode_tiktoken(docs)
    assert [e.ids for e in encode_tokenizers(docs[:50])] == ids[:50]  # the same ids both ways
    return {
        "train": train_s,
        "encode": median_seconds(lambda: encode_tiktoken(docs), args.repeats, lambda: encode_tiktoken(warm)),
        "encode_tokenizers": median_seconds(
            lambda: encode_tokenizers(docs), args.repeats, lambda: encode_tokenizers(warm)
        ),
        "tokens": sum(map(len, ids)),
    }


def bench_sentencepiece(docs: list[str], args) -> dict[str, float] | None:
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(docs), encoding="utf-8")

        def train() -> None:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(Path(tmp) / "sp"),
                vocab_size=args.vocab_size,
                model_type="bpe",
                byte_fallback=True,
                input_sentence_size=10**9,
                max_sentence_length=1 << 16,
                num_threads=args.threads,
                minloglevel=2,
            )

        train_s = median_seconds(train, args.repeats)
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "sp.model"))

    def encode(texts: list[str]) -> list[list[int]]:
        return sp.encode(texts, num_threads=args.threads)

    warm = docs[: max(1, len(docs) // 10)]
    return {
        "train": train_s,
        "encode": median_seconds(lambda: encode(docs), args.repeats, lambda: encode(warm)),
        "tokens": sum(map(len, encode(docs))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2, help="threads for every library")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    args = parser.parse_args()
    # Rayon reads these when `tokenizers` first runs in parallel: set before anything imports it.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    docs = load_corpus(args.mb)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(
        f"corpus: {len(docs):,} stdlib files, {mb:.1f} MB; vocab {args.vocab_size}; {args.threads} threads each; "
        f"median of {args.repeats}"
    )
    ours = bench_lmstack(docs, args)
    print(
        f"lmstack (BPE, tiktoken enc): train {mb / ours['train']:6.2f} MB/s  encode {mb / ours['encode']:6.2f} MB/s  "
        f"{mb * 1e6 / ours['tokens']:.2f} bytes/token"
    )
    print(f"  same BPE, tokenizers enc :                    encode {mb / ours['encode_tokenizers']:6.2f} MB/s")
    peer = bench_sentencepiece(docs, args)
    if peer is None:
        print("sentencepiece not installed: no peer figures (pip install sentencepiece)")
        return
    print(
        f"sentencepiece BPE          : train {mb / peer['train']:6.2f} MB/s  encode {mb / peer['encode']:6.2f} MB/s  "
        f"{mb * 1e6 / peer['tokens']:.2f} bytes/token"
    )
    print(
        f"ratio lmstack/sentencepiece: train {peer['train'] / ours['train']:.2f}x  "
        f"encode {peer['encode'] / ours['encode']:.2f}x"
    )


if __name__ == "__main__":
    main()
