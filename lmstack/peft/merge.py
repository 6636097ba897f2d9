"""`lmstack merge --model ADAPTER --out DIR`: base + LoRA/DoRA adapter -> one plain lmstack model directory."""

from __future__ import annotations

import sys
from pathlib import Path

from lmstack.errors import LmstackError


def merge_to_dir(adapter_ref: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Load the adapter's base with the adapter, fold it in, and save (with the tokenizer)."""
    from lmstack.hub import load_model, resolve
    from lmstack.model.io import save_model_dir
    from lmstack.peft.io import merge_adapter
    from lmstack.utils.device import torch_dtype

    kind, path = resolve(adapter_ref)
    if kind != "adapter":
        raise LmstackError(f"{adapter_ref} is a {kind} model, not an adapter; pass an adapter or fine-tuning run dir")
    model, tokenizer = load_model(path)
    merge_adapter(model)
    if dtype is not None:
        model.to(torch_dtype(dtype))
    save_model_dir(model, out, tokenizer)
    print(f"merged {path} into its base -> {out}", file=sys.stderr)
    return Path(out)
