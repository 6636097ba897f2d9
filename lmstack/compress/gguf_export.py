"""Quantized models -> GGUF tensors for `lmstack convert --to gguf` (see lmstack.convert.gguf.save_gguf).

A module whose format is exactly a llama.cpp block type is written as those blocks, byte for byte, so
the file runs the very weights lmstack runs (no second rounding):
  Int8Linear group 32 -> Q8_0;  Int4Linear symmetric group 32 -> Q4_0;  asymmetric group 32 -> Q4_1.
Other formats (int8 per channel, int4 groups of 64+, NF4) are dequantized and quantized again to the
requested --dtype, except that 8-bit layers stay 8-bit (Q8_0) in a 4-bit file, as llama.cpp keeps its
output matrix. A tied output head read by a `QuantizedEmbedding` is written once, as token_embd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmstack.compress.base import QuantizedLinear
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.compress.model import QuantizedEmbedding, quantized_modules

if TYPE_CHECKING:
    from lmstack.model.transformer import Transformer

FOUR_BIT = ("Q4_0", "Q4_1")


def gguf_block_type(module: QuantizedLinear) -> str | None:
    """The llama.cpp type that holds exactly this module's numbers, or None."""
    if isinstance(module, Int8Linear) and module.group_size == 32 and module.method == "int8":
        return "Q8_0"
    if isinstance(module, Int4Linear) and module.group_size == 32:
        return "Q4_0" if module.symmetric else "Q4_1"
    return None


def gguf_blocks(module: QuantizedLinear) -> torch.Tensor:
    """(rows, row_bytes) uint8: the module's rows as Q8_0 / Q4_0 / Q4_1 blocks (scale [, min], values)."""
    rows, n_blocks = module.out_features, module.in_features // 32
    parts = [module.scales.view(torch.uint8).view(rows, n_blocks, 2)]
    if isinstance(module, Int4Linear) and module.mins is not None:
        parts.append(module.mins.view(torch.uint8).view(rows, n_blocks, 2))
    values = module.qweight.view(torch.uint8).view(rows, n_blocks, -1)  # 32 int8 or 16 bytes of nibbles
    return torch.cat([*parts, values], dim=-1).reshape(rows, -1).contiguous()


def gguf_export_state(model: Transformer, file_type: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict for GGUF export: every `.weight` present (float, or uint8 blocks) + per-name GGUF types.

    file_type: the export --dtype in GGUF spelling (F32, F16, Q8_0, Q4_0, Q4_1). The returned types
    name blocks already encoded (uint8 tensors) and layers kept 8-bit in a 4-bit file; every other
    tensor follows file_type.
    """
    modules = quantized_modules(model)
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in modules}
    types: dict[str, str] = {}
    for name, module in modules.items():
        exact = gguf_block_type(module)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
        if exact is not None and file_type not in ("F32", "F16"):
            state[f"{name}.weight"], types[f"{name}.weight"] = gguf_blocks(module), exact
            continue
        state[f"{name}.weight"] = module.dequantize()
        if isinstance(module, Int8Linear) and file_type in FOUR_BIT:
            types[f"{name}.weight"] = "Q8_0"
    if isinstance(model.tok_emb, QuantizedEmbedding):  # tied head: token_embd is the head's table
        state["tok_emb.weight"] = state["lm_head.weight"]
        if "lm_head.weight" in types:
            types["tok_emb.weight"] = types["lm_head.weight"]
    return state, types
