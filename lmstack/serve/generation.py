"""The server's view of a model: an engine behind `AsyncEngine`, its tokenizer, and embeddings.

This is the one place that touches the engine's types: `RequestOutput`s become `Delta`s (one
choice's new text, tokens and logprobs), and engine errors become HTTP statuses (a full queue 429,
a prompt over the context 413, anything else the user caused 400). Generation itself is entirely
`lmstack.engine`'s: continuous batching, paged KV cache, sampling, stop strings, grammars.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmstack.engine import (
    AsyncEngine,
    EngineConfig,
    LLMEngine,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from lmstack.engine.async_engine import RequestStream, on_torch_thread, run_on_torch_thread
from lmstack.engine.sampling import TokenLogprob
from lmstack.errors import LmstackError
from lmstack.serve.errors import APIError, bad_request
from lmstack.tokenizer import Tokenizer


class Shutdown(Exception):
    """The server is stopping; the request was cancelled (503)."""


@dataclass
class Delta:
    """What one engine step added to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the prompt's scores, when they were asked for


@dataclass
class EngineSettings:
    """The `lmstack serve` knobs passed to every model's `EngineConfig`."""

    max_batch_tokens: int = 512
    max_num_seqs: int = 32
    max_queue: int = 256
    kv_cache_mb: float = 512
    speculative: str | None = None
    gguf_weights: str = "packed"  # GGUF blocks run as they are ("packed") or dequantized ("float")

    def config(self, device: str, dtype: str | None) -> EngineConfig:
        return EngineConfig(
            max_batch_tokens=self.max_batch_tokens,
            max_num_seqs=self.max_num_seqs,
            max_queue=self.max_queue,
            kv_cache_mb=self.kv_cache_mb,
            speculative=self.speculative,
            device=device,
            dtype=dtype,
            gguf_weights=self.gguf_weights,
        )


