"""Training throughput: lmstack's `tiny-gpt2` preset against nanoGPT's model.py, same config, batch and setup.

Run:
    python benchmarks/train_throughput.py --nanogpt /path/to/nanoGPT        # ours vs nanoGPT
    python benchmarks/train_throughput.py                                    # ours only
Get nanoGPT with `git clone https://github.com/karpathy/nanoGPT` (nothing of it is copied here; its
model.py is imported from the path you give).

Both models: GPT-2 family, 4 layers x 128 dims, 4 heads, T=256, B=16, vocab 4096, fp32, dropout 0,
tied embeddings, biases, exact (erf) GELU as nanoGPT's `nn.GELU()` (our GPT-2 default is GPT-2's
tanh approximation, which costs about 4% more on CPU). Each trains the way its own project does:
ours with lmstack's optimizer (`build_optimizer`: AdamW groups, the fused AdamW kernel), gradient
clipping and `set_to_none` zeroing (the inner step of `lmstack train`); nanoGPT with its
`configure_optimizers` (on CPU: AdamW's per-tensor loop) and the step of its train.py, clipping
included. Both see the same random token batches and the same torch thread count.

Every figure is the median of `--rounds` (>= 5) timed rounds that alternate who goes first, so
machine noise hits both alike:
  1. model against model, in this process with the default allocator: the whole training step,
     and forward + backward alone (which shows how much of the gap is the optimizer);
  2. trainer against trainer, each in a fresh process with glibc's allocator tuned the way
     `lmstack train` tunes it on CPU (`tune_cpu_allocator`), for nanoGPT too: equal terms;
  3. the allocator effect on its own line: each contender's tuned fresh process against an untuned one.
MFU uses a peak FLOP/s measured in the same run with a large fp32 matmul.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmstack.config import TrainConfig, model_config
from lmstack.model.transformer import Transformer
from lmstack.track import measure_peak_flops
from lmstack.train.optim import build_optimizer
from lmstack.train.pretrain import tune_cpu_allocator

VOCAB, N_LAYER, N_HEAD, D_MODEL, SEQ, BATCH = 4096, 4, 4, 128, 256, 16
WARMUP_STEPS = 3
Batches = list[tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[int], torch.Tensor]


def load_nanogpt(path: str):
    file = Path(path) / "model.py"
    if not file.is_file():
        sys.exit(f"no model.py in {path}; pass --nanogpt PATH to a nanoGPT checkout")
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(batches: Batches) -> tuple[Step, Step]:
    """(training step, forward + backward alone) for lmstack's model and optimizer."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=model_config("tiny-gpt2", gelu_approximate="none"), batch_size=BATCH, seq_len=SEQ, lr=1e-3)
    model = Transformer(cfg.model).train()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    params = [p for group in opt.param_groups for p in group["params"]]

    def forward_backward(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        loss = model(x, y).loss
        loss.backward()
        return loss

    def step(i: int) -> torch.Tensor:
        loss = forward_backward(i)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, _zeroing(forward_backward, model)


def nanogpt(module, batches: Batches) -> tuple[Step, Step]:
    """(training step, forward + backward alone) for nanoGPT's model, optimizer and train.py step."""
    torch.manual_seed(0)
    conf = module.GPTConfig(
        block_size=SEQ, vocab_size=VOCAB, n_layer=N_LAYER, n_head=N_HEAD, n_embd=D_MODEL, dropout=0.0, bias=True
    )
    model = module.GPT(conf).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")

    def forward_backward(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        _, loss = model(x, y)
        loss.backward()
        return loss

    def step(i: int) -> torch.Tensor:
        loss = forward_backward(i)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, _zeroing(forward_backward, model)


def _zeroing(forward_backward: Step, model: torch.nn.Module) -> Step:
    """Forward + backward, then drop the gradients (as the full step does) so none accumulate."""

    def run(i: int) -> torch.Tensor:
        loss = forward_backward(i)
        model.zero_grad(set_to_none=True)
        return loss

    return run


# Wall-clock time by default. `--clock cpu` times this process's CPU time instead: on a machine
# shared with other jobs and with --threads 1 it is what the step costs, whatever the others do.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(step: Step, start: int, n: int) -> float:
    t0 = clock()
    for i in range(start, start + n):
        loss = step(i)
    float(loss.detach())
    return clock() - t0


def peak_flops(clock_name: str) -> float:
    """fp32 matmul FLOP/s measured with the clock the steps are timed with (MFU's denominator)."""
    if clock_name == "wall":
        return measure_peak_flops(torch.device("cpu"), torch.float32)
    a = torch.randn(1536, 1536, generator=torch.Generator().manual_seed(0))
    a @ a
    best = float("inf")
    for _ in range(3):
        t0 = clock()
        for _ in range(3):
            a @ a
        best = min(best, (clock() - t0) / 3)
    return 2 * 1536**3 / best


def make_batches() -> Batches:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        batches.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return batches


def alternating(names: list, rounds: int):
    """(round, name) pairs: every round runs everyone once, odd rounds in reverse order."""
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            yield r, name


def run_worker(args) -> None:
    """One contender's training steps in a fresh process; prints the seconds of one timed round."""
    if args.allocator == "tuned":
        tune_cpu_allocator()  # what `lmstack train` does on CPU, given here to both contenders
    batches = make_batches()
    step, _ = ours(batches) if args.worker == "lmstack" else nanogpt(load_nanogpt(args.nanogpt), batches)
    timed(step, 0, WARMUP_STEPS)
    print(json.dumps({"seconds": timed(step, WARMUP_STEPS, args.steps)}))


def worker_seconds(name: str, allocator: str, args) -> float:
    cmd = [sys.executable, __file__, "--worker", name, "--allocator", allocator]
    cmd += ["--steps", str(args.steps), "--threads", str(torch.get_num_threads()), "--clock", args.clock]
    if args.nanogpt:
        cmd += ["--nanogpt", args.nanogpt]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def print_rates(title: str, seconds: dict[str, list[float]], tokens: int, flops_per_token: float, peak: float) -> None:
    print(f" {title}:")
    for name, times in seconds.items():
        rate = tokens / statistics.median(times)
        spread = f"{tokens / max(times):,.0f}-{tokens / min(times):,.0f}"
        mfu = 100 * rate * flops_per_token / peak
        print(f"  {name:8s} {rate:9,.0f} tokens/s (rounds {spread})   MFU {mfu:5.1f}%")
    if "nanoGPT" in seconds:
        ratio = statistics.median(seconds["nanoGPT"]) / statistics.median(seconds["lmstack"])
        print(f"  ratio lmstack / nanoGPT: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", help="path to a nanoGPT checkout (its model.py is imported)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (median; at least 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every contender")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall time, or CPU time (shared machine, 1 thread)"
    )
    parser.add_argument("--worker", choices=["lmstack", "nanogpt"], help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["tuned", "default"], default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args)
        return
    if args.rounds < 5:
        parser.error("--rounds must be at least 5 (the figures are medians of alternating rounds)")

    batches = make_batches()
    contenders = {"lmstack": ours(batches)}
    if args.nanogpt:
        contenders["nanoGPT"] = nanogpt(load_nanogpt(args.nanogpt), batches)
    names = list(contenders)
    peak = peak_flops(args.clock)
    flops_per_token = model_config("tiny-gpt2").flops_per_token(SEQ)
    tokens = BATCH * SEQ * args.steps
    print(
        f"train throughput, {N_LAYER} layers x {D_MODEL} dims, T={SEQ}, B={BATCH}, vocab {VOCAB}, fp32, "
        f"{torch.get_num_threads()} threads; measured peak {peak / 1e9:.1f} GFLOP/s (fp32 matmul, {args.clock} clock); "
        f"median of {args.rounds} alternating rounds of {args.steps} steps",
        flush=True,
    )

    # 1. Model against model: one process, default allocator.
    for step, forward_backward in contenders.values():
        timed(step, 0, WARMUP_STEPS)  # allocator, optimizer state, kernels
        timed(forward_backward, 0, 1)
    for phase, which in (("training step", 0), ("forward + backward only", 1)):
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for r, name in alternating(names, args.rounds):
            seconds[name].append(timed(contenders[name][which], WARMUP_STEPS + r * args.steps, args.steps))
        print_rates(f"same process, default allocator, {phase}", seconds, tokens, flops_per_token, peak)

    # 2 and 3. Fresh processes, each contender with and without the allocator tuning of `lmstack train`.
    runs = [(name, allocator) for name in names for allocator in ("tuned", "default")]
    fresh: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for _, (name, allocator) in alternating(runs, args.rounds):
        fresh[(name, allocator)].append(worker_seconds(name.lower(), allocator, args))
    tuned = {name: fresh[(name, "tuned")] for name in names}
    print_rates("fresh process each, glibc allocator tuned for both", tuned, tokens, flops_per_token, peak)
    effects = ", ".join(
        f"{name} {statistics.median(fresh[(name, 'default')]) / statistics.median(fresh[(name, 'tuned')]):.2f}x"
        for name in names
    )
    print(f" allocator effect (tuned / default tokens/s, fresh processes): {effects}")


if __name__ == "__main__":
    main()
