"""Encoder fine-tuning: sequence classification with a head, and contrastive embedding training.

    lmstack finetune --task classify --model all-minilm-l6-v2 --data examples/classify/sentiment.jsonl --out runs/cls
    lmstack finetune --task embed --model all-minilm-l6-v2 --data pairs.jsonl --out runs/emb

Classification: rows `{"text", "label"}` (optionally `"text_pair"`); a fresh head (BERT pooler + linear) on
the encoder; AdamW with linear warm-up and decay; accuracy on a held-out split reported against the
majority-class baseline. Contrastive: rows `{"query", "positive"}`; MultipleNegativesRanking loss (every
other positive in the batch is a negative): cross-entropy over scale * cos(q_i, p_j) with the diagonal as
target, as sentence-transformers' MNRL. Both write an lmstack encoder directory and `metrics.json`.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError, require
from lmstack.model.encoder import TextEncoder, save_encoder_dir, with_classification_head
from lmstack.utils.io import atomic_write_text


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    path = Path(path)
    require(path.is_file(), f"data file {str(path)!r} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmstackError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
        missing = [f for f in fields if not isinstance(row.get(f), str) or not row[f].strip()]
        require(not missing, f"{path}:{number}: needs non-empty string fields {', '.join(fields)} (missing {missing})")
        rows.append(row)
    require(len(rows) >= 4, f"{path} has {len(rows)} rows; fine-tuning needs at least 4")
    return rows


def _optimizer(encoder: TextEncoder, lr: float, total_steps: int, warmup: float = 0.1):
    params = list(encoder.model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]  # biases and LayerNorm weights are not decayed
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    warm = max(1, int(warmup * total_steps))
    schedule = lambda step: min((step + 1) / warm, max(0.0, (total_steps - step) / max(1, total_steps - warm)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _split(rows: list[dict[str, Any]], val_fraction: float, seed: int) -> tuple[list, list]:
    """Stratified: every label keeps its share in both splits, so the majority baseline is a fair yardstick
    (a plain random split of a balanced set can hand the validation split the training minority)."""
    require(0 < val_fraction < 1, f"--val-fraction must be in (0, 1), got {val_fraction}")
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = min(len(group) - 1, max(1, round(len(group) * val_fraction))) if len(group) > 1 else 0
        val += group[:n_val]
        train += group[n_val:]
    rng.shuffle(train)
    require(bool(val), "no label has two rows, so nothing can be held out for validation; add rows")
    return train, val


def accuracy(encoder: TextEncoder, rows: list[dict[str, Any]]) -> float:
    pairs = [r["text_pair"] for r in rows] if all("text_pair" in r for r in rows) else None
    logits = encoder.classify([r["text"] for r in rows], pairs)
    labels = encoder.cfg.labels
    return sum(labels[int(i)] == r["label"] for i, r in zip(logits.argmax(1), rows, strict=True)) / len(rows)


def finetune_classifier(
    encoder: TextEncoder,
    data: str | Path,
    out: str | Path,
    epochs: int = 8,
    lr: float = 1e-4,
    batch_size: int = 16,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a classification head (and the body) on `data`; returns and writes the metrics."""
    rows = read_jsonl(data, ("text", "label"))
    train, val = _split(rows, val_fraction, seed)
    labels = sorted({r["label"] for r in rows})
    require(len(labels) >= 2, f"{data} has only the label {labels}; classification needs at least two")
    torch.manual_seed(seed)
    model = with_classification_head(encoder, labels)
    majority_label, _ = Counter(r["label"] for r in train).most_common(1)[0]
    baseline = sum(r["label"] == majority_label for r in val) / len(val)
    before = accuracy(model, val)
    steps = epochs * math.ceil(len(train) / batch_size)
    optimizer, scheduler = _optimizer(model, lr, steps)
    label_ids = {label: i for i, label in enumerate(labels)}
    history = []
    for epoch in range(epochs):
        model.model.train()
        random.Random(seed + epoch).shuffle(train)
        total = 0.0
        for start in range(0, len(train), batch_size):
            batch_rows = train[start : start + batch_size]
            pairs = [r["text_pair"] for r in batch_rows] if all("text_pair" in r for r in batch_rows) else None
            batch = model.collate(model.tokenize([r["text"] for r in batch_rows], pairs))
            hidden = model.model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            target = torch.tensor([label_ids[r["label"]] for r in batch_rows], device=model.device)
            loss = F.cross_entropy(model.model.classify(hidden, batch.attention_mask), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch_rows)
        model.model.eval()
        history.append({"epoch": epoch + 1, "train_loss": total / len(train), "val_accuracy": accuracy(model, val)})
        last = history[-1]
        print(
            f"epoch {epoch + 1}: loss {last['train_loss']:.4f}, val accuracy {last['val_accuracy']:.3f}",
            file=sys.stderr,
        )
    metrics = {
        "task": "classify",
        "labels": labels,
        "train_rows": len(train),
        "val_rows": len(val),
        "val_accuracy": history[-1]["val_accuracy"],
        "val_accuracy_before": before,
        "majority_baseline": baseline,
        "history": history,
    }
    save_encoder_dir(model, out)
    atomic_write_text(Path(out) / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    print(
        f"val accuracy {metrics['val_accuracy']:.3f} (majority-class baseline {baseline:.3f}) -> {out}", file=sys.stderr
    )
    return metrics


def _duplicate_positives(rows: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
    """(B, B) mask of off-diagonal columns whose passage is row i's own positive.

    Several questions often share a passage; as in-batch "negatives" they would push a question away from
    its own answer, so they are left out of the softmax (sentence-transformers avoids them by sampling)."""
    texts = [r["positive"] for r in rows]
    same = torch.tensor([[a == b for b in texts] for a in texts], device=device)
    return same & ~torch.eye(len(rows), dtype=torch.bool, device=device)


def train_contrastive(
    encoder: TextEncoder,
    data: str | Path,
    out: str | Path,
    epochs: int = 1,
    lr: float = 2e-5,
    batch_size: int = 16,
    scale: float = 20.0,
    seed: int = 0,
) -> dict[str, Any]:
    """MultipleNegativesRanking fine-tuning on (query, positive) pairs with in-batch negatives."""
    rows = read_jsonl(data, ("query", "positive"))
    require(batch_size >= 2, "contrastive training needs --batch-size >= 2 (the other rows are the negatives)")
    torch.manual_seed(seed)
    steps = epochs * math.ceil(len(rows) / batch_size)
    optimizer, scheduler = _optimizer(encoder, lr, steps)
    model = encoder.model
    history = []

    def embed(texts: list[str]) -> torch.Tensor:
        batch = encoder.collate(encoder.tokenize(texts))
        pooled = model.pool(model(batch.input_ids, batch.attention_mask, batch.token_type_ids), batch.attention_mask)
        return F.normalize(pooled, dim=-1)

    for epoch in range(epochs):
        model.train()
        order = list(rows)
        random.Random(seed + epoch).shuffle(order)
        total, batches = 0.0, 0
        for start in range(0, len(order) - 1, batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < 2:
                continue
            queries, positives = embed([r["query"] for r in chunk]), embed([r["positive"] for r in chunk])
            scores = scale * queries @ positives.T  # (B, B): row i's positive is column i
            scores = scores.masked_fill(_duplicate_positives(chunk, scores.device), float("-inf"))
            loss = F.cross_entropy(scores, torch.arange(len(chunk), device=scores.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total, batches = total + loss.item(), batches + 1
        history.append({"epoch": epoch + 1, "loss": total / max(1, batches)})
        print(f"epoch {epoch + 1}: MNRL loss {history[-1]['loss']:.4f}", file=sys.stderr)
    model.eval()
    metrics = {"task": "embed", "pairs": len(rows), "history": history}
    save_encoder_dir(encoder, out)
    atomic_write_text(Path(out) / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def finetune_encoder_cli(args: Any) -> None:
    """`lmstack finetune --task classify|embed`; hyper-parameters come from --set epochs=..., lr=..., batch_size=..."""
    from lmstack.hub import load_encoder
    from lmstack.utils.config_loader import parse_overrides

    types = {"epochs": int, "lr": float, "batch_size": int, "seed": int}
    types.update({"val_fraction": float} if args.task == "classify" else {"scale": float})
    options = {}
    for key, value in parse_overrides(args.set or []).items():
        require(key in types, f"unknown --set key {key!r} for --task {args.task}; known: {', '.join(sorted(types))}")
        try:
            options[key] = types[key](value)
        except ValueError:
            raise LmstackError(f"--set {key}={value!r}: expected a {types[key].__name__}") from None
    require(args.method is None and args.recipe is None, f"--method and --recipe are for --task sft, not {args.task}")
    encoder = load_encoder(args.model)
    if args.task == "classify":
        finetune_classifier(encoder, args.data, args.out, **options)
    else:
        train_contrastive(encoder, args.data, args.out, **options)
