"""Response bodies: chat and text completions, their stream chunks, logprobs in OpenAI's two shapes."""

from __future__ import annotations

import json
import secrets
import time
from functools import lru_cache
from typing import Any

from lmstack import __version__
from lmstack.engine.sampling import TokenLogprob
from lmstack.tokenizer import Tokenizer, bytes_to_unicode

FINGERPRINT = f"lmstack-{__version__}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprobs; byte-level BPE tokens map to their exact bytes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self.tokenizer.backend.id_to_token(token_id)
            table = _byte_of_char()
            if raw and all(c in table for c in raw):
                data = bytes(table[c] for c in raw)
            else:
                data = self.tokenizer.decode([token_id]).encode("utf-8")
            hit = self._cache[token_id] = (data.decode("utf-8", errors="replace"), list(data))
        return hit


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText) -> dict[str, Any]:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text, data = text_of(token_id)
        return {"token": text, "logprob": logprob, "bytes": data}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries],
        "refusal": None,
    }


def completion_logprobs(
    entries: list[TokenLogprob | None], text_of: TokenText, offset: int, token_ids: list[int] | None = None
) -> dict[str, Any]:
    """OpenAI legacy completions shape: tokens, token_logprobs, top_logprobs (dicts), text_offset.

    An echoed prompt's scores pass `token_ids` too: its first entry is None (no log-probability for the
    first token, null in the response, as OpenAI and lm-evaluation-harness expect)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    ids = token_ids if token_ids is not None else [e.token_id for e in entries]
    for token_id, e in zip(ids, entries, strict=True):
        text, _ = text_of(token_id)
        tokens.append(text)
        token_logprobs.append(None if e is None else e.logprob)
        tops.append(None if e is None else {text_of(t)[0]: lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(
    prompt_ids: list[int], prompt_scores: list[TokenLogprob | None], generated: dict[str, Any], text_of: TokenText
) -> dict[str, Any]:
    """An echoed prompt's token scores followed by the generated tokens' (`generated`, completion shape)."""
    prompt = completion_logprobs(prompt_scores, text_of, 0, prompt_ids)
    return {key: prompt[key] + generated[key] for key in prompt}
