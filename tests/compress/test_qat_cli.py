"""`lmstack quantize --method qat`: fake-quant fine-tuning through the CLI exports the real int4 model that
`generate` and `eval` load, and its layers compute exactly what the fake-quantized layers computed."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

import lmstack.compress.qat as qat
from lmstack.cli import main
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.hub import load_model


def _qat_args(model, out, calib, *extra: str) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "qat", "--out", str(out), "--calib", str(calib),
            "--calib-samples", "8", "--calib-seq-len", "32", *extra]  # fmt: skip


def test_qat_cli_exports_int4_layers_equal_to_the_fake_quantized_ones(
    tiny_dir, tmp_path, corpus_file, monkeypatch, capsys
):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    fake_outputs: dict[str, torch.Tensor] = {}
    real_export = qat.export_quantized

    def spy(model):  # what the trained fake-quantized layers compute, just before export
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, qat.FakeQuantLinear) and module.in_features == 64:
                    fake_outputs[name] = module(x)
        return real_export(model)

    monkeypatch.setattr(qat, "export_quantized", spy)
    out = tmp_path / "qat"
    args = _qat_args(tiny_dir, out, corpus_file, "--asymmetric", "--qat-steps", "12", "--qat-lr", "3e-3")
    assert main(args) == 0
    err = capsys.readouterr().err
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", err).groups())
    assert last < first  # the fake-quantized model learned

    model, tokenizer = load_model(out)
    assert tokenizer is not None and isinstance(model.lm_head, Int8Linear)
    assert len(fake_outputs) == 2 * 6  # q/k/v/o, gate/up per block (down_proj reads 128 features)
    for name, expected in fake_outputs.items():
        module = model.get_submodule(name)
        assert isinstance(module, Int4Linear) and not module.symmetric and module.group_size == 32, name
        with torch.no_grad():
            torch.testing.assert_close(F.linear(x, module.dequantize(), module.bias), expected, rtol=1e-5, atol=1e-5)
            assert (module(x) - expected).abs().max() < 0.02 * expected.abs().max()  # kernel rounds activations
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["method"] == "qat" and config["qat_steps"] == 12 and config["symmetric"] is False
    assert main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert main(["eval", "--model", str(out), "--tasks", "ppl", "--device", "cpu"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--qat-steps", "0"], "--qat-steps >= 1"),
        (["--qat-lr", "0"], "--qat-lr > 0"),
        (["--group-size", "48"], "multiple of 32"),
    ],
)
def test_qat_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, corpus_file, capsys, extra, message):
    out = tmp_path / "q"
    assert main(_qat_args(tiny_dir, out, corpus_file, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
