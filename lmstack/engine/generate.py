"""Text generation with a KV cache: sampling, stop conditions, streaming.

The model is the same `Transformer` used in training; generation passes a `KVCache` into it so the
prompt is processed once (prefill) and every new token costs one position (decode).
Streaming decodes incrementally: text is emitted as soon as it is complete UTF-8 and cannot be the
start of a stop string, so a stop string never leaks into the output.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmstack.engine.sampling import SamplingParams, TokenSampler
from lmstack.engine.stops import StopStringScanner
from lmstack.errors import LmstackError
from lmstack.hub import keep_gguf_packed, load_model
from lmstack.model.cpu_graph import StepRunner
from lmstack.model.transformer import KVCache, Transformer, fuse_for_inference
from lmstack.tokenizer import Tokenizer
from lmstack.utils.device import resolve_device, resolve_dtype

__all__ = ["SamplingParams", "generate_text", "generate_tokens", "stream_text"]


def _check_prompt(model: Transformer, n_prompt: int, params: SamplingParams) -> int:
    """Validate prompt length against the context; return how many tokens may be generated."""
    context = model.cfg.max_seq_len
    if n_prompt == 0:
        raise LmstackError("the prompt is empty; pass some text with --prompt")
    if n_prompt >= context:
        raise LmstackError(f"the prompt has {n_prompt} tokens but the model's context is {context}; shorten the prompt")
    return min(params.max_new_tokens, context - n_prompt)


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    params: SamplingParams,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield generated token ids one at a time; stops at a stop id (not yielded) unless ignore_eos."""
    budget = _check_prompt(model, len(prompt_ids), params)
    vocab = model.cfg.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise LmstackError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
    device = model.tok_emb.weight.device
    sampler = TokenSampler(params, vocab, device)
    history = list(prompt_ids)
    cache = None
    if use_cache:
        cache = KVCache(model.cfg, 1, len(prompt_ids) + budget, device, model.tok_emb.weight.dtype)
    step_input = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    next_id = torch.empty(1, 1, dtype=torch.long, device=device)  # refilled each step, never reallocated
    step = StepRunner(model, cache)  # single-token steps replay a captured step on the CPU (cpu_graph)
    for _ in range(budget):
        logits = step(step_input)[0, -1]
        token = sampler.sample(logits, history)
        if token in stop_ids and not params.ignore_eos:
            return
        yield token
        sampler.accept(token)
        history.append(token)
        next_id.fill_(token)
        step_input = next_id if use_cache else torch.cat([step_input, next_id], dim=1)


def stream_text(
    model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams
) -> Iterator[str]:
    """Yield pieces of generated text as they become final."""
    scanner = StopStringScanner(params.stop)
    generated: list[int] = []
    for token in generate_tokens(model, prompt_ids, params, tokenizer.stop_ids):
        generated.append(token)
        piece = scanner.feed(tokenizer.decode(generated, skip_special_tokens=True))
        if piece:
            yield piece
        if scanner.stopped:
            return
    tail = scanner.feed(tokenizer.decode(generated, skip_special_tokens=True), final=True)
    if tail:
        yield tail


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
) -> str:
    """Generate a continuation of `prompt` (plain text in, plain text out)."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        stop=stop or [],
    )
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids and tokenizer.bos_id is not None:
        prompt_ids = [tokenizer.bos_id]
    return "".join(stream_text(model, tokenizer, prompt_ids, params))


def load_for_inference(
    model_ref: str, device: str = "auto", dtype: str | None = None, gguf_weights: str = "packed", fuse: bool = True
) -> tuple[Transformer, Tokenizer]:
    """Any model reference, on `device` ("auto": CUDA when present) in `dtype` (None: fp32 on CPU,
    bf16 on CUDA), in eval mode with its tokenizer (a model without one is an error).
    gguf_weights: "packed" runs a GGUF file's quantized blocks as they are (lmstack.compress.gguf_load),
    "float" dequantizes them at load. fuse: q/k/v and gate/up fused once for decoding
    (`fuse_for_inference`: fewer, larger matmuls; bit-equal logits on SmolLM2 fp32); False keeps the Hugging Face
    modules (adapters, export)."""
    keep_quantized = keep_gguf_packed(gguf_weights)
    dev = resolve_device(device)
    model, tokenizer = load_model(model_ref, device=dev, dtype=resolve_dtype(dtype, dev), keep_quantized=keep_quantized)
    if tokenizer is None:
        raise LmstackError(f"{model_ref} has no tokenizer; save the model with its tokenizer files")
    model.eval()
    return (fuse_for_inference(model) if fuse else model), tokenizer
