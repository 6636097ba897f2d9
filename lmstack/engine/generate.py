"""Text generation with a KV cache: sampling, stop conditions, streaming.

The model is the same `Transformer` used in training; generation passes a `KVCache` into it so the
prompt is processed once (prefill) and every new token costs one position (decode).
Streaming decodes incrementally: text is emitted as soon as it is complete UTF-8 and cannot be the
start of a stop string, so a stop string never leaks into the output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmstack.errors import LmstackError, require
from lmstack.model.transformer import KVCache, Transformer
from lmstack.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already in the context (CTRL)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """logits (B, V); history (B, L) token ids. Positive logits are divided, negative multiplied."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    logits = logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, params: SamplingParams, history: Tensor, generator: torch.Generator | None) -> Tensor:
    """Pick the next token for each row. logits (B, V) float; returns (B,) int64."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = None
    if use_cache:
        cache = KVCache(model.cfg, 1, len(prompt_ids) + budget, device, model.tok_emb.weight.dtype)
    step_input = tokens
    for _ in range(budget):
        logits = model(step_input, cache=cache, last_logits_only=True).logits[:, -1]
        next_id = sample_next(logits, params, tokens, generator)
        token = int(next_id)
        if token in stop_ids and not params.ignore_eos:
            return
        yield token
        tokens = torch.cat([tokens, next_id[:, None]], dim=1)
        step_input = next_id[:, None] if use_cache else tokens


class _StopStringScanner:
    """Turns a growing decoded text into safe-to-emit pieces, cutting at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.emitted = 0
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        hit = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            out, self.emitted = text[self.emitted : hit], hit
            return out
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                safe = len(text.rstrip("\ufffd"))
            for stop in self.stops:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        out = text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return out


def stream_text(
    model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams
) -> Iterator[str]:
    """Yield pieces of generated text as they become final."""
    scanner = _StopStringScanner(params.stop)
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


# --- CLI glue ------------------------------------------------------------------------------------


def params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=list(getattr(args, "stop", []) or []),
        ignore_eos=getattr(args, "ignore_eos", False),
    )


def load_for_inference(model_ref: str, device: str = "auto", dtype: str | None = None) -> tuple[Transformer, Tokenizer]:
    from lmstack.hub import load_model
    from lmstack.utils.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    model, tokenizer = load_model(model_ref, device=dev, dtype=resolve_dtype(dtype, dev))
    if tokenizer is None:
        raise LmstackError(f"{model_ref} has no tokenizer; save the model with its tokenizer files")
    return model.eval(), tokenizer


def generate_cli(args: argparse.Namespace) -> None:
    """`lmstack generate`: only generated text goes to stdout; everything else to stderr."""
    params = params_from_args(args)
    model, tokenizer = load_for_inference(args.model, args.device, args.dtype)
    if args.chat:
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    for piece in stream_text(model, tokenizer, prompt_ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
