"""`LLMEngine`: batched generation on the one model definition (docs/architecture.md, Seam 3).

    engine = LLMEngine.from_ref("smollm2-135m-instruct", EngineConfig(max_batch_tokens=512))
    outs = engine.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=32))
    rid = engine.add_request(prompt_ids, params); engine.step(); engine.abort(rid)

Parts: a `Scheduler` (continuous batching, chunked prefill, preemption), a `BlockManager` + `PagedKVCache`
(paged KV with prefix caching), a `ModelRunner` (one ragged forward), per-request `TokenSampler`s,
and optionally a drafter for speculative decoding. `step()` runs one scheduled batch and returns
the outputs of every request that produced tokens or finished.

Prompt scoring (`SamplingParams.prompt_logprobs`, with `max_new_tokens=0` to score without generating):
the prefill computes logits at every prompt position, and position i's log-softmax gives prompt token
i+1's log-probability. Such sequences skip the prefix cache (a cached block has no logits), and each
collects its own scores before it samples, so a request's first output already carries them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from torch import Tensor

from lmstack.engine.kv_cache import BlockManager, PagedKVCache, RowSpec, block_bytes
from lmstack.engine.runner import ModelRunner, StepRow
from lmstack.engine.sampling import SamplingParams, TokenLogprob, TokenSampler, token_logprobs
from lmstack.engine.scheduler import ScheduledRow, Scheduler, Sequence
from lmstack.engine.stops import StopStringScanner
from lmstack.errors import LmstackError, require
from lmstack.hub import keep_gguf_packed
from lmstack.model.transformer import Transformer, fuse_for_inference
from lmstack.tokenizer import Tokenizer


class QueueFullError(LmstackError):
    """The engine's waiting queue is at `max_queue` requests (a server answers 429)."""


class PromptTooLongError(LmstackError):
    """The prompt does not fit the model's context (a server answers 413)."""


