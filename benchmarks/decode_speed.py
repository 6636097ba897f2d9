"""Single-stream decode speed on SmolLM2-135M-Instruct: lmstack vs transformers `generate()` vs llama.cpp.

Run:  python benchmarks/decode_speed.py [--model smollm2-135m-instruct] [--tokens 64] [--rounds 5] [--threads 2]
      [--rows NAME ...] [--clock wall|cpu]

Every row decodes the same chat prompt greedily for --tokens new tokens (eos ignored) and records the
time at which each token arrives, so decode speed is measured directly from the first generated token
to the last (never "total minus prefill"): lmstack through `generate_tokens`, transformers through a
streamer passed to `generate()`, llama.cpp (`llama-cpp-python`, the shipped Q4_1 GGUF) through its
token generator. Rounds are interleaved (row 1, row 2, ... then again), so load from other processes
hits every row alike; the table shows the median over rounds and the ratio to transformers measured
in this same run. Compare ratios, not absolute figures, across machines and runs. On a machine other
processes load, `--threads 1 --clock cpu` counts this process's CPU time only (no waiting for a core,
no thread barrier stalls); the header prints the load average the run saw.

Other rows (quantized lmstack against llama.cpp Q8_0/Q4_1, say) are one function each: append a
`Row(name, setup)` to `ROWS`, where `setup(ctx)` loads once and returns a callable that decodes and
returns the per-token arrival times (`lmstack_decoder(model, ctx)` builds one for any lmstack model).
Missing optional peers print as "not installed".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PROMPT = "Write a short paragraph about why the sky is blue."

Decode = Callable[[], list[float]]  # one run: now() at the arrival of each generated token
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def now() -> float:
    """The selected clock: wall time, or this process's CPU time (--clock cpu: with --threads 1 it does
    not count the time other processes hold the cores, so it stays comparable on a loaded machine)."""
    return _clock()


@dataclass
class Context:
    model_ref: str
    tokens: int
    threads: int
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class Row:
    name: str
    setup: Callable[[Context], Decode | None]  # None: the peer is not installed


def lmstack_decoder(model, ctx: Context, fuse: bool = True) -> Decode:
    """Greedy single-stream decode through `generate_tokens`, weights fused once unless `fuse` is False
    (quantized rows reuse it)."""
    from lmstack.engine.generate import SamplingParams, generate_tokens
    from lmstack.model.transformer import fuse_for_inference

    model = fuse_for_inference(model.eval()) if fuse else model.eval()
    params = SamplingParams(max_new_tokens=ctx.tokens, temperature=0, ignore_eos=True)

    def run() -> list[float]:
        return [now() for _ in generate_tokens(model, ctx.prompt_ids, params)]

    run()  # warm-up
    return run


def _lmstack_fp32(ctx: Context) -> Decode:
    from lmstack.hub import load_model

    model, _ = load_model(ctx.model_ref)
    return lmstack_decoder(model, ctx)


def _lmstack_fp32_mkl(ctx: Context) -> Decode:
    """The fused fp32 model with its linears back on `F.linear` (MKL) instead of `cpu_ops.linear`: what
    the skinny-GEMM kernel gains (such a step cannot be captured, so it runs eagerly too)."""
    from lmstack.hub import load_model
    from lmstack.model.transformer import InferenceLinear, fuse_for_inference

    model = fuse_for_inference(load_model(ctx.model_ref)[0].eval())
    for module in model.modules():
        if type(module) is InferenceLinear:
            module.__class__ = torch.nn.Linear
    return lmstack_decoder(model, ctx, fuse=False)


def _lmstack_bf16(ctx: Context) -> Decode:
    """The model cast to bf16: bf16 weights read by `cpu_ops.linear` with fp32 sums (on CPUs without
    bf16 arithmetic), activations rounded to bf16 between layers."""
    from lmstack.hub import load_model

    model, _ = load_model(ctx.model_ref)
    return lmstack_decoder(model.to(torch.bfloat16), ctx)


def _transformers(ctx: Context, dtype: torch.dtype = torch.float32) -> Decode | None:
    try:
        import transformers
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        return None
    from lmstack.hub import resolve

    _, path = resolve(ctx.model_ref)
    if str(path).endswith(".gguf"):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.calls = 0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls > 1:  # the first put is the prompt
                self.times.append(now())

        def end(self) -> None:
            pass

    ids = torch.tensor([ctx.prompt_ids])

    def run() -> list[float]:
        clock = Clock()
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=ctx.tokens,
                min_new_tokens=ctx.tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                streamer=clock,
            )
        return clock.times

    run()
    return run


def _llama_cpp(ctx: Context) -> Decode | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    from lmstack.hub import resolve

    _, path = resolve(ctx.model_ref)
    if not str(path).endswith(".gguf"):
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_threads=ctx.threads, n_ctx=1024, verbose=False)

    def run() -> list[float]:
        times = []
        for _ in llm.generate(ctx.prompt_ids, top_k=1, temp=0.0, reset=True):
            times.append(now())
            if len(times) == ctx.tokens:
                break
        return times

    run()
    return run


def _lmstack_quantized(kind: str) -> Callable[[Context], Decode]:
    """lmstack running packed weights through its kernels (lmstack.compress): the shipped Q4_1 GGUF as it
    is ("gguf"), or the float model quantized in memory by `quantize_model` ("int8" = Q8_0 layout,
    "int4" = Q4_0 layout, both group 32, int8 head)."""

    def setup(ctx: Context) -> Decode:
        from lmstack.compress.model import quantize_model
        from lmstack.engine.generate import SamplingParams, generate_tokens
        from lmstack.hub import load_model
        from lmstack.model.transformer import fuse_for_inference

        model, _ = load_model(ctx.model_ref, keep_quantized=kind == "gguf")
        if kind != "gguf":
            quantize_model(model, kind, group_size=32)
        model = fuse_for_inference(model.eval())
        params = SamplingParams(max_new_tokens=ctx.tokens, temperature=0, ignore_eos=True)

        def run() -> list[float]:
            return [now() for _ in generate_tokens(model, ctx.prompt_ids, params)]

        run()  # warm-up (builds the kernels once)
        return run

    return setup


def _llama_cpp_export(dtype: str) -> Callable[[Context], Decode | None]:
    """llama.cpp on a GGUF lmstack writes: the float model as `--dtype q8_0` (llama.cpp's own Q8_0
    rounding), or lmstack's int4 model as q4_0 (its blocks byte for byte), to compare at equal bits."""

    def setup(ctx: Context) -> Decode | None:
        import tempfile
        from pathlib import Path

        from lmstack.compress.model import quantize_model
        from lmstack.convert.gguf import save_gguf
        from lmstack.hub import load_model

        model, tokenizer = load_model(ctx.model_ref)
        if dtype == "q4_0":
            quantize_model(model, "int4", group_size=32)
        path = Path(tempfile.mkdtemp()) / f"model-{dtype}.gguf"
        save_gguf(model, tokenizer, path, dtype=dtype)
        return _llama_cpp(Context(str(path), ctx.tokens, ctx.threads, ctx.prompt_ids))

    return setup


