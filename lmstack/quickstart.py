"""`lmstack quickstart`: the whole pretraining path on built-in text, in a few minutes on a CPU.

1. corpus     real English prose that every Python install has (standard-library docstrings)
2. tokenizer  byte-level BPE, 4,096 tokens
3. shards     token ids + meta.json, 2% of documents held out for validation
4. pretrain   the `tiny` preset (~1M parameters) for a fixed time budget
5. sample     a few continuations from the trained checkpoint
Everything lands in one folder; the last lines say what to open and what to try next.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from lmstack.config import load_train_config
from lmstack.data.builtin import write_builtin_corpus
from lmstack.data.tokenize import tokenize_corpus
from lmstack.engine.generate import generate_text
from lmstack.model.io import load_model_dir
from lmstack.tokenizer import train_tokenizer_from_files
from lmstack.train.pretrain import pretrain

SAMPLE_PROMPTS = ["Return the", "This module provides", "If the file"]


def _say(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def quickstart(out: str | Path = "runs/quickstart", minutes: float = 4.0, threads: int = 0) -> dict:
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    n_docs = write_builtin_corpus(corpus)
    _say(f"1/5 corpus: {n_docs:,} documents ({corpus.stat().st_size / 1e6:.1f} MB) -> {corpus}")

    tokenizer = train_tokenizer_from_files([corpus], vocab_size=4096, out_dir=out / "tokenizer")
    _say(f"2/5 tokenizer: {tokenizer.vocab_size:,} tokens -> {out / 'tokenizer'}")

    meta = tokenize_corpus([corpus], out / "tokenizer", out / "data", val_fraction=0.02)
    _say(f"3/5 shards: {meta['splits']['train']['tokens']:,} train / {meta['splits']['val']['tokens']:,} val tokens")

    run_dir = out / "run"
    if run_dir.exists():  # a rerun starts a fresh run rather than resuming an old one
        shutil.rmtree(run_dir)
    cfg = load_train_config(
        None,
        [
            "model=tiny",
            f"data={out / 'data'}",
            f"out={run_dir}",
            "max_steps=100000",
            f"max_minutes={minutes}",
            "batch_size=16",
            "seq_len=256",
            "lr=3e-3",
            "warmup_steps=50",
            "eval_every=100",
            "save_every=500",
            f"threads={threads}",
            "sample_prompt=Return the",
        ],
    )
    _say(f"4/5 pretraining the tiny model for {minutes:g} minutes (Ctrl-C stops early and keeps the checkpoint)")
    summary = pretrain(cfg)

    model, tok = load_model_dir(run_dir / "checkpoint")
    _say("5/5 samples from the trained model:")
    for prompt in SAMPLE_PROMPTS:
        text = generate_text(model, tok, prompt, max_new_tokens=40, temperature=0.8, top_k=50, seed=0)
        print(f"  {prompt!r} -> {prompt}{text}", file=sys.stderr)

    elapsed = time.time() - started
    ckpt = run_dir / "checkpoint"
    _say(f"done in {elapsed / 60:.1f} min; final val loss {summary.get('val_loss', float('nan')):.3f}")
    print(
        "\n".join(
            [
                f"  loss curve : {run_dir / 'loss.png'}",
                f"  report     : {run_dir / 'report.html'}",
                f"  metrics    : {run_dir / 'metrics.jsonl'}   (TensorBoard: tensorboard --logdir {run_dir / 'tb'})",
                f"  checkpoint : {ckpt}",
                "next:",
                f"  lmstack generate --model {ckpt} --prompt 'The function' --max-new-tokens 60",
                f"  lmstack train --recipe recipes/tiny.yaml --data {out / 'data'} --out runs/tiny",
                f"  lmstack convert --model {ckpt} --to hf --out {out / 'hf'}",
                "  lmstack chat --model smollm2-135m-instruct      (needs: pip install -e '.[models]')",
            ]
        ),
        file=sys.stderr,
    )
    summary["elapsed_s"] = elapsed
    return summary
