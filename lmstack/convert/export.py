"""`lmstack convert`: load any model reference and write it in another format.

    lmstack convert --model REF --to hf|gguf|lmstack --out PATH [--dtype ...]

REF is anything `lmstack.hub.resolve` accepts (lmstack dir, run dir, HF dir, .gguf, alias, adapter: merged
into its base first). The model
is loaded into the one `Transformer` definition, then written by the target format's exporter:
  hf       `hf.save_hf_dir`: config.json + model.safetensors + tokenizer + generation_config.json
           (transformers, vLLM, TGI, SGLang load it); --dtype float32|bfloat16|float16
  gguf     `gguf.save_gguf`: one .gguf with tokenizer and chat template (llama.cpp, Ollama, LM Studio);
           --dtype f32|f16|q8_0
  lmstack  `lmstack.model.io.save_model_dir`; --dtype float32|bfloat16|float16
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmstack.convert.gguf import EXPORT_DTYPES, save_gguf
from lmstack.convert.hf import save_hf_dir
from lmstack.errors import LmstackError
from lmstack.hub import load_model
from lmstack.model.io import save_model_dir
from lmstack.utils.device import torch_dtype

if TYPE_CHECKING:
    import torch

    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

TARGETS = ("hf", "gguf", "lmstack")


def convert(model_ref: str, to: str, out: str | Path, dtype: str | None = None) -> Path:
    """Load `model_ref` and write it as `to` at `out`. Returns the written path."""
    if to not in TARGETS:
        raise LmstackError(f"--to {to!r} is not a conversion target; choose one of {', '.join(TARGETS)}")
    out = Path(out)
    if to == "gguf":
        if dtype is not None and dtype.lower() not in EXPORT_DTYPES:
            raise LmstackError(f"--dtype {dtype!r} is not a GGUF type; choose one of {', '.join(EXPORT_DTYPES)}")
        if out.suffix != ".gguf":
            raise LmstackError(f"--out {str(out)!r} must be a file name ending in .gguf")
        model, tokenizer = _load_plain(model_ref)
        save_gguf(model, tokenizer, out, dtype=dtype)
    else:
        model, tokenizer = _load_plain(model_ref, dtype=torch_dtype(dtype))
        if to == "hf":
            save_hf_dir(model, tokenizer, out)
        else:
            save_model_dir(model, out, tokenizer)
    print(f"converted {model_ref} -> {out} ({to})", file=sys.stderr)
    return out


def _load_plain(model_ref: str, dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Exports write plain weights: an adapter reference (lmstack.peft) is merged into its base first."""
    model, tokenizer = load_model(model_ref, dtype=dtype)
    if hasattr(model, "peft_config"):
        from lmstack.peft import merge_adapter

        merge_adapter(model)
    return model, tokenizer
