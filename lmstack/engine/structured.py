"""Structured output: JSON mode, JSON-schema and EBNF-grammar constrained decoding through `xgrammar`.

A request with `json_object`, `json_schema` or `grammar` gets a `GrammarConstraint` in its sampler:
before each draw, the grammar's matcher writes a bitmask of the tokens that keep the output a valid
prefix, and every other logit becomes -inf; each accepted token advances the matcher. Once the
grammar is complete only the stop tokens remain, so the answer ends where the JSON ends.
The vocabulary is described to xgrammar from lmstack's tokenizer (byte-level BPE or byte-fallback),
and compiled grammars are cached per tokenizer (compiling the JSON grammar once takes a while).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from lmstack.engine.sampling import SamplingParams
from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as error:
        raise LmstackError("structured output needs xgrammar: pip install 'lmstack[serve]'") from error
    return xgrammar


def _vocab_type(tokenizer: Tokenizer) -> Any:
    """Byte-level BPE (GPT-2, SmolLM2, Qwen) or byte fallback (LLaMA/Mistral SentencePiece style)."""
    xgr = _xgrammar()
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


JSON_OBJECT_SCHEMA = '{"type": "object"}'


@lru_cache(maxsize=8)
def _compiler(tokenizer: Tokenizer, vocab_size: int) -> Any:
    xgr = _xgrammar()
    backend = tokenizer.backend
    vocab = [backend.id_to_token(i) or "" for i in range(backend.get_vocab_size())]
    info = xgr.TokenizerInfo(
        vocab, _vocab_type(tokenizer), vocab_size=vocab_size, stop_token_ids=sorted(tokenizer.stop_ids)
    )
    return xgr.GrammarCompiler(info)


def compile_grammar(tokenizer: Tokenizer, vocab_size: int, params: SamplingParams) -> Any:
    """The compiled grammar for a request; a clear error for a malformed schema or grammar."""
    compiler = _compiler(tokenizer, vocab_size)
    try:
        if params.json_object:
            # OpenAI's JSON mode promises an object; xgrammar's built-in JSON grammar also admits a
            # top-level array, so JSON mode is the schema of any object instead.
            return compiler.compile_json_schema(JSON_OBJECT_SCHEMA)
        if params.json_schema is not None:
            schema = params.json_schema
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, dict):
                raise LmstackError(f"json_schema must be a JSON object, got {type(schema).__name__}")
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return compiler.compile_grammar(params.grammar)
    except LmstackError:
        raise
    except Exception as error:  # xgrammar reports bad schemas/grammars as RuntimeError/ValueError
        what = "json_schema" if params.json_schema is not None else "grammar"
        raise LmstackError(f"{what} could not be compiled: {str(error).strip().splitlines()[0]}") from error


@lru_cache(maxsize=8)
def _control_char_tokens(tokenizer: Tokenizer, vocab_size: int) -> Tensor:
    """Ids of the tokens whose text holds a control character other than newline and carriage return.

    JSON allows none of them raw inside a string, but xgrammar's rule for a string with `maxLength` or
    `minLength` admits every character except quote, backslash, CR and LF: a random model then wrote a
    0x10 byte into a forced tool call's arguments, which `json.loads` rejects. Outside strings only
    whitespace may appear, and newline and CR tokens are still allowed there (tab-only whitespace is
    lost, which no JSON needs)."""
    backend = tokenizer.backend
    ids = [
        i
        for i in range(min(backend.get_vocab_size(), vocab_size))
        if any(ord(c) < 0x20 and c not in "\n\r" for c in backend.decode([i], skip_special_tokens=False))
    ]
    return torch.tensor(ids, dtype=torch.long)


class GrammarConstraint:
    """A per-request logits processor: mask what the grammar forbids, follow what was emitted.

    `banned`: token ids masked at every step on top of the grammar (control characters for JSON)."""

    def __init__(self, compiled: Any, vocab_size: int, banned: Tensor | None = None):
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.banned = banned if banned is not None and banned.numel() else None

    def mask(self, logits: Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), self.bitmask.to(logits.device))
        if self.banned is not None:
            logits.index_fill_(0, self.banned.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    def is_finished(self) -> bool:
        return self.matcher.is_terminated()


def grammar_constraint(tokenizer: Tokenizer, vocab_size: int, params: SamplingParams) -> GrammarConstraint:
    json_output = params.json_object or params.json_schema is not None
    banned = _control_char_tokens(tokenizer, vocab_size) if json_output else None
    return GrammarConstraint(compile_grammar(tokenizer, vocab_size, params), vocab_size, banned)
