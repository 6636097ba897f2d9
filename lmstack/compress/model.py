"""Whole models: quantize the linear slots, save a quantized model directory, load it back packed.

    from lmstack.compress.model import quantize_model, save_quantized, load_quantized_dir
    model = quantize_model(model, "int4", group_size=32)   # layers int4, lm_head int8 (Q8_0)
    save_quantized(model, "out/", tokenizer)               # model.safetensors + config.json with "quantization"
    model, tok = load_quantized_dir("out/")                # or hub.load_model("out/"): packed, never fp32

A quantized model directory is an lmstack model directory whose config.json has a "quantization" entry:
`{"method": ..., "modules": {slot name: {its config(), in_features, out_features}}, "embedding": ...}`.
Every linear slot of every block (q/k/v/o, gate/up/down, MoE experts; not the MoE router, which is tiny)
is quantized with the chosen method. The output head (`lm_head`, 28% of SmolLM2's weights) is quantized
to int8 in groups of 32 (GGUF Q8_0) whatever the method, as llama.cpp keeps its output matrix in 8 bits
or more: it decides every token. When the head is tied to the embeddings, the embedding table becomes a
`QuantizedEmbedding` that looks rows up in the head's packed weight ("embedding": "lm_head"), so the
table is stored and held once, quantized.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmstack.compress.base import QUANTIZED_FORMATS, QuantizedLinear, check_group_size
from lmstack.errors import LmstackError

if TYPE_CHECKING:
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

RTN_METHODS = ("int8", "int4", "nf4")
# Modules that define stored formats; imported before loading so their classes are registered.
FORMAT_MODULES = (
    "lmstack.compress.int8",
    "lmstack.compress.int4",
    "lmstack.compress.nf4",
    "lmstack.compress.smoothquant",
)


class QuantizedEmbedding(nn.Module):
    """Token embeddings read from a quantized table (the tied output head), one row per token.

    The table is held by reference, not registered, so the state dict stores it once (under lm_head).
    `weight` is an empty tensor that only carries the model's compute dtype and device, which is what
    callers ask `model.tok_emb.weight` for (KV-cache dtype, input device); it follows `model.to(...)`.
    """

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not hasattr(table, "dequantize_rows"):
            raise LmstackError(f"{type(table).__name__} cannot serve as an embedding table (no dequantize_rows)")
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.__dict__["table"] = table  # a plain attribute: not a submodule, not in the state dict
        self.register_buffer("weight", torch.empty(0, table.in_features, dtype=dtype), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        rows = self.table.dequantize_rows(idx.reshape(-1))
        return rows.to(self.weight.dtype).view(*idx.shape, self.embedding_dim)


def linear_slots(model: Transformer) -> dict[str, nn.Module]:
    """Every linear slot of every block (what `quantize_model` replaces), by full module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith("layers.") and not name.endswith(".router") and _is_linear_slot(module)
    }


def _is_linear_slot(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantizedLinear))


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantize_model(
    model: Transformer, method: str, group_size: int | None = None, symmetric: bool = True
) -> Transformer:
    """Round-to-nearest quantization of every linear slot (in place); returns the model.

    method: int8 (per channel, or per `group_size` columns), int4 (group-wise, default group 32,
    `symmetric` like Q4_0 or asymmetric like Q4_1) or nf4 (block 64, double-quantized absmax).
    Everything is checked before any layer changes.
    """
    from lmstack.compress.int4 import Int4Linear
    from lmstack.compress.int8 import Int8Linear
    from lmstack.compress.nf4 import NF4Linear

    if method not in RTN_METHODS:
        raise LmstackError(f"unknown round-to-nearest method {method!r}; choose one of {', '.join(RTN_METHODS)}")
    already = quantized_modules(model)
    if already:
        name, module = next(iter(already.items()))
        raise LmstackError(
            f"the model is already quantized ({module.method} in {name} and {len(already) - 1} more layers); "
            "quantize the original float model instead"
        )
    slots = linear_slots(model)
    if method == "int4":
        group_size = group_size or 32
    if method in ("int4", "int8") and group_size:
        for name, linear in slots.items():
            check_group_size(group_size, linear.in_features, name, multiple_of=32 if method == "int4" else 1)
    if method == "nf4" and group_size:
        raise LmstackError("nf4 uses blocks of 64 values of the flattened weight; leave --group-size out")

    def convert(linear: nn.Linear) -> QuantizedLinear:
        if method == "int8":
            return Int8Linear.from_float(linear, group_size)
        if method == "int4":
            return Int4Linear.from_float(linear, group_size, symmetric)
        return NF4Linear.from_float(linear)

    for name, linear in slots.items():
        model.set_submodule(name, convert(linear))
    quantize_head(model)
    return model