ROWS: list[Row] = [
    Row("transformers fp32 generate()", _transformers),
    Row("lmstack fp32", _lmstack_fp32),
    Row("lmstack fp32, linears through MKL", _lmstack_fp32_mkl),
    Row("transformers bf16 generate()", lambda ctx: _transformers(ctx, torch.bfloat16)),
    Row("lmstack bf16", _lmstack_bf16),
    Row("llama.cpp Q4_1 (GGUF)", _llama_cpp),
    Row("lmstack Q4_1 (same GGUF, packed)", _lmstack_quantized("gguf")),
    Row("llama.cpp Q8_0 (lmstack export)", _llama_cpp_export("q8_0")),
    Row("lmstack int8 (Q8_0 layout)", _lmstack_quantized("int8")),
    Row("llama.cpp Q4_0 (lmstack int4 export)", _llama_cpp_export("q4_0")),
    Row("lmstack int4 (Q4_0 layout)", _lmstack_quantized("int4")),
]
PEER = "transformers fp32 generate()"  # the ratio column is relative to this row


def decode_rate(times: list[float]) -> float:
    """Tokens per second between the first and the last generated token."""
    return (len(times) - 1) / (times[-1] - times[0])


def decode_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options every single-stream decode benchmark takes (this one and cpu_ops_speed.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (with --threads 1)"
    )
    return parser


def main() -> None:
    parser = decode_arguments(__doc__)
    parser.add_argument("--rows", nargs="*", help="names of rows to run (default: all)")
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    from lmstack.hub import load_model

    _, tokenizer = load_model(args.model)
    ctx = Context(args.model, args.tokens, args.threads)
    ctx.prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))

    rows = [r for r in ROWS if not args.rows or r.name in args.rows]
    runners: dict[str, Decode] = {}
    for row in rows:
        runner = row.setup(ctx)
        if runner is None:
            print(f"{row.name}: not installed, skipped")
        else:
            runners[row.name] = runner
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            rates[name].append(decode_rate(runner()))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    peer = medians.get(PEER)
    print(
        f"\nsingle-stream decode, {args.tokens} tokens, {args.threads} threads, {args.clock} clock, "
        f"median of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'row':34s} {'tok/s':>8s} {'min-max':>13s} {'vs peer':>8s}")
    for name, rate in medians.items():
        ratio = f"{rate / peer:.2f}x" if peer else "-"
        spread = f"{min(rates[name]):.1f}-{max(rates[name]):.1f}"
        print(f"{name:34s} {rate:8.1f} {spread:>13s} {ratio:>8s}")


if __name__ == "__main__":
    main()
