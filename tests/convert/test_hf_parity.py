"""Hugging Face format import/export against transformers on tiny random models of every architecture."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.config import model_config
from lmstack.convert.hf import load_hf_dir, save_hf_dir
from lmstack.hub import load_model
from lmstack.model.io import load_model_dir, model_state, save_model_dir
from lmstack.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=5000.0),
    "llama-tied-headdim": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True
    ),
    "llama-bias": lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "gpt2-exact-gelu": lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, activation_function="gelu"
    ),
}


def _perturb(model: torch.nn.Module) -> None:
    """Random norms and biases too, so a swapped or dropped 1-D tensor cannot hide."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)


def _max_diff(ours, theirs, ids) -> float:
    with torch.no_grad():
        return (ours(ids).logits - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_import_matches_transformers(name, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert tokenizer is None  # no tokenizer files were saved
    ids = torch.randint(0, 128, (2, 16))
    assert _max_diff(model, hf, ids) <= 1e-4


def test_sharded_checkpoint_with_index(tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS["llama"]()).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, _ = load_model(tmp_path)
    assert _max_diff(model, hf, torch.randint(0, 128, (1, 10))) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_import_in_half_precision(dtype, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS["qwen2"]()).eval()
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    expected = hf.model.layers[1].mlp.down_proj.weight.to(dtype)
    assert torch.equal(model.layers[1].ffn.down_proj.weight, expected)


EXPORT_CASES = {
    "llama": ("tiny", {}, "LlamaForCausalLM"),
    "llama-untied-headdim": ("tiny", dict(tie_embeddings=False, head_dim=48), "LlamaForCausalLM"),
    "llama-bias": ("tiny", dict(bias=True), "LlamaForCausalLM"),
    # q/k/v biases with our GPT-4-split tokenizer: LLaMA + zero o_proj bias (see export_architecture)
    "qkv-bias": ("tiny", dict(qkv_bias=True), "LlamaForCausalLM"),
    "mixtral": ("moe-tiny", dict(moe_shared_expert=False), "MixtralForCausalLM"),
    "gpt2": ("tiny-gpt2", {}, "GPT2LMHeadModel"),
    "gpt2-nobias-untied": ("tiny-gpt2", dict(bias=False, tie_embeddings=False), "GPT2LMHeadModel"),
    "gpt2-exact-gelu": ("tiny-gpt2", dict(gelu_approximate="none"), "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers(case, tmp_path, tokenizer_dir):
    from lmstack.tokenizer import Tokenizer

    preset, overrides, arch = EXPORT_CASES[case]
    torch.manual_seed(0)
    model = Transformer(model_config(preset, vocab_size=1024, n_layer=2, **overrides)).eval()
    _perturb(model)
    tok = Tokenizer.load(tokenizer_dir)
    save_hf_dir(model, tok, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == arch
    assert _max_diff(model, hf, torch.randint(0, 1024, (2, 16))) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, this is a test of 12345 tokens."
    assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_id or tok.eos_id in generation["eos_token_id"]


@pytest.mark.parametrize("case", ["llama", "qkv-bias", "mixtral", "gpt2-nobias-untied", "gpt2-exact-gelu"])
def test_lmstack_hf_lmstack_round_trip_is_lossless(case, tmp_path, tokenizer_dir):
    from lmstack.tokenizer import Tokenizer

    preset, overrides, _ = EXPORT_CASES[case]
    torch.manual_seed(0)
    model = Transformer(model_config(preset, vocab_size=1024, n_layer=2, **overrides)).eval()
    _perturb(model)
    save_model_dir(model, tmp_path / "ours", Tokenizer.load(tokenizer_dir))
    from lmstack.convert.export import convert

    convert(str(tmp_path / "ours"), "hf", tmp_path / "hf")
    convert(str(tmp_path / "hf"), "lmstack", tmp_path / "back")
    back, tok = load_model_dir(tmp_path / "back")
    original = model_state(model)
    restored = model_state(back)
    if model.cfg.family == "gpt2" and not model.cfg.bias:  # HF GPT-2 always has biases: exported as zeros
        assert all(not t.any() for k, t in restored.items() if k not in original)
        restored = {k: v for k, v in restored.items() if k in original}
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    for field in (
        "vocab_size",
        "n_layer",
        "n_head",
        "n_kv_head",
        "d_model",
        "d_ff",
        "head_dim",
        "max_seq_len",
        "family",
        "norm_eps",
        "rope_theta",
        "qkv_bias",
        "tie_embeddings",
        "n_experts",
        "n_experts_per_tok",
        "gelu_approximate",
    ):
        assert getattr(back.cfg, field) == getattr(model.cfg, field), field
    assert tok.encode("round trip ok") == Tokenizer.load(tokenizer_dir).encode("round trip ok")


def test_qkv_bias_without_tokenizer_exports_qwen2(tmp_path):
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=256, n_layer=2, qkv_bias=True)).eval()
    _perturb(model)
    save_hf_dir(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert _max_diff(model, hf, torch.randint(0, 256, (2, 16))) <= 1e-4


def test_bf16_export_writes_bf16(tmp_path):
    from safetensors import safe_open

    model = Transformer(model_config("tiny", vocab_size=256, n_layer=1)).to(torch.bfloat16)
    save_hf_dir(model, None, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unsupported_export_is_clear(tmp_path):
    from lmstack.errors import LmstackError

    model = Transformer(model_config("moe-tiny", vocab_size=256, n_layer=1))  # has a shared expert
    with pytest.raises(LmstackError, match="Mixtral-style MoE"):
        save_hf_dir(model, None, tmp_path)


def test_hf_dir_tokenizer_and_generation_eos(tmp_path, tokenizer_dir):
    from lmstack.tokenizer import Tokenizer

    model = Transformer(model_config("tiny", vocab_size=1024, n_layer=1))
    tok = Tokenizer.load(tokenizer_dir)
    save_hf_dir(model, tok, tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    generation["eos_token_id"] = [tok.eos_id, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    _, loaded = load_hf_dir(tmp_path)
    assert {tok.eos_id, 7} <= loaded.stop_ids
    assert loaded.chat_template == tok.chat_template
