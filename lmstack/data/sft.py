"""Instruction data for SFT: read chat / Alpaca / ShareGPT jsonl, render with the chat template, mask, pack.

Formats (detected per row):
  chat      {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  alpaca    {"instruction": ..., "input": "" (optional), "output": ..., "system": (optional)}
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
Each becomes a conversation (list of messages), rendered with the model's chat template
(`Tokenizer.apply_chat_template`, the same Jinja rendering transformers uses).

Loss mask: only assistant tokens are trained. Turn i's assistant span is the text the template adds
between rendering messages[:i] with the generation prompt and rendering messages[:i+1]; the pieces are
tokenized separately and concatenated, so the mask boundary is exact (a template whose renderings are
not prefixes of each other is refused). Multi-turn conversations train every assistant turn.

Packing: examples are packed first-fit-decreasing into rows of `seq_len` tokens (no example is
split); every token carries its document id and its position inside its document, so attention never
crosses documents and positions restart at 0 (lmstack.peft.prompts.TrainingCache lays out the mask).
What remains of a row is padding with target -100 (a few percent with packing).
"""

from __future__ import annotations

import random
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
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _need(row: dict[str, Any], key: str, where: str, kind: type = str) -> Any:
    if key not in row:
        raise LmstackError(f"{where}: row has no {key!r} field; every row needs one (or use another format)")
    if not isinstance(row[key], kind):
        raise LmstackError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(row[key]).__name__}")
    return row[key]


def row_to_messages(row: dict[str, Any], where: str) -> Messages:
    """One jsonl row in any supported format -> a list of {"role", "content"} messages."""
    if not isinstance(row, dict):
        raise LmstackError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _need(row, "messages", where, list)
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise LmstackError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            out.append(
                {
                    "role": _need(m, "role", f"{where} messages[{i}]"),
                    "content": _need(m, "content", f"{where} messages[{i}]"),
                }
            )
    elif "conversations" in row:
        out = []
        for i, m in enumerate(_need(row, "conversations", where, list)):
            speaker = _need(m, "from", f"{where} conversations[{i}]") if isinstance(m, dict) else None
            if speaker not in _SHAREGPT_ROLES:
                raise LmstackError(f"{where}: conversations[{i}] 'from' is {speaker!r}; use human, gpt or system")
            out.append({"role": _SHAREGPT_ROLES[speaker], "content": _need(m, "value", f"{where} conversations[{i}]")})
    elif "instruction" in row or "output" in row:
        instruction, output = _need(row, "instruction", where), _need(row, "output", where)
        extra = row.get("input") or ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        raise LmstackError(
            f"{where}: row has none of 'messages' (chat), 'instruction'/'output' (Alpaca) or 'conversations' "
            f"(ShareGPT); its keys are {sorted(row)}"
        )
    for i, m in enumerate(out):
        if m["role"] not in ("system", "user", "assistant"):
            raise LmstackError(f"{where}: message {i} has role {m['role']!r}; use system, user or assistant")
    if not any(m["role"] == "assistant" for m in out):
        raise LmstackError(f"{where}: the conversation has no assistant message, so nothing would be trained")
    return out


def read_conversations(path: str | Path) -> list[Messages]:
    """All conversations of a jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"data file {str(path)!r} not found; pass a .jsonl file of chat, Alpaca or ShareGPT rows")
    conversations = []
    for where, row in iter_jsonl_rows(path):
        conversations.append(row_to_messages(row, where))
    if not conversations:
        raise LmstackError(f"{path} has no rows")
    return conversations


def check_chat_template(tokenizer: Tokenizer, source: str) -> None:
    if not tokenizer.chat_template:
        raise LmstackError(
            f"the tokenizer of {source} has no chat template, so conversations cannot be rendered; use a chat "
            "model or set chat_template=chatml (needs <|im_start|>/<|im_end|> in the vocabulary)"
        )


def use_chatml(tokenizer: Tokenizer) -> None:
    """Give a tokenizer the ChatML template; it must know ChatML's special tokens."""
    from lmstack.tokenizer import CHATML_TEMPLATE, IM_END, IM_START

    missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
    if missing:
        raise LmstackError(f"chat_template=chatml needs the tokens {missing} which this tokenizer lacks")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.stop_ids.add(tokenizer.token_to_id(IM_END))


