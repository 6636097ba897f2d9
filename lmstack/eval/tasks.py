"""Multiple-choice tasks scored by log-likelihood, the way lm-evaluation-harness scores them.

A task file is JSON Lines, one item per line:
    {"id": "knowledge_en-000", "context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}
`choices` are the exact continuations (English ones carry their leading space). For each choice the
model's log-probability of the continuation given the context is summed; `acc` picks the highest sum,
`acc_norm` the highest sum divided by the continuation's length in characters (lm-eval's acc_norm),
which removes the bias towards short answers.

Tokenisation follows lm-eval's `_encode_pair`: trailing whitespace of the context moves to the
continuation, the pair is encoded as one string and the continuation tokens are those after the
context's own tokens, so a merge across the boundary is scored as part of the answer.

The built-in tasks (lmstack/eval/data/tasks/*.jsonl) are small bilingual sets written for lmstack:
world knowledge, everyday common sense and two-number arithmetic, each in English and Chinese.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from lmstack.errors import LmstackError, require
from lmstack.eval.text import length_batches, sequence_nll, start_token
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer


@dataclass(frozen=True)
class Item:
    id: str
    context: str
    choices: tuple[str, ...]
    answer: int


def _builtin_dir():
    return resources.files("lmstack.eval") / "data" / "tasks"


def builtin_task_names() -> list[str]:
    return sorted(p.name.removesuffix(".jsonl") for p in _builtin_dir().iterdir() if p.name.endswith(".jsonl"))


def parse_task_lines(lines: list[str], source: str) -> list[Item]:
    """Items from JSON Lines text; a malformed row is an error naming `source` and the line number."""
    items: list[Item] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmstackError(f"{where}: not valid JSON ({exc.msg}); fix or remove that line") from None
        items.append(_item(row, where, len(items)))
    require(
        bool(items), f"{source} has no task items; add lines like {{'context': ..., 'choices': [...], 'answer': 0}}"
    )
    return items


def _item(row: object, where: str, index: int) -> Item:
    fix = 'expected {"context": str, "choices": [str, str, ...], "answer": index of the right choice}'
    require(isinstance(row, dict), f"{where}: a task row must be a JSON object; {fix}")
    context, choices, answer = row.get("context"), row.get("choices"), row.get("answer")
    require(isinstance(context, str), f"{where}: 'context' must be a string; {fix}")
    require(
        isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices),
        f"{where}: 'choices' must be a list of at least two non-empty strings; {fix}",
    )
    require(len(set(choices)) == len(choices), f"{where}: 'choices' has duplicates; every choice must differ")
    require(
        isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices),
        f"{where}: 'answer' must be an integer index into 'choices' (0..{len(choices) - 1}), got {answer!r}",
    )
    return Item(str(row.get("id", index)), context, tuple(choices), answer)


def load_task(spec: str) -> tuple[str, list[Item]]:
    """A built-in task name or a path to a .jsonl task file -> (task name, items)."""
    if spec in builtin_task_names():
        text = (_builtin_dir() / f"{spec}.jsonl").read_text(encoding="utf-8")
        return spec, parse_task_lines(text.splitlines(), f"{spec}.jsonl")
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        require(path.is_file(), f"task file {spec!r} not found; pass an existing .jsonl file")
        return path.stem, parse_task_lines(path.read_text(encoding="utf-8").splitlines(), str(path))
    raise LmstackError(
        f"unknown task {spec!r}; use a built-in task ({', '.join(builtin_task_names())}), 'mc' for all of them, "
        "or a path to a .jsonl task file"
    )


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: (context tokens, continuation tokens) with the start token in front."""
    stripped = context.rstrip()
    if len(stripped) != len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context) if context else []
    return [start_token(tokenizer), *whole[: len(context_ids)]], whole[len(context_ids) :]


def choice_loglikelihoods(
    model: Transformer, tokenizer: Tokenizer, items: list[Item], max_batch_tokens: int = 4096
) -> list[list[float]]:
    """Summed log-probability (nats) of every choice's continuation given its item's context."""
    limit = model.cfg.max_seq_len
    requests = []  # (item index, choice index, token ids, number of continuation tokens)
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, item.context, choice)
            require(bool(continuation_ids), f"task item {item.id}: choice {choice!r} encodes to no tokens")
            ids = (context_ids + continuation_ids)[-limit:]  # keep the end: the answer must be scored whole
            requests.append((i, j, ids, len(continuation_ids)))
    loglik = [[0.0] * len(item.choices) for item in items]
    for batch in length_batches(requests, max_batch_tokens, lambda r: len(r[2])):
        nll = sequence_nll(model, [r[2] for r in batch], [r[3] for r in batch])
        for (i, j, _, _), value in zip(batch, nll.tolist(), strict=True):
            loglik[i][j] = -value
    return loglik


def score_task(
    model: Transformer, tokenizer: Tokenizer, items: list[Item], max_batch_tokens: int = 4096
) -> dict[str, float]:
    """{"acc", "acc_norm", "n"} of `model` on `items`."""
    correct = correct_norm = 0
    for item, scores in zip(items, choice_loglikelihoods(model, tokenizer, items, max_batch_tokens), strict=True):
        lengths = torch.tensor([float(len(c)) for c in item.choices])
        scores_t = torch.tensor(scores, dtype=torch.float64)
        correct += int(int(scores_t.argmax()) == item.answer)
        correct_norm += int(int((scores_t / lengths).argmax()) == item.answer)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}