def quantize_head(model: Transformer) -> None:
    """lm_head -> int8 per 32 columns (GGUF Q8_0, so exports carry it unchanged; per channel when the
    width is not a multiple of 32); a tied embedding table then reads the same packed rows."""
    from lmstack.compress.int8 import Int8Linear

    if isinstance(model.lm_head, QuantizedLinear):
        return
    dtype = model.tok_emb.weight.dtype
    group = 32 if model.lm_head.in_features % 32 == 0 else None
    model.lm_head = Int8Linear.from_float(model.lm_head, group)
    if model.cfg.tie_embeddings:
        model.tok_emb = QuantizedEmbedding(model.lm_head, dtype)


# -- save / load ---------------------------------------------------------------------------------------


def quantization_entry(model: Transformer, method: str, **settings: Any) -> dict[str, Any]:
    """The "quantization" entry of config.json for a model holding quantized modules."""
    modules = {
        name: {**m.config(), "in_features": m.in_features, "out_features": m.out_features}
        for name, m in quantized_modules(model).items()
    }
    if not modules:
        raise LmstackError("the model holds no quantized layers; quantize it before saving it as quantized")
    entry: dict[str, Any] = {"method": method, **settings, "modules": modules}
    if isinstance(model.tok_emb, QuantizedEmbedding):
        entry["embedding"] = "lm_head"
    return entry


def save_quantized(
    model: Transformer,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    method: str | None = None,
    **settings: Any,
) -> Path:
    """Write model.safetensors (packed tensors as they are) + config.json (+ tokenizer), atomically."""
    from safetensors.torch import save_file

    from lmstack.model.io import FORMAT
    from lmstack.utils.io import atomic_path, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = quantized_modules(model)
    entry = quantization_entry(model, method or next(iter(modules.values())).method, **settings)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # a float head tied to the embeddings is stored once, as tok_emb.weight
        state[name] = tensor.detach().to("cpu").contiguous()
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "version": 1,
        "model": dataclasses.asdict(model.cfg),
        "dtype": str(model.norm.weight.dtype).removeprefix("torch."),
        "quantization": entry,
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def quantization_config(directory: str | Path) -> dict[str, Any] | None:
    """The "quantization" entry of an lmstack model directory's config.json, or None."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    entry = raw.get("quantization") if isinstance(raw, dict) else None
    return entry if isinstance(entry, dict) else None


def format_class(method: str) -> type[QuantizedLinear]:
    for module in FORMAT_MODULES:
        importlib.import_module(module)
    if method not in QUANTIZED_FORMATS:
        raise LmstackError(
            f"quantized layer format {method!r} is unknown to this lmstack; "
            f"known: {', '.join(sorted(QUANTIZED_FORMATS))}"
        )
    return QUANTIZED_FORMATS[method]


def load_quantized_dir(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Build the model with its quantized modules made straight from the stored packed tensors."""
    from lmstack.model.io import read_model_config, read_safetensors
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

    directory = Path(directory)
    cfg = read_model_config(directory)
    entry = quantization_config(directory)
    if entry is None or not isinstance(entry.get("modules"), dict):
        raise LmstackError(f"{directory}/config.json has no valid 'quantization' entry; the directory is corrupt")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise LmstackError(f"no model.safetensors in {str(directory)!r}; the checkpoint is incomplete")
    tensors = read_safetensors(weights)
    raw_dtype = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("dtype", "float32")
    float_dtype = getattr(torch, str(raw_dtype), torch.float32)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, module_cfg in entry["modules"].items():
        model.set_submodule(name, _build_module(name, module_cfg, tensors, weights))
    if entry.get("embedding") == "lm_head":
        model.tok_emb = QuantizedEmbedding(model.lm_head, float_dtype)
    missing = sorted(
        name
        for name, t in model.state_dict().items()
        if t.is_meta and name not in tensors and not (name == "lm_head.weight" and cfg.tie_embeddings)
    )
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        raise LmstackError(
            f"{weights} does not match its config: missing {missing[:4]} unexpected {unexpected[:4]}; "
            "the checkpoint is corrupt or from a different config"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_embeddings and not isinstance(model.lm_head, QuantizedLinear):
        model.lm_head.weight = model.tok_emb.weight
    model._rope_cache = None
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    return model.eval(), tokenizer


def _build_module(name: str, module_cfg: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> QuantizedLinear:
    prefix = name + "."
    own = {key[len(prefix) :]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
    if not own:
        raise LmstackError(f"{path} has no tensors for quantized layer {name!r}; the checkpoint is incomplete")
    try:
        return format_class(module_cfg.get("method", "")).from_state(own, module_cfg)
    except (TypeError, KeyError) as exc:
        raise LmstackError(
            f"{path}: quantized layer {name!r} cannot be rebuilt ({exc}); the checkpoint is corrupt"
        ) from None
