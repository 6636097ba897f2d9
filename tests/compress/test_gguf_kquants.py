"""GGUF Q5_0, Q4_K and Q6_K tensors run packed: each module's weights against `gguf.quants.dequantize` of
the same bytes (Q5_0 exact, Q4_K within the float16 rounding of its sub-block scales, Q6_K within half
an int8 step), and a whole GGUF written here loads packed with logits close to the dequantized load.

gguf-py 0.19 quantizes Q5_0 but not K-quants (NotImplementedError), so K-quant tensors are random valid
blocks: any bytes with finite float16 scales are a block llama.cpp would run.
"""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lmstack.compress.gguf_load import packed_module
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.config import ModelConfig
from lmstack.convert.gguf import save_gguf
from lmstack.convert.gguf_reader import GGUFTensor, read_gguf
from lmstack.errors import LmstackError
from lmstack.hub import load_model
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], 2)


def _k_blocks(kind: Q, rows: int, cols: int, rng: np.random.Generator, pow2_scales: bool = False) -> np.ndarray:
    """(rows, cols // 256 * bytes) random valid Q4_K / Q6_K / Q5_K super-blocks."""
    n = rows * cols // 256
    _, size = gguf.constants.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)

    def scale() -> np.ndarray:
        if pow2_scales:  # d * sc is then exact in float16
            return 2.0 ** rng.integers(-13, -10, (n, 1))
        return rng.uniform(1e-4, 2e-4, (n, 1))

    if kind == Q.Q6_K:  # ql 128, qh 64, int8 scales 16, d
        raw[:, 192:208] = rng.integers(-20, 21, (n, 16)).astype(np.int8).view(np.uint8)
        raw[:, 208:210] = _fp16_bytes(scale())
    else:  # Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, ...
        raw[:, 0:2], raw[:, 2:4] = _fp16_bytes(scale()), _fp16_bytes(scale())
    return raw.reshape(rows, -1)


def _tensor(kind: Q, data: np.ndarray, rows: int, cols: int) -> GGUFTensor:
    return GGUFTensor("blk.0.ffn_down.weight", (rows, cols), int(kind), data)


def _reference(kind: Q, data: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, kind).reshape(rows, cols).copy())


def test_q5_0_is_exact_int8():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (24, 96)).astype(np.float32)
    data = gguf.quants.quantize(w, Q.Q5_0)
    module = packed_module(_tensor(Q.Q5_0, data, 24, 96))
    assert isinstance(module, Int8Linear) and module.group_size == 32
    assert module.qweight.min() >= -16 and module.qweight.max() <= 15
    assert torch.equal(module.dequantize(), _reference(Q.Q5_0, data, 24, 96))


@pytest.mark.parametrize("pow2_scales", [True, False])
def test_q4_k_maps_onto_int4_group_32(pow2_scales):
    rng = np.random.default_rng(1)
    rows, cols = 7, 512
    data = _k_blocks(Q.Q4_K, rows, cols, rng, pow2_scales)
    module = packed_module(_tensor(Q.Q4_K, data, rows, cols))
    assert isinstance(module, Int4Linear) and not module.symmetric and module.group_size == 32
    reference = _reference(Q.Q4_K, data, rows, cols)
    if pow2_scales:  # the codes, the sub-block order and the 6-bit scale unpacking are exact
        assert torch.equal(module.dequantize(), reference)
    else:  # float16 sub-block scale and min: at most 2^-11 of each, i.e. of (15 * scale + |min|) per weight
        s = module.scales.float().repeat_interleave(32, dim=1)
        m = module.mins.float().abs().repeat_interleave(32, dim=1)
        err = (module.dequantize() - reference).abs()
        assert torch.all(err <= 2.0**-11 * (15 * s + m) * 1.01)
        assert err.max() > 0  # really rounded: the test would notice an exact float32 path
    x = torch.randn(3, cols)
    y, expected = module(x), x @ reference.T
    assert (y - expected).abs().max() < 0.02 * expected.abs().max()  # activations rounded per 32 by the kernel


