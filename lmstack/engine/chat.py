"""`lmstack chat`: a terminal conversation rendered with the model's own chat template.

Commands at the prompt: /reset clears the history, /exit (or Ctrl-D) quits. When the history no
longer fits the context, the oldest turns are dropped (the system prompt is kept).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from lmstack.engine.generate import SamplingParams, stream_text
from lmstack.errors import LmstackError
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer


def fit_history(
    tokenizer: Tokenizer, messages: list[dict[str, str]], context: int, reserve: int
) -> tuple[list[dict[str, str]], list[int]]:
    """Drop the oldest non-system turns until the rendered prompt leaves `reserve` tokens free."""
    messages = list(messages)
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if len(ids) + reserve <= context:
            return messages, ids
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise LmstackError(
                f"the message needs {len(ids)} tokens but the context is {context} "
                f"(with {reserve} reserved for the reply); write a shorter message or lower --max-new-tokens"
            )
        del messages[first]


def reply(model: Transformer, tokenizer: Tokenizer, messages: list[dict[str, str]], params: SamplingParams):
    """Stream the assistant's answer to `messages`; returns (pieces iterator, trimmed history)."""
    reserve = min(params.max_new_tokens, model.cfg.max_seq_len // 2)
    messages, ids = fit_history(tokenizer, messages, model.cfg.max_seq_len, reserve)
    return stream_text(model, tokenizer, ids, params), messages


def chat_session(
    model: Transformer,
    tokenizer: Tokenizer,
    params: SamplingParams,
    system: str | None = None,
    read_line: Callable[[str], str] = input,
    out: TextIO | None = None,
    interactive: bool | None = None,
) -> None:
    """A conversation until /exit or end of input: lines from `read_line`, replies streamed to `out`
    (stdout), notes to stderr. `interactive` (default: stdin is a terminal) shows prompts."""
    if not tokenizer.chat_template:
        raise LmstackError("the model has no chat template; use `lmstack generate` for plain completion")
    out = out or sys.stdout
    interactive = sys.stdin.isatty() if interactive is None else interactive
    system_turn = [{"role": "system", "content": system}] if system else []
    messages = list(system_turn)
    print("chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        try:
            line = read_line("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(system_turn)
            print("(history cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        pieces, messages = reply(model, tokenizer, messages, params)
        if interactive:
            out.write("assistant> ")
        answer = []
        for piece in pieces:
            answer.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": "".join(answer).strip()})
