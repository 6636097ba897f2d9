"""`lmstack quantize`: any model reference in, a quantized model directory out.

    lmstack quantize --model smollm2-135m-instruct --method int8 --out int8/
    lmstack quantize --model smollm2-135m-instruct --method int4 --group-size 32 --out int4/
    lmstack quantize --model MODEL --method gptq --calib notes.txt --out gptq/
    lmstack quantize --model MODEL --method qat --calib notes.txt --qat-steps 200 --out qat/

Methods: int8 (per channel, or per --group-size columns), int4 (group-wise round-to-nearest, symmetric
like Q4_0 or --asymmetric like Q4_1), nf4 (QLoRA's 4-bit NormalFloat, double-quantized scales), and the
calibrated gptq / awq (int4 or --bits 8) and w8a8 (SmoothQuant, dynamic int8 activations), and qat:
quantization-aware training (`lmstack.compress.qat`) that fine-tunes the float model on the --calib text
through fake-quantized weights (straight-through estimator) and exports the real int4/int8 layers it
trained, so they compute exactly what training saw. The output head is int8 in groups of 32 (Q8_0) for
every method. The directory is a model reference that generate, chat,
serve, eval and convert accept as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmstack.errors import LmstackError

METHODS = ("int8", "int4", "nf4", "gptq", "awq", "w8a8", "qat")
CALIBRATED = ("gptq", "awq", "w8a8", "qat")  # read --calib text (qat trains on it)


def quantize(
    model_ref: str,
    method: str,
    out: str | Path,
    group_size: int | None = None,
    symmetric: bool = True,
    bits: int = 4,
    calib: str | Path | None = None,
    calib_samples: int = 32,
    calib_seq_len: int = 256,
    act_order: bool = False,
    qat_steps: int = 100,
    qat_lr: float = 1e-4,
) -> Path:
    """Load `model_ref` in float, quantize it with `method`, write `out`. Input errors come before work."""
    from lmstack.compress.model import quantize_head, quantize_model, save_quantized
    from lmstack.hub import load_model

    if method not in METHODS:
        raise LmstackError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if method not in CALIBRATED and calib is not None:
        raise LmstackError(f"--calib is for the calibrated methods ({', '.join(CALIBRATED)}), not {method}")
    if bits not in (4, 8):
        raise LmstackError(f"--bits must be 4 or 8, got {bits}")
    if method == "qat" and (qat_steps < 1 or not qat_lr > 0):
        raise LmstackError(f"qat needs --qat-steps >= 1 and --qat-lr > 0, got {qat_steps} and {qat_lr}")
    model, tokenizer = load_model(model_ref)
    settings: dict = {"group_size": group_size}
    if method in ("int8", "int4", "nf4"):
        quantize_model(model, method, group_size=group_size, symmetric=symmetric)
        if method == "int4":
            settings.update(group_size=group_size or 32, symmetric=symmetric)
    else:
        if tokenizer is None:
            raise LmstackError(f"{model_ref} has no tokenizer; calibrated methods need one to read --calib text")
        from lmstack.compress.calib import calibration_texts, calibration_tokens

        tokens = calibration_tokens(
            tokenizer, calibration_texts(calib), calib_samples, calib_seq_len, source=str(calib or "built-in text")
        )
        if method == "qat":
            settings.update(_qat(model, tokens, group_size, symmetric, bits, qat_steps, qat_lr))
        else:
            settings.update(_calibrated(model, method, tokens, group_size, symmetric, bits, act_order))
        quantize_head(model)
    return save_quantized(model, out, tokenizer, method, **settings)


def _grid(group_size: int | None, symmetric: bool, bits: int):
    from lmstack.compress.calib import QuantGrid

    return QuantGrid(bits=bits, group_size=group_size or (32 if bits == 4 else None), symmetric=symmetric or bits == 8)


def _qat(model, tokens, group_size: int | None, symmetric: bool, bits: int, steps: int, lr: float) -> dict:
    """Quantization-aware fine-tuning on `tokens`, then export of the real modules; returns settings."""
    from lmstack.compress.qat import qat_model

    grid = _grid(group_size, symmetric, bits)
    _, losses = qat_model(model, tokens, grid, steps=steps, lr=lr)
    print(f"qat: {steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f} ({grid.describe()})", file=sys.stderr)
    return {"bits": bits, "group_size": grid.group_size, "symmetric": grid.symmetric, "qat_steps": steps, "qat_lr": lr}


def _calibrated(model, method: str, tokens, group_size: int | None, symmetric: bool, bits: int, act_order: bool):
    """Run GPTQ / AWQ / SmoothQuant (lmstack.compress.gptq, .awq, .smoothquant) in place; return settings."""
    if method == "w8a8":
        from lmstack.compress.smoothquant import smoothquant_model

        smoothquant_model(model, tokens)
        return {"bits": 8, "activations": "int8 per token"}
    grid = _grid(group_size, symmetric, bits)
    settings = {"bits": bits, "group_size": grid.group_size, "symmetric": grid.symmetric}
    if method == "gptq":
        from lmstack.compress.gptq import gptq_model

        gptq_model(model, tokens, grid, act_order=act_order)
        return {**settings, "act_order": act_order}
    from lmstack.compress.awq import awq_model

    awq_model(model, tokens, grid)
    return settings


def quantize_cli(args: argparse.Namespace) -> None:
    out = quantize(
        args.model,
        args.method,
        args.out,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        bits=args.bits,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        act_order=args.act_order,
        qat_steps=args.qat_steps,
        qat_lr=args.qat_lr,
    )
    size = (Path(out) / "model.safetensors").stat().st_size
    print(f"quantized ({args.method}): {size / 1e6:.1f} MB -> {out}", file=sys.stderr)
