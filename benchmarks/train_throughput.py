"""Training throughput: lmstack's `tiny-gpt2` preset against nanoGPT's model.py, same config and batch.

Run:
    python benchmarks/train_throughput.py --nanogpt /path/to/nanoGPT        # ours vs nanoGPT
    python benchmarks/train_throughput.py                                    # ours only
Get nanoGPT with `git clone https://github.com/karpathy/nanoGPT` (nothing of it is copied here; its
model.py is imported from the path you give).

Both models: GPT-2 family, 4 layers x 128 dims, 4 heads, T=256, B=16, vocab 4096, fp32, dropout 0,
tied embeddings, biases, exact (erf) GELU as nanoGPT's `nn.GELU()` (our GPT-2 default is GPT-2's
tanh approximation, which costs about 4% more on CPU). Each trains the way its own project does:
ours with lmstack's AdamW groups, gradient clipping and `set_to_none` zeroing (the inner step of
`lmstack train`); nanoGPT with its `configure_optimizers` and the step of its train.py. Both see
the same random token batches.
Two comparisons, each of the best of `--rounds` timed rounds that alternate who goes first, so
machine noise hits both alike:
  1. model against model: both in this process with the default allocator;
  2. trainer against trainer: each in a fresh process set up as its own training script sets it up
     (`lmstack train` raises glibc's mmap/trim thresholds on CPU, see `tune_cpu_allocator`;
     nanoGPT's train.py does not).
MFU uses a peak FLOP/s measured in the same run with a large fp32 matmul.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmstack.config import TrainConfig, model_config
from lmstack.model.transformer import Transformer
from lmstack.track import measure_peak_flops
from lmstack.train.optim import build_optimizer
from lmstack.train.pretrain import tune_cpu_allocator

VOCAB, N_LAYER, N_HEAD, D_MODEL, SEQ, BATCH = 4096, 4, 4, 128, 256, 16


def load_nanogpt(path: str):
    file = Path(path) / "model.py"
    if not file.is_file():
        sys.exit(f"no model.py in {path}; pass --nanogpt PATH to a nanoGPT checkout")
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours_step_fn(batches):
    torch.manual_seed(0)
    cfg = TrainConfig(model=model_config("tiny-gpt2", gelu_approximate="none"), batch_size=BATCH, seq_len=SEQ, lr=1e-3)
    model = Transformer(cfg.model).train()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    params = [p for group in opt.param_groups for p in group["params"]]

    def step(i):
        x, y = batches[i % len(batches)]
        loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def nanogpt_step_fn(module, batches):
    torch.manual_seed(0)
    conf = module.GPTConfig(
        block_size=SEQ,
        vocab_size=VOCAB,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_embd=D_MODEL,
        dropout=0.0,
        bias=True,
    )
    model = module.GPT(conf).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")

    def step(i):
        x, y = batches[i % len(batches)]
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def timed(step, start: int, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(start, start + n):
        loss = step(i)
    float(loss.detach())
    return time.perf_counter() - t0


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        batches.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return batches


def run_worker(args) -> None:
    """One contender in a fresh process, set up the way its own training script sets up."""
    if args.worker == "lmstack":
        tune_cpu_allocator()  # what `lmstack train` does on CPU
        _, step = ours_step_fn(make_batches())
    else:
        _, step = nanogpt_step_fn(load_nanogpt(args.nanogpt), make_batches())
    timed(step, 0, 3)
    print(json.dumps({"seconds": min(timed(step, 3 + r * args.steps, args.steps) for r in range(2))}))


def worker_seconds(name: str, args) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ]
    if args.nanogpt:
        cmd += ["--nanogpt", args.nanogpt]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", help="path to a nanoGPT checkout (its model.py is imported)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", choices=["lmstack", "nanogpt"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args)
        return

    batches = make_batches()
    contenders = {"lmstack": ours_step_fn(batches)}
    if args.nanogpt:
        contenders["nanoGPT"] = nanogpt_step_fn(load_nanogpt(args.nanogpt), batches)
    peak = measure_peak_flops(torch.device("cpu"), torch.float32)
    flops_per_token = model_config("tiny-gpt2").flops_per_token(SEQ)
    tokens = BATCH * SEQ * args.steps

    # 1. Model against model: one process, default allocator, rounds alternating who goes first.
    same = {name: float("inf") for name in contenders}
    for _, step in contenders.values():
        timed(step, 0, 3)  # warm-up: allocator, optimizer state, kernels
    order = list(contenders)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            same[name] = min(same[name], timed(contenders[name][1], 3 + r * args.steps, args.steps))
    # 2. Trainer against trainer: each in a fresh process set up as its own training script does
    #    (lmstack train tunes glibc's allocator on CPU; nanoGPT's train.py does not).
    own = {name: float("inf") for name in contenders}
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            own[name] = min(own[name], worker_seconds(name.lower(), args))

    print(
        f"train throughput, {N_LAYER} layers x {D_MODEL} dims, T={SEQ}, B={BATCH}, vocab {VOCAB}, fp32, "
        f"{torch.get_num_threads()} threads; measured peak {peak / 1e9:.1f} GFLOP/s (fp32 matmul)"
    )
    for title, best in (("same process, default allocator", same), ("each as its trainer runs", own)):
        print(f" {title}:")
        for name in contenders:
            rate = tokens / best[name]
            print(f"  {name:8s} {rate:9,.0f} tokens/s   MFU {100 * rate * flops_per_token / peak:5.1f}%")
        if "nanoGPT" in best:
            print(f"  ratio lmstack / nanoGPT: {best['nanoGPT'] / best['lmstack']:.2f}x")


if __name__ == "__main__":
    main()
