"""`evaluate(model, tasks)`: the one entry point fine-tuning, compression reports, A/B and the CLI call.

Task names:
  ppl          perplexity and bits per byte on held-out text (`text=`: a file; default: built-in text)
  agreement    greedy agreement with `reference=` (a model reference, a loaded model, or precomputed
               `ReferenceContinuations`)
  mc           every built-in multiple-choice task
  NAME         one built-in multiple-choice task (see `builtin_task_names()`)
  PATH.jsonl   a multiple-choice task file of your own (format in `lmstack.eval.tasks`)

    from lmstack.eval import evaluate
    results = evaluate("runs/tiny/checkpoint", ["ppl", "mc"])
    results["ppl"]["bpb"], results["knowledge_en"]["acc_norm"], results["mc_average"]["acc_norm"]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import require
from lmstack.eval.agreement import ReferenceContinuations, default_prompts, greedy_agreement
from lmstack.eval.tasks import Item, builtin_task_names, load_task, score_task
from lmstack.eval.text import heldout_texts, load_texts, perplexity
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.utils.io import atomic_write_text

ModelLike = str | Path | Transformer


def expand_tasks(tasks: str | Sequence[str]) -> list[str]:
    """A comma list or sequence of task names -> the task specs to run, in order, without duplicates."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        for spec in builtin_task_names() if name == "mc" else [name]:
            if spec not in out:
                out.append(spec)
    require(bool(out), "no tasks given; pass e.g. --tasks ppl,mc")
    return out


def _load(
    model: ModelLike, tokenizer: Tokenizer | None, device: str, dtype: str | None, gguf_weights: str = "float"
) -> tuple[Transformer, Tokenizer]:
    if isinstance(model, Transformer):
        require(tokenizer is not None, "evaluate(model=<Transformer>) needs tokenizer=; or pass a model reference")
        return model.eval(), tokenizer
    from lmstack.engine.generate import load_for_inference

    loaded, loaded_tokenizer = load_for_inference(str(model), device, dtype, gguf_weights)
    return loaded, tokenizer or loaded_tokenizer


def evaluate(
    model: ModelLike,
    tasks: str | Sequence[str] = ("ppl", "mc"),
    *,
    tokenizer: Tokenizer | None = None,
    reference: ModelLike | ReferenceContinuations | None = None,
    text: str | Path | list[str] | None = None,
    window: int = 512,
    limit: int | None = None,
    agreement_tokens: int = 32,
    device: str = "auto",
    dtype: str | None = None,
    gguf_weights: str = "packed",
) -> dict[str, Any]:
    """Score `model` (a model reference or a loaded `Transformer` + `tokenizer`) on `tasks`.

    Returns {task: metrics}: "ppl" -> {ppl, bpb, nll, tokens, bytes}; "agreement" ->
    {token_agreement, prefix_agreement, tokens}; each multiple-choice task -> {acc, acc_norm, n}, plus
    "mc_average" (unweighted mean over the multiple-choice tasks) when there are several.
    limit: score only the first `limit` items of each multiple-choice task.
    gguf_weights: a GGUF `model` runs its quantized blocks as they are ("packed") or dequantized ("float");
    a GGUF `reference` always loads in float, so agreement measures what the packed kernels change.
    """
    specs = expand_tasks(tasks)
    require(limit is None or limit > 0, f"limit must be a positive number of items, got {limit}")
    # Everything a user can get wrong is checked before the model is loaded.
    mc_tasks: dict[str, list[Item]] = {}
    for spec in specs:
        if spec not in ("ppl", "agreement"):
            name, items = load_task(spec)
            mc_tasks[name] = items[:limit] if limit else items
    texts = _texts(text) if "ppl" in specs else []
    require(
        "agreement" not in specs or reference is not None,
        "the 'agreement' task compares against a reference model; pass --reference REF",
    )
    loaded, tok = _load(model, tokenizer, device, dtype, gguf_weights)
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for spec in specs:
            if spec == "ppl":
                results["ppl"] = perplexity(loaded, tok, texts, window=window)
            elif spec == "agreement":
                results["agreement"] = greedy_agreement(loaded, _reference(reference, tok, agreement_tokens, device))
        for name, items in mc_tasks.items():
            results[name] = score_task(loaded, tok, items)
    if len(mc_tasks) > 1:
        results["mc_average"] = {
            metric: sum(results[name][metric] for name in mc_tasks) / len(mc_tasks) for metric in ("acc", "acc_norm")
        }
    return results


def _texts(text: str | Path | list[str] | None) -> list[str]:
    if text is None:
        return heldout_texts()
    if isinstance(text, list):
        require(bool(text), "text=[] holds nothing to score")
        return text
    return load_texts(text)


def _reference(
    reference: ModelLike | ReferenceContinuations, tokenizer: Tokenizer, max_new_tokens: int, device: str
) -> ReferenceContinuations:
    if isinstance(reference, ReferenceContinuations):
        return reference
    ref_model, _ = _load(reference, tokenizer, device, None)
    return ReferenceContinuations.generate(ref_model, tokenizer, default_prompts(), max_new_tokens)


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: one line per task with its headline metrics."""
    lines = [f"{'task':<18} {'metric':<18} value"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{task:<18} {metric:<18} {shown}")
    return "\n".join(lines)


def eval_cli(args) -> None:
    """`lmstack eval`: table to stdout, JSON to --out (atomically) when given."""
    tasks = args.tasks or ("ppl,mc,agreement" if args.reference else "ppl,mc")
    results = evaluate(
        args.model,
        tasks,
        reference=args.reference,
        text=args.text,
        window=args.window,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        gguf_weights=args.gguf_weights,
    )
    print(format_results(results))
    if args.out:
        atomic_write_text(args.out, json.dumps({"model": args.model, "results": results}, indent=2))
        print(f"results -> {args.out}", file=sys.stderr)
