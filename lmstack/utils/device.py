"""Device and dtype selection shared by training, conversion and inference."""

from __future__ import annotations

import torch

from lmstack.errors import LmstackError

# The one dtype table: every `--dtype`/`dtype:` value in lmstack is looked up here.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (float32, bf16, ...) -> torch.dtype; None and torch dtypes pass through."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name.lower() not in DTYPES:
        raise LmstackError(f"dtype {name!r} is not supported; choose float32, bfloat16 or float16")
    return DTYPES[name.lower()]


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" picks CUDA when present, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmstackError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmstackError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """None means float32 on CPU (fast there) and bfloat16 on CUDA."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name)