def render(tokenizer: Tokenizer, messages: Messages) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is assistant output (trained)."""
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LmstackError(
                "the chat template renders a conversation differently from its beginning, so assistant tokens "
                "cannot be located; use a template that renders turns in order (e.g. chatml)"
            )
        for text, trained in ((prompt[len(done) :], False), (full[len(prompt) :], True)):
            piece = tokenizer.encode(text, add_bos=None if not ids else False) if text else []
            ids += piece
            mask += [trained] * len(piece)
        done = full
    return ids, mask


@dataclass
class Example:
    """One tokenized conversation: inputs and next-token targets (-100 where not trained)."""

    inputs: np.ndarray  # (n,) int64
    targets: np.ndarray  # (n,) int64


def make_example(ids: list[int], mask: list[bool], seq_len: int) -> Example | None:
    """Shift for next-token prediction; truncate to seq_len; None when no trained token is left."""
    ids = ids[: seq_len + 1]
    mask = mask[: seq_len + 1]
    inputs = np.asarray(ids[:-1], dtype=np.int64)
    targets = np.where(np.asarray(mask[1:], dtype=bool), np.asarray(ids[1:], dtype=np.int64), -100)
    return Example(inputs, targets) if (targets != -100).any() else None


def tokenize_conversations(
    tokenizer: Tokenizer, conversations: list[Messages], seq_len: int
) -> tuple[list[Example], int]:
    """(examples, how many were truncated); conversations with nothing trainable left are dropped."""
    examples, truncated = [], 0
    for messages in conversations:
        ids, mask = render(tokenizer, messages)
        truncated += len(ids) > seq_len + 1
        example = make_example(ids, mask, seq_len)
        if example is not None:
            examples.append(example)
    return examples, truncated


@dataclass
class PackedRows:
    """Rows of exactly seq_len tokens: inputs, targets, document ids and in-document positions."""

    inputs: np.ndarray  # (R, seq_len) int64
    targets: np.ndarray  # (R, seq_len) int64, -100 = no loss
    document_ids: np.ndarray  # (R, seq_len) int32, unique per document within a row; padding its own id
    positions: np.ndarray  # (R, seq_len) int64, restart at 0 for each document

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def fill(self) -> float:
        """Fraction of row slots holding real tokens (1 - padding)."""
        return float((self.document_ids >= 0).mean())

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        from lmstack.peft.prompts import TrainingCache

        positions = torch.from_numpy(self.positions[rows])
        return {
            "inputs": torch.from_numpy(self.inputs[rows]),
            "targets": torch.from_numpy(self.targets[rows]),
            "cache": TrainingCache(positions, torch.from_numpy(self.document_ids[rows]), int(positions.max())),
        }


def pack(examples: list[Example], seq_len: int, pad_id: int, packing: bool = True, seed: int = 0) -> PackedRows:
    """First-fit-decreasing packing (or one example per row when packing is off)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # ties in length keep a seeded, not a file, order
    if packing:
        order.sort(key=lambda i: -len(examples[i].inputs))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].inputs)
        slot = next((r for r, space in enumerate(free) if space >= n), None) if packing else None
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= n
    R = len(rows)
    inputs = np.full((R, seq_len), pad_id, dtype=np.int64)
    targets = np.full((R, seq_len), -100, dtype=np.int64)
    docs = np.full((R, seq_len), -1, dtype=np.int32)
    positions = np.zeros((R, seq_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            ex = examples[i]
            n = len(ex.inputs)
            inputs[r, at : at + n], targets[r, at : at + n] = ex.inputs, ex.targets
            docs[r, at : at + n], positions[r, at : at + n] = d, np.arange(n)
            at += n
        positions[r, at:] = np.arange(seq_len - at)  # padding: its own "document", never trained
    return PackedRows(inputs, targets, docs, positions)


def split_conversations(conversations: list[Messages], val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split by conversation: at least one for validation."""
    if len(conversations) < 2:
        raise LmstackError("the data has 1 conversation; SFT needs at least 2 (one is held out for eval loss)")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
    val = {*order[:n_val]}
    return [c for i, c in enumerate(conversations) if i not in val], [conversations[i] for i in sorted(val)]
