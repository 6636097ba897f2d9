"""GPTQ: beats round-to-nearest on layer reconstruction, stores into Int4Linear/Int8Linear exactly, clear errors."""

from __future__ import annotations

import pytest
import torch

from lmstack.compress.calib import QuantGrid, calibration_tokens
from lmstack.compress.gptq import HessianAccumulator, gptq_model, gptq_quantize, reconstruction_error
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.errors import LmstackError
from tests.eval.tiny import markov_tokens, tiny_model, tiny_tokenizer, token_loss, trained_tiny_model


def correlated_inputs(rows: int = 1024, features: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g) @ torch.randn(features, features, generator=g) * 0.3
    x[:, :4] *= 20  # a few outlier channels, as real activations have
    return x


@pytest.mark.parametrize(
    "grid", [QuantGrid(4, 32, symmetric=False), QuantGrid(4, 32, symmetric=True), QuantGrid(8, None, symmetric=True)]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_layer_reconstruction(grid, act_order):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 128), correlated_inputs()
    hessian = HessianAccumulator(128)
    hessian.add(x[:400])
    hessian.add(x[400:])  # accumulated in two calls like the block runner does
    result = gptq_quantize(weight, hessian.H, grid, block_size=64, act_order=act_order)
    gptq_error = reconstruction_error(weight, result.weight, x)
    rtn_error = reconstruction_error(weight, grid.fake_quant(weight), x)
    assert gptq_error < 0.5 * rtn_error
    # What GPTQ optimised is exactly what the stored module computes.
    module = grid.to_module(result.codes, result.scales, result.minimums, None)
    assert isinstance(module, Int8Linear if grid.bits == 8 else Int4Linear)
    assert torch.equal(module.dequantize(), result.weight)


def test_hessian_accumulator_is_two_x_transpose_x_over_n():
    x = correlated_inputs(300, 16)
    acc = HessianAccumulator(16)
    for chunk in x.split(70):
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 * x.double().T @ x.double() / 300)


def test_gptq_model_quantizes_every_block_linear_and_keeps_the_loss():
    model, data = trained_tiny_model(), markov_tokens(32, seed=5)
    float_loss = token_loss(model, data)
    gptq_model(model, markov_tokens(16, seed=6), QuantGrid(8, None, True))
    slots = [getattr(block.attn, n) for block in model.layers for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    slots += [getattr(block.ffn, n) for block in model.layers for n in ("gate_proj", "up_proj", "down_proj")]
    assert all(isinstance(m, Int8Linear) for m in slots)
    assert token_loss(model, data) == pytest.approx(float_loss, rel=0.01)


def test_gptq_refuses_quantized_models_and_groups_that_do_not_divide():
    model = tiny_model()
    tokens = markov_tokens(4)
    with pytest.raises(LmstackError, match="group size 128 does not divide the layer.s 64 input"):
        gptq_model(model, tokens, QuantGrid(4, 128, False))
    gptq_model(model, tokens, QuantGrid(4, 32, False))
    with pytest.raises(LmstackError, match="already quantized"):
        gptq_model(model, tokens, QuantGrid(4, 32, False))


def test_too_small_calibration_text_is_a_clear_error():
    with pytest.raises(LmstackError, match=r"calib.txt has \d+ tokens but calibration needs 8,192"):
        calibration_tokens(tiny_tokenizer(), ["a short text"], 32, 256, source="calib.txt")


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow), "w8a8"])
def test_calibrated_quantize_cli_round_trips_through_the_quantized_model_dir(tmp_path, method):
    from lmstack.cli import main
    from lmstack.hub import load_model
    from lmstack.model.io import save_model_dir

    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=128)
    save_model_dir(model, tmp_path / "m", tok)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(["The harbour town woke slowly on winter mornings."] * 300), encoding="utf-8")
    out = tmp_path / method
    argv = ["quantize", "--model", str(tmp_path / "m"), "--method", method, "--out", str(out), "--calib", str(calib)]
    assert main([*argv, "--calib-samples", "4", "--calib-seq-len", "64"]) == 0
    loaded, _ = load_model(out)
    expected = {"gptq": Int4Linear, "awq": Int4Linear}.get(method)
    if expected is not None:
        assert isinstance(loaded.layers[0].attn.q_proj, expected)
    else:
        assert type(loaded.layers[0].attn.q_proj).__name__ == "W8A8Linear"
    data = torch.randint(tok.vocab_size, (2, 16))
    with torch.no_grad():
        float_logits, quant_logits = model(data).logits, loaded(data).logits
    assert torch.nn.functional.cosine_similarity(float_logits.flatten(), quant_logits.flatten(), dim=0) > 0.98
    assert main(["quantize", "--model", str(out), "--method", method, "--out", str(tmp_path / "again")]) == 2
