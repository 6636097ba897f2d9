"""Model conversion: Hugging Face safetensors <-> lmstack <-> GGUF.

    lmstack convert --model REF --to hf|gguf|lmstack --out PATH [--dtype ...]

REF is anything `lmstack.hub.resolve` accepts (lmstack dir, run dir, HF dir, .gguf, alias). The model
is loaded into the one `Transformer` definition, then written by the target format's exporter:
  hf       `hf.save_hf_dir`: config.json + model.safetensors + tokenizer + generation_config.json
           (transformers, vLLM, TGI, SGLang load it); --dtype float32|bfloat16|float16
  gguf     `gguf.save_gguf`: one .gguf with tokenizer and chat template (llama.cpp, Ollama, LM Studio);
           --dtype f32|f16|q8_0
  lmstack  `lmstack.model.io.save_model_dir`; --dtype float32|bfloat16|float16
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from lmstack.config import ModelConfig
from lmstack.errors import LmstackError

TARGETS = ("hf", "gguf", "lmstack")
TORCH_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name.lower() not in TORCH_DTYPES:
        raise LmstackError(f"--dtype {name!r} is not supported; choose float32, bfloat16 or float16")
    return TORCH_DTYPES[name.lower()]


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip parameter init while building on the meta device: the values are replaced anyway, and
    torch's first `normal_` on a meta tensor imports its decompositions (~1 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def empty_model(cfg: ModelConfig):
    """A `Transformer` on the meta device, ready for `lmstack.model.io.load_weights` (assign=True)."""
    from lmstack.model.transformer import Transformer

    with torch.device("meta"), _no_init():
        return Transformer(cfg)


def convert(model_ref: str, to: str, out: str | Path, dtype: str | None = None) -> Path:
    """Load `model_ref` and write it as `to` at `out`. Returns the written path."""
    from lmstack.hub import load_model

    if to not in TARGETS:
        raise LmstackError(f"--to {to!r} is not a conversion target; choose one of {', '.join(TARGETS)}")
    out = Path(out)
    if to == "gguf":
        from lmstack.convert.gguf import EXPORT_DTYPES, save_gguf

        if dtype is not None and dtype.lower() not in EXPORT_DTYPES:
            raise LmstackError(f"--dtype {dtype!r} is not a GGUF type; choose one of {', '.join(EXPORT_DTYPES)}")
        if out.suffix != ".gguf":
            raise LmstackError(f"--out {str(out)!r} must be a file name ending in .gguf")
        model, tokenizer = load_model(model_ref)
        save_gguf(model, tokenizer, out, dtype=dtype)
    else:
        target_dtype = torch_dtype(dtype)
        model, tokenizer = load_model(model_ref, dtype=target_dtype)
        if to == "hf":
            from lmstack.convert.hf import save_hf_dir

            save_hf_dir(model, tokenizer, out)
        else:
            from lmstack.model.io import save_model_dir

            save_model_dir(model, out, tokenizer)
    print(f"converted {model_ref} -> {out} ({to})", file=sys.stderr)
    return out