def engine_error(exc: Exception) -> APIError:
    """An engine exception as the HTTP error a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, f"The server is busy: {exc}.", code="queue_full")
    if isinstance(exc, PromptTooLongError):
        return APIError(413, str(exc), code="context_length_exceeded")
    if isinstance(exc, Shutdown):
        return APIError(503, "The server is shutting down; retry on another replica.", code="shutting_down")
    if isinstance(exc, LmstackError):
        return bad_request(str(exc))
    raise exc


class ServedModel:
    """One named model: its engine (driven by `AsyncEngine`), tokenizer and decoder embeddings."""

    def __init__(self, name: str, engine: LLMEngine):
        if engine.tokenizer is None:
            raise LmstackError(f"model {name!r} has no tokenizer; save it with its tokenizer files to serve it")
        self.name = name
        self.engine = engine
        self.tokenizer: Tokenizer = engine.tokenizer
        self.context = engine.model_cfg.max_seq_len
        self.vocab_size = engine.model_cfg.vocab_size
        self.async_engine = AsyncEngine(engine)
        self.stopped = False
        self.embedder = DecoderEmbedder(name, engine.model, self.tokenizer, self.context)

    @classmethod
    def load(cls, name: str, ref: str, settings: EngineSettings, device: str = "auto", dtype: str | None = None):
        # loaded on the torch thread that will step it (see lmstack.engine.async_engine.TORCH_THREAD)
        return cls(name, on_torch_thread(LLMEngine.from_ref, ref, settings.config(device, dtype)))

    def sampling_params(self, kwargs: dict[str, Any]) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except LmstackError as exc:
            raise bad_request(str(exc)) from None

    def stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {
            "queue_length": s.num_waiting,
            "running": s.num_running,
            "kv_usage": s.kv_usage,
            "prefix_hit_rate": s.prefix_cache_hit_rate,
        }

    async def stop(self) -> None:
        """Abort what still runs (its streams end with a 503 error event) and stop the stepping task."""
        if not self.stopped:
            self.stopped = True
            await self.async_engine.shutdown()

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> DeltaStream:
        """Queue the request (errors raise here, before any response is sent) and return its deltas."""
        if self.stopped:
            raise engine_error(Shutdown())
        try:
            outputs = await self.async_engine.submit(prompt_ids, params)
        except (LmstackError, RuntimeError) as exc:  # RuntimeError: the engine's executor is shut down
            raise engine_error(Shutdown() if self.stopped else exc) from None
        return DeltaStream(outputs)


class DeltaStream:
    """A request's per-choice Deltas. `aclose()` aborts the engine request unless it finished, and works
    whether or not iteration ever started (a client may leave before its response begins)."""

    def __init__(self, outputs: RequestStream):
        self._outputs = outputs

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    async def aclose(self) -> None:
        await self._outputs.aclose()

    async def _deltas(self) -> AsyncIterator[Delta]:
        seen_logprobs: dict[int, int] = {}
        try:
            async for out in self._outputs:
                for c in out.outputs:
                    if c.finish_reason == "abort":
                        raise Shutdown()  # only the server's shutdown aborts a request another task reads
                    if not (c.new_text or c.new_token_ids or c.finish_reason):
                        continue
                    logprobs: list[TokenLogprob] = []
                    if c.logprobs is not None:
                        start = seen_logprobs.get(c.index, 0)
                        logprobs, seen_logprobs[c.index] = c.logprobs[start:], len(c.logprobs)
                    yield Delta(
                        c.index, c.new_text, list(c.new_token_ids), logprobs, c.finish_reason, out.prompt_logprobs
                    )
                if out.finished:
                    return
            raise Shutdown()  # the engine stopped before the request finished
        finally:
            await self.aclose()


# -- embeddings -----------------------------------------------------------------------------------


class DecoderEmbedder:
    """Mean-pooled final hidden states of the decoder, L2-normalised (a baseline until an encoder is served)."""

    def __init__(self, name: str, model: Any, tokenizer: Tokenizer, context: int):
        self.name, self.model, self.tokenizer, self.context = name, model, tokenizer, context

    async def embed(self, inputs: list[str | list[int]]) -> tuple[Tensor, int]:
        ids = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        for i, row in enumerate(ids):
            if not row:
                raise bad_request(f"input[{i}] is empty; embeddings need some text", param="input")
            if len(row) > self.context:
                raise LmstackError(f"input[{i}] has {len(row)} tokens but the model's context is {self.context}")
            vocab = self.model.cfg.vocab_size
            if any(not 0 <= t < vocab for t in row):
                raise bad_request(f"input[{i}] holds a token id outside the vocabulary (0..{vocab - 1})", param="input")
        vectors = await run_on_torch_thread(self._embed, ids)
        return vectors, sum(len(r) for r in ids)

    @torch.inference_mode()
    def _embed(self, ids: list[list[int]]) -> Tensor:
        rows = []
        device = next(self.model.parameters()).device
        for row in ids:  # one row at a time: no padding, so causal attention needs no mask
            out = self.model(torch.tensor([row], device=device), last_logits_only=True, return_hidden=True)
            hidden = out.hidden  # (1, T, d_model)
            rows.append(hidden[0].float().mean(dim=0))
        vectors = torch.stack(rows)
        return (vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu()


class EncoderEmbedder:
    """A BERT-family sentence encoder (`--embedding-model`), e.g. all-MiniLM-L6-v2."""

    def __init__(self, name: str, encoder: Any):
        self.name, self.encoder = name, encoder

    async def embed(self, inputs: list[str | list[int]]) -> tuple[Tensor, int]:
        texts = []
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                raise bad_request(f"input[{i}]: the embedding model {self.name!r} takes text, not token ids", "input")
            texts.append(x)
        vectors = await run_on_torch_thread(self.encoder.embed, texts)
        tokens = sum(len(e.ids) for e in self.encoder.tokenize(texts))
        return torch.from_numpy(vectors), tokens


Embedder = DecoderEmbedder | EncoderEmbedder


def load_embedder(name: str, ref: str, device: str = "auto") -> EncoderEmbedder:
    from lmstack.hub import load_encoder
    from lmstack.utils.device import resolve_device

    return EncoderEmbedder(name, on_torch_thread(load_encoder, ref, device=resolve_device(device)))