def test_q6_k_rounds_onto_int8_group_32_within_half_a_step():
    rng = np.random.default_rng(2)
    rows, cols = 5, 256
    data = _k_blocks(Q.Q6_K, rows, cols, rng)
    module = packed_module(_tensor(Q.Q6_K, data, rows, cols))
    assert isinstance(module, Int8Linear) and module.group_size == 32
    reference = _reference(Q.Q6_K, data, rows, cols)
    step = reference.view(rows, -1, 32).abs().amax(-1, keepdim=True) / 127
    err = (module.dequantize() - reference).view(rows, -1, 32).abs()
    assert torch.all(err <= 0.5 * step * 1.01 + 1e-9)


def test_unsupported_type_or_shape_is_a_clear_error():
    data = np.zeros((4, 176), dtype=np.uint8)
    with pytest.raises(LmstackError, match="Q5_K.*--gguf-weights float"):
        packed_module(_tensor(Q.Q5_K, data, 4, 256), "m.gguf")


# -- a whole file -----------------------------------------------------------------------------------------

# GGUF tensor name suffix in layer 0 -> type written (layer 1 keeps its float weights as F32)
LAYER0 = {
    "attn_q": Q.Q4_K,
    "attn_k": Q.Q4_K,
    "attn_v": Q.Q6_K,
    "attn_output": Q.Q5_0,
    "ffn_gate": Q.Q4_K,
    "ffn_up": Q.Q4_K,
    "ffn_down": Q.Q5_K,  # not kept: dequantized, with a warning
}


def _write_kquant_gguf(path, tokenizer_dir, monkeypatch) -> None:
    import lmstack.convert.gguf as gguf_module

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1024, n_layer=2, n_head=4, n_kv_head=2, d_model=256, d_ff=512, max_seq_len=64)
    model = Transformer(cfg).eval()
    rng = np.random.default_rng(3)
    export = gguf_module._export_tensors

    def with_kquants(model_, arch, qtype):
        for name, tensor, own_type in export(model_, arch, qtype):
            kind = (
                LAYER0.get(name.removeprefix("blk.0.").removesuffix(".weight")) if name.startswith("blk.0.") else None
            )
            if name == "token_embd.weight":
                kind = Q.Q6_K  # the tied head, as in Q4_K_M files
            if kind is None:
                yield name, tensor, own_type
            elif kind == Q.Q5_0:
                yield name, torch.from_numpy(gguf.quants.quantize(tensor.float().numpy(), kind)), kind
            else:
                yield name, torch.from_numpy(_k_blocks(kind, *tensor.shape, rng)), kind

    monkeypatch.setattr(gguf_module, "_export_tensors", with_kquants)
    save_gguf(model, Tokenizer.load(tokenizer_dir), path, dtype="f32")


def test_kquant_gguf_loads_packed_close_to_its_float_load(tmp_path, tokenizer_dir, monkeypatch):
    path = tmp_path / "k.gguf"
    _write_kquant_gguf(path, tokenizer_dir, monkeypatch)
    assert read_gguf(path).tensors["blk.0.attn_q.weight"].type_name == "Q4_K"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed, _ = load_model(path, keep_quantized=True)
    assert any("1 Q5_K" in str(w.message) for w in caught)
    floats, _ = load_model(path)
    attn, ffn = packed.layers[0].attn, packed.layers[0].ffn
    assert isinstance(attn.q_proj, Int4Linear) and isinstance(ffn.gate_proj, Int4Linear)  # Q4_K
    assert isinstance(attn.v_proj, Int8Linear) and isinstance(packed.lm_head, Int8Linear)  # Q6_K
    assert isinstance(attn.o_proj, Int8Linear) and torch.equal(  # Q5_0: exact
        attn.o_proj.dequantize(), floats.layers[0].attn.o_proj.weight
    )
    assert type(ffn.down_proj) is torch.nn.Linear  # Q5_K
    for name in ("layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.ffn.up_proj"):  # Q4_K, rows unpermuted
        ours, theirs = packed.get_submodule(name).dequantize(), floats.get_submodule(name).weight
        assert (ours - theirs).abs().max() <= 2.0**-10 * theirs.abs().max(), name
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = packed(ids).logits, floats(ids).logits
    rel, agree = float((a - b).norm() / b.norm()), float((a.argmax(-1) == b.argmax(-1)).float().mean())
    assert (
        rel < 0.05 and agree > 0.85
    )  # measured 0.018 and 0.94; activations rounded per 32 by the kernels, Q6_K head re-rounded
