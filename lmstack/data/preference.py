"""Preference pairs for DPO / IPO / ORPO / SimPO and reward models: read, render with the chat template, pad.

Row format (jsonl, one pair per line):
  {"prompt": "text" | [messages], "chosen": "text" | [messages], "rejected": "text" | [messages]}
A text prompt is one user turn; a message list may hold a system prompt and earlier turns. A text reply
is one assistant turn; a message list is the assistant (and any later) turns that follow the prompt.
The prompt is rendered with the generation prompt; a reply's tokens are what the template adds after
it (reply + end-of-turn marker), so exactly the reply tokens are scored, as in SFT's assistant mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmstack.data.files import iter_jsonl_rows
from lmstack.errors import LmstackError

if TYPE_CHECKING:
    from lmstack.tokenizer import Tokenizer

Messages = list[dict[str, str]]
PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _messages(value: Any, role: str, where: str, key: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    ok = isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value)
    if not ok:
        raise LmstackError(f"{where}: {key!r} must be a string or a list of {{'role', 'content'}} messages")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def read_pairs(path: str | Path) -> list[dict[str, Messages]]:
    """Every pair of a jsonl file as {"prompt", "chosen", "rejected"} message lists; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"preference file {str(path)!r} not found; pass a .jsonl of prompt/chosen/rejected rows")
    pairs = []
    for where, row in iter_jsonl_rows(path):
        if not isinstance(row, dict):
            raise LmstackError(f"{where}: expected a JSON object with {', '.join(PAIR_FIELDS)}")
        missing = [k for k in PAIR_FIELDS if k not in row]
        if missing:
            raise LmstackError(
                f"{where}: row has no {', '.join(map(repr, missing))} field; every row needs prompt, chosen "
                "and rejected"
            )
        pairs.append(
            {
                "prompt": _messages(row["prompt"], "user", where, "prompt"),
                "chosen": _messages(row["chosen"], "assistant", where, "chosen"),
                "rejected": _messages(row["rejected"], "assistant", where, "rejected"),
            }
        )
    if len(pairs) < 2:
        raise LmstackError(f"{path} has {len(pairs)} pair(s); at least 2 are needed (one is held out)")
    return pairs


def render_reply(tokenizer: Tokenizer, prompt: Messages, reply: Messages) -> tuple[list[int], int]:
    """Token ids of prompt + reply and where the reply starts (the prompt ends with the generation prompt)."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + reply, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise LmstackError(
            "the chat template renders the prompt differently once a reply follows, so reply tokens cannot be "
            "located; use a template that renders turns in order (e.g. chatml)"
        )
    prompt_ids = tokenizer.encode(prompt_text)
    reply_ids = tokenizer.encode(full_text[len(prompt_text) :], add_bos=False)
    return prompt_ids + reply_ids, len(prompt_ids)


@dataclass
class PreferenceSet:
    """Tokenized pairs. Row 2i is pair i's chosen reply, row 2i+1 its rejected one; targets are -100
    outside the reply. Rows are kept unpadded; `batch` right-pads (causal attention never looks right)."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.inputs) // 2

    def batch(self, pairs: np.ndarray, pad_id: int = 0) -> dict[str, torch.Tensor]:
        """(2B, T) inputs/targets for pairs: chosen rows first, then rejected rows, in `pairs` order."""
        rows = [2 * int(i) for i in pairs] + [2 * int(i) + 1 for i in pairs]
        T = max(len(self.inputs[r]) for r in rows)
        inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(self.inputs[r])
            inputs[b, :n] = torch.from_numpy(self.inputs[r])
            targets[b, :n] = torch.from_numpy(self.targets[r])
        return {"inputs": inputs, "targets": targets}


def tokenize_pairs(tokenizer: Tokenizer, pairs: list[dict[str, Messages]], seq_len: int) -> PreferenceSet:
    """Render every pair; a reply cut to nothing by seq_len is an error (the pair would say nothing)."""
    inputs, targets, truncated = [], [], 0
    for i, pair in enumerate(pairs):
        for key in ("chosen", "rejected"):
            ids, start = render_reply(tokenizer, pair["prompt"], pair[key])
            truncated += len(ids) > seq_len + 1
            ids = ids[: seq_len + 1]
            if start >= len(ids) - 1:
                raise LmstackError(
                    f"pair {i}: the prompt takes {start} tokens, leaving no room for the {key} reply within "
                    f"seq_len={seq_len}; raise seq_len or shorten the prompt"
                )
            x = np.asarray(ids[:-1], dtype=np.int64)
            y = np.asarray(ids[1:], dtype=np.int64)
            y[: start - 1] = -100  # positions whose next token is still prompt
            inputs.append(x)
            targets.append(y)
    return PreferenceSet(inputs, targets, truncated)