@dataclass
class EngineConfig:
    max_batch_tokens: int = 512  # tokens per step: prefill chunks + decode tokens + drafts
    max_num_seqs: int = 32  # sequences running at once
    max_queue: int = 256  # requests waiting; one more raises QueueFullError
    block_size: int = 16  # tokens per KV block
    kv_cache_mb: float = 512  # KV pool size (capped at what max_num_seqs full contexts need)
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "int8": per-token, per-head scaled int8
    enable_prefix_caching: bool = True
    speculative: str | None = None  # None, "ngram" (prompt lookup) or a draft model reference
    num_speculative_tokens: int = 4
    ngram_max: int = 4  # prompt lookup matches the last ngram_max..ngram_min tokens
    ngram_min: int = 2
    device: str = "auto"
    dtype: str | None = None
    fuse: bool = True  # fuse q/k/v and gate/up weights once for inference
    gguf_weights: str = "packed"  # from_ref: "packed" runs GGUF blocks as they are, "float" dequantizes them

    def __post_init__(self) -> None:
        require(self.max_batch_tokens >= 1, f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        require(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        require(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        require(self.kv_cache_mb > 0, f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        require(
            self.kv_cache_dtype in ("auto", "int8"),
            f"kv_cache_dtype must be 'auto' or 'int8', got {self.kv_cache_dtype!r}",
        )
        require(self.num_speculative_tokens >= 1, "num_speculative_tokens must be >= 1")
        require(1 <= self.ngram_min <= self.ngram_max, "need 1 <= ngram_min <= ngram_max")
        keep_gguf_packed(self.gguf_weights)  # a clear error for anything but packed / float


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # everything emitted so far (stop strings cut, incomplete UTF-8 held back)
    token_ids: list[int]  # every generated token so far
    new_text: str = ""  # emitted by the latest step (what a stream sends)
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per generated token when requested
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while generating
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With SamplingParams.prompt_logprobs: one per prompt token, the first None (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_usage: float  # fraction of KV blocks in use
    prefix_cache_hit_rate: float  # prompt tokens served from cache / prompt tokens
    num_preemptions: int
    spec_acceptance_rate: float  # accepted drafted tokens / drafted tokens
    generated_tokens: int


@dataclass(eq=False)
class _Completion:
    """A sequence's output side: what was emitted and the stop-string scanner."""

    seq: Sequence
    scanner: StopStringScanner
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # entry i scores prompt token i + 1
    stop_reason: str | int | None = None
    reported_chars: int = 0  # text already sent in earlier outputs


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]

    @property
    def finished(self) -> bool:
        return all(c.seq.finished for c in self.completions)


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        draft_model: Transformer | None = None,
    ):
        self.config = cfg = config or EngineConfig()
        self.model = fuse_for_inference(model.eval()) if cfg.fuse else model.eval()
        self.tokenizer = tokenizer
        self.model_cfg = model.cfg
        param = next(model.parameters())
        self.device, dtype = param.device, param.dtype
        quantized = cfg.kv_cache_dtype == "int8"
        per_block = block_bytes(model.cfg, cfg.block_size, dtype, quantized)
        enough = cfg.max_num_seqs * -(-model.cfg.max_seq_len // cfg.block_size)
        num_blocks = max(1, min(int(cfg.kv_cache_mb * 2**20 // per_block), enough))
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        cache = PagedKVCache(model.cfg, num_blocks, cfg.block_size, self.device, dtype, quantized)
        self.runner = ModelRunner(self.model, cache)
        self.scheduler = Scheduler(self.blocks, cfg.max_batch_tokens, cfg.max_num_seqs)
        self.drafter = self._build_drafter(draft_model)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._drafted = self._accepted = self._generated = 0

    @classmethod
    def from_ref(cls, ref: str, config: EngineConfig | None = None) -> LLMEngine:
        """Load a model reference (see `lmstack.hub`) and its tokenizer, and the draft model if configured."""
        from lmstack.hub import load_model
        from lmstack.utils.device import resolve_device, resolve_dtype

        config = config or EngineConfig()
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        packed = keep_gguf_packed(config.gguf_weights)
        model, tokenizer = load_model(ref, device=device, dtype=dtype, keep_quantized=packed)
        draft = None
        if config.speculative not in (None, "ngram"):
            draft, _ = load_model(config.speculative, device=device, dtype=dtype, keep_quantized=packed)
        return cls(model, tokenizer, config, draft_model=draft)

    def _build_drafter(self, draft_model: Transformer | None):
        from lmstack.engine.speculative import DraftModelProposer, NgramProposer

        spec = self.config.speculative
        if spec is None:
            require(draft_model is None, "a draft model was given but EngineConfig.speculative is None")
            return None
        if spec == "ngram":
            return NgramProposer(self.config.ngram_min, self.config.ngram_max)
        require(draft_model is not None, f"speculative={spec!r} needs the draft model (LLMEngine.from_ref loads it)")
        require(
            draft_model.cfg.vocab_size == self.model_cfg.vocab_size,
            f"the draft model's vocabulary ({draft_model.cfg.vocab_size}) differs from the model's "
            f"({self.model_cfg.vocab_size}); use a draft model with the same tokenizer",
        )
        return DraftModelProposer(draft_model)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. Raises before queueing on bad input or a full queue."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        self._check_request(prompt_ids, params)
        if request_id is None:
            request_id = f"req-{next(self._request_ids)}"
        require(request_id not in self.requests, f"request id {request_id!r} is already in use")
        max_tokens = min(len(prompt_ids) + params.max_new_tokens, self.model_cfg.max_seq_len)
        completions = []
        for index in range(params.n):
            sampler = TokenSampler(
                params, self.model_cfg.vocab_size, self.device, seed_offset=index, constraint=self._constraint(params)
            )
            seq = Sequence(
                next(self._seq_ids), request_id, index, list(prompt_ids), len(prompt_ids), max_tokens, sampler,
                score_prompt=params.prompt_logprobs is not None and len(prompt_ids) > 1,
            )  # fmt: skip
            completions.append(_Completion(seq, StopStringScanner(params.stop)))
        self.requests[request_id] = _Request(request_id, list(prompt_ids), params, completions)
        for completion in completions:
            self.scheduler.add(completion.seq)
        return request_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            require(self.tokenizer is not None, "this engine has no tokenizer: pass the prompt as token ids")
            ids = self.tokenizer.encode(prompt)
            if not ids and self.tokenizer.bos_id is not None:
                ids = [self.tokenizer.bos_id]
            return ids
        return [int(t) for t in prompt]

    def _check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab, context = self.model_cfg.vocab_size, self.model_cfg.max_seq_len
        require(prompt_ids, "the prompt is empty; pass some text or token ids")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        require(not bad, f"token id {bad[0] if bad else 0} is outside the model's vocabulary of {vocab}")
        if len(prompt_ids) >= context:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}; shorten the prompt"
            )
        require(
            not params.stop or self.tokenizer is not None, "stop strings need a tokenizer; use stop_token_ids instead"
        )
        require(not params.structured or self.tokenizer is not None, "structured output needs the model's tokenizer")
        need = min(len(prompt_ids) + params.max_new_tokens, context) + self.config.num_speculative_tokens
        capacity = self.blocks.num_blocks * self.blocks.block_size
        require(
            need <= capacity,
            f"a sequence of {need} tokens does not fit the KV cache of {capacity} tokens; "
            "raise EngineConfig.kv_cache_mb or lower max_new_tokens",
        )
        waiting = len({s.request_id for s in self.scheduler.waiting})
        if waiting >= self.config.max_queue:
            raise QueueFullError(f"the queue is full ({waiting} requests waiting); retry later")

    def _constraint(self, params: SamplingParams):
        if not params.structured:
            return None
        from lmstack.engine.structured import grammar_constraint

        return grammar_constraint(self.tokenizer, self.model_cfg.vocab_size, params)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its last output (finish_reason "abort")."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        for completion in request.completions:
            if not completion.seq.finished:
                completion.seq.finish_reason = "abort"
                self._release(completion.seq)
        return self._output(self.requests.pop(request_id), {})

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; outputs of the requests that produced tokens or finished."""
        propose = self.drafter.propose if self.drafter is not None else None
        rows = self.scheduler.schedule(propose, self.config.num_speculative_tokens)
        if not rows:
            return []
        step_rows = []
        for row in rows:
            seq, start = row.seq, row.seq.num_computed
            tokens = seq.tokens[start : start + row.num_new] + row.drafts
            spec = RowSpec(seq.block_table, start, len(tokens))
            num_logits = len(tokens) if seq.score_prompt else len(row.drafts) + 1 if row.samples else 0
            step_rows.append(StepRow(tokens, spec, num_logits))
        logits = self.runner.run(step_rows)
        new_tokens: dict[int, list[int]] = {}
        for row, row_logits in zip(rows, logits, strict=True):
            seq = row.seq
            samples = row.samples
            if seq.score_prompt:
                row_logits = self._score_prompt(row, row_logits)
            seq.num_computed += row.num_new
            if samples:
                new_tokens[seq.seq_id] = self._advance(row, row_logits)
            if not seq.finished:
                self.scheduler.commit(seq)
        touched = {row.seq.request_id for row in rows if row.seq.seq_id in new_tokens}
        outputs = []
        for request_id in touched:
            request = self.requests[request_id]
            outputs.append(self._output(request, new_tokens))
            if request.finished:
                del self.requests[request_id]
        return outputs

    def _score_prompt(self, row: ScheduledRow, logits: Tensor) -> Tensor:
        """Collect the prompt log-probabilities this chunk's logits (one per fed token) give; return the
        rows sampling reads (the last known token's and the drafts')."""
        seq, completion = row.seq, self._completion(row.seq)
        start, scores = seq.num_computed, completion.prompt_logprobs
        first = len(scores) - start  # positions scored before a preemption are not scored twice
        stop = min(row.num_new, seq.num_prompt - 1 - start)  # the last prompt position predicts the output
        if stop > first:
            targets = seq.tokens[start + first + 1 : start + stop + 1]
            scores.extend(token_logprobs(logits[first:stop], targets, seq.sampler.params.prompt_logprobs))
        if len(scores) == seq.num_prompt - 1:
            seq.score_prompt = False
        return logits[row.num_new - 1 :]

    def _advance(self, row: ScheduledRow, logits: Tensor) -> list[int]:
        """Sample (or verify drafts), append the accepted tokens, apply stop conditions."""
        seq = row.seq
        completion = self._completion(seq)
        if len(seq.tokens) >= seq.max_tokens:  # max_new_tokens 0: the prefill (prompt scoring) was the work
            seq.finish_reason = "length"
            self._release(seq)
            return []
        tokens = self._draw(row, logits)
        self._drafted += len(row.drafts)
        self._accepted += len(tokens) - 1
        seq.num_computed += len(tokens) - 1  # accepted drafts were computed in this step too
        emitted = []
        stop_ids = self._stop_ids(completion)
        for i, token in enumerate(tokens):
            if token in stop_ids:
                seq.finish_reason, completion.stop_reason = "stop", token
                break
            seq.tokens.append(token)
            emitted.append(token)
            if seq.sampler.params.logprobs is not None:
                completion.logprobs.append(seq.sampler.logprobs(logits[i], token))
            if len(seq.tokens) >= seq.max_tokens:
                seq.finish_reason = "length"
                break
            if seq.sampler.constraint_finished():
                seq.finish_reason = "stop"
                break
        self._generated += len(emitted)
        self._emit_text(completion)
        if seq.finished:
            self._release(seq)
        return emitted

    def _draw(self, row: ScheduledRow, logits: Tensor) -> list[int]:
        """The tokens this row yields: one sample, or accepted drafts plus one (speculative decoding).

        Drafts are checked in order. Greedy: a draft stands while it equals the target's argmax.
        Sampling: draft d is kept with probability min(1, p(d)/q(d)); at the first rejection the
        token is drawn from max(p - q, 0) renormalised, which leaves the output distributed exactly
        as p (Leviathan et al. 2023). A deterministic drafter has q = one-hot(d).
        """
        seq, sampler = row.seq, row.seq.sampler
        history = list(seq.tokens)
        out: list[int] = []
        for i, draft in enumerate(row.drafts):
            if sampler.params.greedy:
                token = sampler.sample(logits[i], history)
            else:
                p = sampler.probs(logits[i], history)
                q = row.draft_probs[i] if row.draft_probs is not None else None
                q_draft = float(q[draft]) if q is not None else 1.0
                if sampler.uniform() < float(p[draft]) / max(q_draft, 1e-20):
                    token = draft
                else:
                    residual = p.clone()
                    if q is None:
                        residual[draft] = 0
                    else:
                        residual = (residual - q).clamp_(min=0)
                    token = sampler.draw(residual if residual.sum() > 0 else p)
            out.append(token)
            sampler.accept(token)
            history.append(token)
            if token != draft:
                return out
        token = sampler.sample(logits[len(row.drafts)], history)
        sampler.accept(token)
        return [*out, token]

    def _stop_ids(self, completion: _Completion) -> set[int]:
        params = completion.seq.sampler.params
        ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            ids |= self.tokenizer.stop_ids
        return ids

    def _emit_text(self, completion: _Completion) -> None:
        if self.tokenizer is None:
            return
        seq = completion.seq
        text = self.tokenizer.decode(seq.tokens[seq.num_prompt :], skip_special_tokens=True)
        completion.text += completion.scanner.feed(text, final=seq.finished)
        if completion.scanner.stopped and not seq.finished:
            seq.finish_reason, completion.stop_reason = "stop", completion.scanner.stop_hit
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.drafter is not None:
            self.drafter.forget(seq)

    def _completion(self, seq: Sequence) -> _Completion:
        return self.requests[seq.request_id].completions[seq.index]

    def _output(self, request: _Request, new_tokens: dict[int, list[int]]) -> RequestOutput:
        outputs = []
        for c in request.completions:
            seq = c.seq
            fresh = new_tokens.get(seq.seq_id, [])
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=c.text,
                    token_ids=seq.tokens[seq.num_prompt :],
                    new_text=c.text[c.reported_chars :],
                    new_token_ids=fresh,
                    logprobs=list(c.logprobs) if request.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
            c.reported_chars = len(c.text)
        num_cached = request.completions[0].seq.num_cached_tokens
        prompt_logprobs = None
        if request.params.prompt_logprobs is not None:
            scored = [c.prompt_logprobs for c in request.completions if not c.seq.score_prompt]
            prompt_logprobs = [None, *scored[0]] if scored else None
        return RequestOutput(
            request.request_id, request.prompt_ids, outputs, request.finished, num_cached, prompt_logprobs
        )

    # -- blocking convenience -----------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (batched under continuous batching); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        require(len(params_list) == len(prompts), "give one SamplingParams per prompt, or one for all")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_usage=self.blocks.usage,
            prefix_cache_hit_rate=self.blocks.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            spec_acceptance_rate=self._accepted / self._drafted if self._drafted else 0.0,
            generated_tokens=self._generated,
        )
