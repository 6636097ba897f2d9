"""Run a GGUF file's quantized weights as they are: Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q4_K / Q6_K become packed modules.

    from lmstack.hub import load_model
    model, tok = load_model("smollm2-135m-instruct", keep_quantized=True)   # Q4_1 layers, Q8_0 head

llama.cpp's blocks are (fp16 scale [, fp16 min], 32 values) per 32 columns; lmstack's modules keep the
same numbers in separate arrays, so conversion is a byte shuffle, never a trip through fp32:
  Q8_0 (34 bytes: d, int8 q[32])          -> Int8Linear, group 32        w = d * q
  Q4_0 (18 bytes: d, 16 bytes of nibbles) -> Int4Linear symmetric, g 32  w = d * (q - 8)
  Q4_1 (20 bytes: d, m, nibbles)          -> Int4Linear asymmetric, g 32 w = d * q + m
  Q5_0 (22 bytes: d, 32 high bits, nibbles) -> Int8Linear, group 32     w = d * (q - 16), q - 16 stored as int8
The nibble order inside a block (column j low, j + 16 high) is Int4Linear's own. These four are exact.
K-quants work on super-blocks of 256 weights:
  Q4_K (144 bytes: d, dmin, 8 six-bit scales and mins, 256 nibbles) -> Int4Linear asymmetric, group 32:
       w = (d * sc_j) * q - (dmin * m_j) per sub-block j of 32 weights, so each sub-block is one group
       with scale d * sc_j and min -dmin * m_j. The codes move exactly (a nibble shuffle); the two
       products are formed in float32 (exact: 11 x 6 bits) and stored as float16, the kernels' scale
       type, which rounds them by at most 2^-11 of their value (a few thousandths of a quantization step).
  Q6_K (210 bytes: 6-bit values, 16 int8 scales per 256, d)           -> Int8Linear, group 32:
       its scale changes every 16 weights, which no lmstack kernel reads, so each tensor is dequantized
       (the gguf library's arithmetic, one tensor at a time) and rounded onto int8 per 32 values (Q8_0's
       rule): error at most half an int8 step, 1/254 of the group's largest weight (about 1/8 of a Q6_K
       step). Q4_K_M files keep their output head and some attn_v/ffn_down layers in Q6_K.
Other quantized types (Q5_1, Q5_K, Q2_K, Q3_K, IQ*) have no packed format that holds them (5-bit codes
with a minimum) and are dequantized with one warning naming them; F32/F16 norms are read as floats, as
`lmstack.convert.gguf` does. A tied output head (no
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
from lmstack.compress.int4 import Int4Linear, pack_int4
from lmstack.compress.int8 import Int8Linear
from lmstack.compress.model import QuantizedEmbedding
from lmstack.errors import LmstackError

if TYPE_CHECKING:
    from lmstack.convert.gguf_reader import GGUFTensor
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

# GGUF type -> (weights per block, bytes per block) of the types kept packed.
KEPT_TYPES = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
FLOAT_TYPES = ("F32", "F16", "BF16")


def packed_module(t: GGUFTensor, path: str | Path = "") -> QuantizedLinear:
    """A 2-D GGUF tensor of a `KEPT_TYPES` type -> the lmstack module holding its numbers (see above)."""
    kind = t.type_name
    if kind not in KEPT_TYPES or len(t.shape) != 2:
        raise LmstackError(
            f"{path}: tensor {t.name!r} ({kind}, shape {t.shape}) cannot run packed: lmstack keeps 2-D "
            f"{', '.join(KEPT_TYPES)} tensors packed; load the file with --gguf-weights float"
        )
    rows, cols = t.shape
    per_block, bytes_per_block = KEPT_TYPES[kind]
    blocks = np.asarray(t.data).reshape(rows, cols // per_block, bytes_per_block)
    if kind == "Q4_K":
        return _q4_k_module(blocks, t, path)
    if kind == "Q6_K":
        return _int8_from_dequantized(t, path)

    def field(start: int, stop: int, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(blocks[:, :, start:stop]).view(dtype).reshape(rows, -1))

    scales = field(0, 2, np.float16)
    if kind == "Q8_0":
        return Int8Linear(field(2, 34, np.int8), scales)
    if kind == "Q4_0":
        return Int4Linear(field(2, 18, np.uint8), scales)
    if kind == "Q5_0":
        return Int8Linear(_q5_0_values(blocks).reshape(rows, cols), scales)
    return Int4Linear(field(4, 20, np.uint8), scales, mins=field(2, 4, np.float16))


def _q5_0_values(blocks: np.ndarray) -> torch.Tensor:
    """(rows, n, 22) Q5_0 blocks -> (rows, n, 32) int8 values q - 16 in [-16, 15]."""
    nibbles = blocks[..., 6:22]
    low = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # column j low, j + 16 high
    high_bits = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")  # bit j: the 5th bit of column j
    high = ((high_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    return torch.from_numpy((low | high).astype(np.int8) - 16)


def _q4_k_module(blocks: np.ndarray, t: GGUFTensor, path: str | Path) -> Int4Linear:
    """(rows, n, 144) Q4_K super-blocks -> Int4Linear asymmetric, group 32 (see the module docstring)."""
    import gguf.quants

    rows, n_super = blocks.shape[:2]
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).astype(np.float32)  # (rows, n, 1)
    dmin = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).astype(np.float32)
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    sc, m = sc.reshape(rows, n_super, 8), m.reshape(rows, n_super, 8)
    scales = torch.from_numpy((d * sc.astype(np.float32)).reshape(rows, -1)).to(torch.float16)
    mins = torch.from_numpy((-(dmin * m.astype(np.float32))).reshape(rows, -1)).to(torch.float16)
    if not (torch.isfinite(scales).all() and torch.isfinite(mins).all()):
        raise LmstackError(
            f"{path}: tensor {t.name!r} (Q4_K) has sub-block scales beyond float16's range, which the packed "
            "kernels cannot hold; load the file with --gguf-weights float"
        )
    # 128 bytes per super-block = 4 runs of 32 bytes: low nibbles are sub-block 2c, high nibbles 2c + 1.
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 16:144])).view(rows, n_super, 4, 1, 32)
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(rows, -1)  # column order restored
    return Int4Linear(pack_int4(codes), scales, mins)


def _int8_from_dequantized(t: GGUFTensor, path: str | Path) -> Int8Linear:
    """Dequantize one tensor (the gguf library's arithmetic) and round it onto int8 per 32 columns."""
    from lmstack.convert.gguf_reader import dequantize_tensor

    rows, cols = t.shape
    linear = torch.nn.Linear(cols, rows, bias=False, device="meta")
    linear.weight = torch.nn.Parameter(dequantize_tensor(t, Path(path)), requires_grad=False)
    return Int8Linear.from_float(linear, group_size=32)


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
    unkept: dict[str, int] = {}  # quantized linear weights of types no packed format holds -> count
    for ours, theirs in names.items():
        t = gf.tensors.get(theirs)
        if t is None:
            raise LmstackError(f"{gf.path}: tensor {theirs!r} is missing; the file is incomplete or not a {arch} model")
        slot = ours.removesuffix(".weight")
        n_head = cfg.n_head if ".q_proj." in ours else cfg.n_kv_head if ".k_proj." in ours else None
        is_linear = ours.endswith(".weight") and isinstance(model.get_submodule(slot), torch.nn.Linear)
        if is_linear and t.type_name in KEPT_TYPES and len(t.shape) == 2:
            module = packed_module(t, gf.path)
            if arch == "llama" and n_head:
                module = _rows_unpermuted(module, n_head)
            bias = floats.pop(f"{slot}.bias", None)
            if bias is not None:
                module.bias = torch.nn.Parameter(bias, requires_grad=False)
            model.set_submodule(slot, module)
            continue
        if is_linear and t.type_name not in FLOAT_TYPES:
            unkept[t.type_name] = unkept.get(t.type_name, 0) + 1
        w = dequantize_tensor(t, gf.path)
        if arch == "llama" and n_head:
            from lmstack.convert.gguf import _unpermute_qk

            w = _unpermute_qk(w, n_head)
        if ours.endswith(".bias") and isinstance(model.get_submodule(slot), QuantizedLinear):
            model.get_submodule(slot).bias = torch.nn.Parameter(w, requires_grad=False)
        else:
            floats[ours] = w
    if unkept:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(unkept.items()))
        warnings.warn(
            f"{gf.path}: {counts} linear weights run dequantized to float32: no packed lmstack format holds "
            f"these types exactly (packed: {', '.join(KEPT_TYPES)})",
            stacklevel=2,
        )
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
