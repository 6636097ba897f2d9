"""The HF name table serves both directions: every parameter's HF name maps back to it, names are unique."""

from __future__ import annotations

import re

import pytest

from lmstack.config import model_config
from lmstack.convert.hf import export_architecture, hf_name, our_name
from lmstack.model.io import empty_model

CASES = {
    "LlamaForCausalLM": dict(preset="tiny", tie_embeddings=False),
    "Qwen2ForCausalLM": dict(preset="tiny", qkv_bias=True),
    "MixtralForCausalLM": dict(preset="tiny", n_experts=4, n_experts_per_tok=2),
    "GPT2LMHeadModel": dict(preset="tiny-gpt2"),
}


@pytest.mark.parametrize("arch", CASES)
def test_every_parameter_round_trips_through_its_hf_name(arch):
    overrides = dict(CASES[arch])
    cfg = model_config(overrides.pop("preset"), n_layer=2, **overrides)
    assert export_architecture(cfg) == arch
    names = [n for n, _ in empty_model(cfg).named_parameters()]
    if arch == "GPT2LMHeadModel":  # q, k and v travel fused as c_attn (split and fused around the table)
        names = list(dict.fromkeys(re.sub(r"attn\.[qkv]_proj", "attn.c_attn", n) for n in names))
    theirs = [hf_name(arch, n) for n in names]
    assert len(set(theirs)) == len(theirs)
    assert [our_name(arch, t) for t in theirs] == names


def test_known_names_and_import_only_spellings():
    assert hf_name("LlamaForCausalLM", "layers.3.attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("LlamaForCausalLM", "layers.3.attn.q_proj") == "model.layers.3.self_attn.q_proj"  # a module
    assert hf_name("MixtralForCausalLM", "layers.1.ffn.experts.7.down_proj.weight") == (
        "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    )
    assert hf_name("GPT2LMHeadModel", "layers.0.ffn.up_proj.weight") == "transformer.h.0.mlp.c_fc.weight"
    # transformers>=5 Mixtral names and OpenAI's unprefixed GPT-2 names are read, never written
    assert our_name("MixtralForCausalLM", "model.layers.1.mlp.gate.weight") == "layers.1.ffn.router.weight"
    assert (
        our_name("MixtralForCausalLM", "model.layers.1.mlp.experts.gate_up_proj") == "layers.1.ffn.experts.gate_up_proj"
    )
    assert our_name("GPT2LMHeadModel", "h.2.ln_1.bias") == "layers.2.attn_norm.bias"
    assert our_name("GPT2LMHeadModel", "wte.weight") == "tok_emb.weight"
    # names with no place in the architecture
    assert our_name("LlamaForCausalLM", "model.layers.0.block_sparse_moe.gate.weight") is None
    assert our_name("LlamaForCausalLM", "model.vision_tower.weight") is None
