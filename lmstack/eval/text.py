"""Perplexity and bits per byte of a model on held-out text.

Each document is scored on its own: a start token (BOS, else EOS) is put in front so the first real
token is predicted too, and every byte of the document is accounted for in bits per byte. Documents
longer than the window are scored with a sliding window (the Hugging Face perplexity recipe): each
window after the first re-reads `window - stride` tokens of context and scores only its new tokens.

Bits per byte (total negative log-likelihood in bits / UTF-8 bytes) compares models with different
tokenizers; perplexity (exp of the mean per-token loss) only compares models sharing one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.errors import LmstackError, require
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer

HELDOUT_FILES = ("en.txt", "zh.txt")


def heldout_texts() -> list[str]:
    """The built-in held-out documents: English and Chinese paragraphs written for lmstack (never published
    before it, so no model was trained on them)."""
    root = resources.files("lmstack.eval") / "data" / "heldout"
    docs: list[str] = []
    for name in HELDOUT_FILES:
        docs += _paragraphs((root / name).read_text(encoding="utf-8"))
    return docs


def load_texts(path: str | Path) -> list[str]:
    """Documents from a .txt/.md file (blank-line separated paragraphs) or a .jsonl file ({"text": ...})."""
    import json

    path = Path(path)
    require(path.is_file(), f"text file {str(path)!r} not found; pass an existing .txt or .jsonl file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LmstackError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove that line") from None
            require(
                isinstance(row, dict) and isinstance(row.get("text"), str),
                f'{path}:{number}: expected an object with a "text" string',
            )
            docs.append(row["text"])
    else:
        docs = _paragraphs(raw)
    require(bool(docs), f"{path} holds no text to score; pass a file with some text in it")
    return docs


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def start_token(tokenizer: Tokenizer) -> int:
    """The token every scored sequence starts with, so its first real token is predicted from something."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    require(token is not None, "the tokenizer has neither a BOS nor an EOS token to start a scored sequence with")
    return token


@dataclass
class _Window:
    ids: list[int]  # tokens fed to the model
    n_scored: int  # the last n_scored targets count (the rest is context)


def _windows(ids: list[int], window: int, stride: int) -> list[_Window]:
    """Sliding windows over ids (ids[0] is the start token, never a target)."""
    out, scored_until = [], 1
    begin = 0
    while scored_until < len(ids):
        end = min(begin + window + 1, len(ids))  # window inputs predict window targets
        out.append(_Window(ids[begin:end], end - scored_until))
        scored_until = end
        begin += stride
    return out


@torch.inference_mode()
def sequence_nll(model: Transformer, batch: list[list[int]], n_scored: list[int]) -> Tensor:
    """Summed negative log-likelihood (nats) of the last n_scored[i] tokens of each sequence; (B,) float64.

    Sequences are right-padded: with causal attention the padding never influences the scored tokens.
    """
    device = model.tok_emb.weight.device
    length = max(len(ids) for ids in batch)
    idx = torch.zeros(len(batch), length, dtype=torch.long)
    targets = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (ids, n) in enumerate(zip(batch, n_scored, strict=True)):
        idx[row, : len(ids)] = torch.tensor(ids)
        targets[row, len(ids) - n - 1 : len(ids) - 1] = torch.tensor(ids[len(ids) - n :])
    logits = model(idx[:, :-1].to(device)).logits.float()  # (B, T-1, vocab)
    nll = F.cross_entropy(logits.transpose(1, 2), targets[:, :-1].to(device), ignore_index=-100, reduction="none")
    return nll.sum(dim=1).double().cpu()


def length_batches(items: list, max_tokens: int, length) -> list[list]:
    """Group items (sorted by length) into batches of at most max_tokens padded tokens."""
    items = sorted(items, key=length)
    batches: list[list] = []
    for item in items:
        if batches and (len(batches[-1]) + 1) * max(length(item), length(batches[-1][-1])) <= max_tokens:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: list[str],
    window: int = 512,
    stride: int | None = None,
    max_batch_tokens: int = 4096,
) -> dict[str, float]:
    """{"ppl", "bpb", "nll", "tokens", "bytes"} of `model` on `texts` (nll: mean nats per token)."""
    require(bool(texts), "no text to score perplexity on")
    window = min(window, model.cfg.max_seq_len - 1)
    stride = stride or max(window // 2, 1)
    require(0 < stride <= window, f"stride must be in (0, {window}], got {stride}")
    start = start_token(tokenizer)
    windows = [w for text in texts for w in _windows([start, *tokenizer.encode(text)], window, stride)]
    total_nll, total_tokens = 0.0, 0
    for batch in length_batches(windows, max_batch_tokens, lambda w: len(w.ids)):
        total_nll += float(sequence_nll(model, [w.ids for w in batch], [w.n_scored for w in batch]).sum())
        total_tokens += sum(w.n_scored for w in batch)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    mean_nll = total_nll / total_tokens
    return {
        "ppl": math.exp(mean_nll),
        "bpb": total_nll / math.log(2) / n_bytes,
        "nll": mean_nll,
        "tokens": total_tokens,
        "bytes": n_bytes,
    }
