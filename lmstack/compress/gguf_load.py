"""Run a GGUF file's quantized weights as they are: Q8_0 / Q4_0 / Q4_1 blocks become packed modules.

    from lmstack.hub import load_model
    model, tok = load_model("smollm2-135m-instruct", keep_quantized=True)   # Q4_1 layers, Q8_0 head

llama.cpp's blocks are (fp16 scale [, fp16 min], 32 values) per 32 columns; lmstack's modules keep the
same numbers in separate arrays, so conversion is a byte shuffle, never a trip through fp32:
  Q8_0 (34 bytes: d, int8 q[32])          -> Int8Linear, group 32        w = d * q
  Q4_0 (18 bytes: d, 16 bytes of nibbles) -> Int4Linear symmetric, g 32  w = d * (q - 8)
  Q4_1 (20 bytes: d, m, nibbles)          -> Int4Linear asymmetric, g 32 w = d * q + m
The nibble order inside a block (column j low, j + 16 high) is Int4Linear's own. Other tensor types
(F32/F16 norms, K-quants) are dequantized as `lmstack.convert.gguf` does. A tied output head (no
output.weight, as in SmolLM2) is built from token_embd, and the embedding lookup reads the same rows.
Dense llama/qwen2 architectures load packed; gpt2 (fused attn_qkv) and MoE (stacked experts) files
load dequantized, with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmstack.compress.base import QuantizedLinear
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.compress.model import QuantizedEmbedding
from lmstack.errors import LmstackError

if TYPE_CHECKING:
    from lmstack.convert.gguf_reader import GGUFTensor
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def packed_module(t: GGUFTensor) -> QuantizedLinear:
    """A 2-D Q8_0/Q4_0/Q4_1 GGUF tensor -> the lmstack module holding the same numbers."""
    rows, cols = t.shape
    kind = t.type_name
    bytes_per_block = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    blocks = np.asarray(t.data).reshape(rows, cols // 32, bytes_per_block)

    def field(start: int, stop: int, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(blocks[:, :, start:stop]).view(dtype).reshape(rows, -1))

    scales = field(0, 2, np.float16)
    if kind == "Q8_0":
        return Int8Linear(field(2, 34, np.int8), scales)
    if kind == "Q4_0":
        return Int4Linear(field(2, 18, np.uint8), scales)
    return Int4Linear(field(4, 20, np.uint8), scales, mins=field(2, 4, np.float16))


def _rows_unpermuted(module: QuantizedLinear, n_head: int) -> QuantizedLinear:
    """Undo llama.cpp's q/k row order on packed rows (rows move whole, so their bytes are untouched)."""
    from lmstack.convert.gguf import _unpermute_qk

    for name, buf in list(module.named_buffers(recurse=False)):
        setattr(module, name, _unpermute_qk(buf, n_head).contiguous())
    return module


def load_gguf_quantized(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer]:
    """A .gguf file -> (Transformer with Q8_0/Q4_0/Q4_1 linear layers packed, Tokenizer)."""
    from lmstack.convert.gguf import _global_names, _layer_names, gguf_model_config, load_gguf
    from lmstack.convert.gguf_reader import dequantize_tensor, read_gguf
    from lmstack.convert.gguf_tokenizer import tokenizer_from_gguf
    from lmstack.model.transformer import Transformer

    gf = read_gguf(path)
    cfg = gguf_model_config(gf)
    arch = gf.architecture
    if arch not in ("llama", "qwen2") or cfg.is_moe:
        warnings.warn(
            f"{gf.path}: {arch}{' MoE' if cfg.is_moe else ''} GGUF files load dequantized (packed loading covers "
            "dense llama/qwen2)",
            stacklevel=2,
        )
        return load_gguf(path, device=device, dtype=dtype)
    tokenizer = tokenizer_from_gguf(gf.metadata, gf.path)
    names = dict(_global_names(cfg))
    for i in range(cfg.n_layer):
        names.update(_layer_names(cfg, arch, i))
    embedding = gf.tensors.get("token_embd.weight")
    packed_tied_head = cfg.tie_embeddings and embedding is not None and embedding.type_name in KEPT_TYPES
    if packed_tied_head:  # the head is built packed from token_embd; the lookup reads its rows
        del names["tok_emb.weight"]
        names["lm_head.weight"] = "token_embd.weight"
    with torch.device("meta"):
        model = Transformer(cfg)
    floats: dict[str, torch.Tensor] = {}
    for ours, theirs in names.items():
        t = gf.tensors.get(theirs)
        if t is None:
            raise LmstackError(f"{gf.path}: tensor {theirs!r} is missing; the file is incomplete or not a {arch} model")
        slot = ours.removesuffix(".weight")
        n_head = cfg.n_head if ".q_proj." in ours else cfg.n_kv_head if ".k_proj." in ours else None
        is_linear = ours.endswith(".weight") and isinstance(model.get_submodule(slot), torch.nn.Linear)
        if is_linear and t.type_name in KEPT_TYPES and len(t.shape) == 2:
            module = packed_module(t)
            if arch == "llama" and n_head:
                module = _rows_unpermuted(module, n_head)
            bias = floats.pop(f"{slot}.bias", None)
            if bias is not None:
                module.bias = torch.nn.Parameter(bias, requires_grad=False)
            model.set_submodule(slot, module)
            continue
        w = dequantize_tensor(t, gf.path)
        if arch == "llama" and n_head:
            from lmstack.convert.gguf import _unpermute_qk

            w = _unpermute_qk(w, n_head)
        if ours.endswith(".bias") and isinstance(model.get_submodule(slot), QuantizedLinear):
            model.get_submodule(slot).bias = torch.nn.Parameter(w, requires_grad=False)
        else:
            floats[ours] = w
    if packed_tied_head:
        model.tok_emb = QuantizedEmbedding(model.lm_head, torch.float32)
    model.load_state_dict(floats, strict=False, assign=True)
    if cfg.tie_embeddings and not packed_tied_head:
        model.lm_head.weight = model.tok_emb.weight
    leftover = [n for n, p in model.state_dict().items() if p.is_meta]
    if leftover:
        raise LmstackError(f"{gf.path}: tensors for {leftover[:3]} are missing; the file is incomplete")
    model._rope_cache = None
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), tokenizer
