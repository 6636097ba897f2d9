"""Quantized kernels: bytes/s of lmstack's fused GEMV against fp32 streaming, then prefill tokens/s vs llama.cpp.

Run:  python benchmarks/quant_kernels.py [--threads 2] [--rounds 7] [--prompt-tokens 128]

1. GEMV (batch 1) over SmolLM2-135M's layer shapes stacked into one matrix per shape (so weights stream
   from memory, not cache): fp32 `F.linear` vs the int8 (Q8_0 layout) and int4 (Q4_0 / Q4_1 layouts)
   kernels on every SIMD path this CPU has. Prints ms, GB/s of packed bytes read, the fp32-equivalent
   GB/s (the fp32 bytes the same weights take), and the speed-up over fp32 in this run.
2. Batched GEMM (M = 16, the engine's batched decode; M = 128, prefill) against fp32 MKL.
3. Prefill of --prompt-tokens tokens on SmolLM2-135M-Instruct: lmstack running the shipped Q4_1 GGUF packed
   vs llama.cpp (`llama-cpp-python`) on the same file, rounds interleaved, median.
Figures are printed, never asserted; compare ratios within one run (other processes share the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

# SmolLM2-135M per layer: q/o (576x576), k/v (192x576), gate/up (1536x576), down (576x1536); 30 layers.
LAYER_SHAPES = {"576 -> 3072 (q,k,v,o,gate/up rows)": (576, 30 * 4224), "1536 -> 576 (down)": (1536, 30 * 576)}


def median_time(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemv_table(rounds: int) -> None:
    from lmstack.compress import kernels
    from lmstack.compress.int4 import Int4Linear
    from lmstack.compress.int8 import Int8Linear

    paths = kernels.available_isas()
    print(f"kernel paths on this CPU: {paths or 'none (torch fallback)'}; auto picks {paths[-1] if paths else '-'}")
    print(f"{'shape':36s} {'format':22s} {'path':7s} {'ms':>7s} {'GB/s':>6s} {'fp32-eq':>8s} {'vs fp32':>8s}")
    for label, (k, n) in LAYER_SHAPES.items():
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False)
        x = torch.randn(1, k)
        with torch.inference_mode():
            t_fp32 = median_time(lambda linear=linear, x=x: linear(x), rounds)
            fp32_bytes = linear.weight.numel() * 4
            print(f"{label:36s} {'fp32':22s} {'mkl':7s} {t_fp32 * 1e3:7.2f} {fp32_bytes / t_fp32 / 1e9:6.1f}")
            formats = {
                "int8 g32 (Q8_0)": Int8Linear.from_float(linear, 32),
                "int4 g32 sym (Q4_0)": Int4Linear.from_float(linear, 32, symmetric=True),
                "int4 g32 asym (Q4_1)": Int4Linear.from_float(linear, 32, symmetric=False),
            }
            for name, q in formats.items():
                bits, mins = (8, None) if isinstance(q, Int8Linear) else (4, q.mins)
                for path in paths:
                    code = kernels.ISAS[path]
                    t = median_time(
                        lambda q=q, x=x, bits=bits, mins=mins, code=code: kernels.qlinear(
                            x, q.qweight, q.scales, mins, bits, q.group_size, None, code
                        ),
                        rounds,
                    )
                    print(
                        f"{'':36s} {name:22s} {path:7s} {t * 1e3:7.2f} {q.packed_bytes() / t / 1e9:6.1f} "
                        f"{fp32_bytes / t / 1e9:8.1f} {t_fp32 / t:7.2f}x"
                    )


def gemm_table(rounds: int) -> None:
    from lmstack.compress.int4 import Int4Linear

    print(f"\n{'batched (576 -> 3072)':36s} {'M':>4s} {'fp32 ms':>8s} {'int4 ms':>8s} {'vs fp32':>8s}")
    torch.manual_seed(0)
    linear = nn.Linear(576, 3072, bias=False)
    q = Int4Linear.from_float(linear, 32, symmetric=False)
    with torch.inference_mode():
        for m in (1, 4, 16, 64, 128):
            x = torch.randn(m, 576)
            t_fp32 = median_time(lambda x=x: linear(x), rounds)
            t_q = median_time(lambda x=x: q(x), rounds)
            print(f"{'':36s} {m:4d} {t_fp32 * 1e3:8.3f} {t_q * 1e3:8.3f} {t_fp32 / t_q:7.2f}x")


def prefill_table(rounds: int, n_tokens: int, threads: int) -> None:
    from lmstack.hub import load_model, resolve
    from lmstack.model.transformer import fuse_for_inference

    model, tokenizer = load_model("smollm2-135m-instruct", keep_quantized=True)
    model = fuse_for_inference(model)
    text = " ".join(["The quick brown fox jumps over the lazy dog while the sky stays blue."] * 40)
    ids = tokenizer.encode(text)[:n_tokens]
    batch = torch.tensor([ids])

    def lmstack_prefill() -> None:
        with torch.inference_mode():
            model(batch, last_logits_only=True)

    runs: dict[str, Callable[[], None]] = {"lmstack Q4_1 GGUF (packed)": lmstack_prefill}
    try:
        import llama_cpp

        _, path = resolve("smollm2-135m-instruct")
        llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_batch=512, n_ctx=1024, verbose=False)

        def llama_prefill() -> None:
            llm.reset()
            llm.eval(ids)

        runs["llama.cpp Q4_1 GGUF"] = llama_prefill
    except ImportError:
        print("llama-cpp-python not installed: its prefill row is skipped")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    peer = statistics.median(times.get("llama.cpp Q4_1 GGUF", [float("nan")]))
    print(f"\nprefill of {len(ids)} tokens, {threads} threads, median of {rounds} rounds")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:36s} {len(ids) / t:8.1f} tok/s {peer / t:7.2f}x llama.cpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--skip-prefill", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemv_table(args.rounds)
    gemm_table(args.rounds)
    if not args.skip_prefill:
        prefill_table(args.rounds, args.prompt_tokens, args.threads)


if __name__ == "__main__":
    main()
