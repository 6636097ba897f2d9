"""Single-stream decode with the fused CPU ops (lmstack.model.cpu_ops) on and off, in one process.

The same fused model (default: SmolLM2-135M-Instruct's shipped Q4_1 GGUF, kept packed, as in
`benchmarks/decode_speed.py`'s "lmstack Q4_1" row) decodes the chat prompt greedily through
`generate_tokens`, once with the fused RMSNorm / RoPE / SiLU*up ops and once inside
`cpu_ops.disabled()` (the PyTorch ops they replace), rounds interleaved; the table shows the median
tokens/s from the first generated token to the last and the ratio against the PyTorch path measured in
this run. With packed weights the two paths' greedy tokens can part after a few tokens: the kernels
quantize activations to int8 per 32 values, so a last-bit difference (RMSNorm sums its squares in
another order) can move a rounding step, and two near-tied logits swap (the fp32 model keeps them
equal). `--profile` adds torch.profiler's operator time per generated token (self CPU time of every aten
op and of the fused `lmstack::` ops, prefill included) for each path, with the ops that take most of it.

`--threads 1 --clock cpu` times this process's CPU time instead of wall time, so other processes' load
barely moves the figures (as in decode_speed.py).

    python benchmarks/cpu_ops_speed.py --tokens 64 --rounds 5 --threads 2 --profile
"""

from __future__ import annotations

import contextlib
import os
import statistics

import torch
from decode_speed import CLOCKS, PROMPT, decode_arguments, decode_rate  # the sibling benchmark in benchmarks/
from torch.profiler import ProfilerActivity, profile

from lmstack.engine.generate import SamplingParams, generate_tokens
from lmstack.hub import load_model
from lmstack.model import cpu_ops
from lmstack.model.transformer import fuse_for_inference

PATHS = {"fused CPU ops": contextlib.nullcontext, "PyTorch ops": cpu_ops.disabled}
PEER = "PyTorch ops"


def profile_per_token(run, tokens: int, top: int) -> tuple[float, list[tuple[str, float, float]]]:
    """Operator self-CPU time per token (ms) and the `top` ops as (name, us per token, calls per token)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "lmstack::"))]
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / tokens
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return total_ms, [(e.key, e.self_cpu_time_total / tokens, e.count / tokens) for e in events[:top]]


def main() -> None:
    parser = decode_arguments(__doc__)
    parser.add_argument("--profile", action="store_true", help="also print the profiler's per-token op time")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, keep_quantized=True)
    model = fuse_for_inference(model.eval())
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)

    def runner(path: str):
        def run() -> list[tuple[int, float]]:
            with PATHS[path]():
                return [(token, clock()) for token in generate_tokens(model, prompt_ids, params)]

        return run

    tokens = {path: [t for t, _ in runner(path)()] for path in PATHS}  # warm-up (builds the ops once)
    agree = next((i for i, (a, b) in enumerate(zip(*tokens.values(), strict=True)) if a != b), args.tokens)
    rates: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(args.rounds):
        for path in PATHS:
            rates[path].append(decode_rate([t for _, t in runner(path)()]))
    medians = {path: statistics.median(r) for path, r in rates.items()}
    print(
        f"\nsingle-stream decode, {args.model} packed, {args.tokens} tokens, {args.threads} threads, {args.clock} "
        f"clock, median of "
        f"{args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f}; the paths' greedy tokens "
        f"agree for the first {agree} of {args.tokens}"
    )
    print(f"{'path':16s} {'tok/s':>8s} {'ms/token':>9s} {'min-max':>13s} {'vs PyTorch':>10s}")
    for path, rate in medians.items():
        spread = f"{min(rates[path]):.1f}-{max(rates[path]):.1f}"
        print(f"{path:16s} {rate:8.1f} {1000 / rate:9.2f} {spread:>13s} {rate / medians[PEER]:9.2f}x")
    if args.profile:
        for path in PATHS:
            total, top = profile_per_token(runner(path), args.tokens, top=8)
            print(f"\n{path}: {total:.2f} ms of operator time per token (profiler, self CPU)")
            for name, us, calls in top:
                print(f"  {name:52s} {us:8.1f} us/token {calls:6.1f} calls/token")


if __name__ == "__main__":
    main()
