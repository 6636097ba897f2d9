"""Pruning: exact sparsity patterns per layer, structured shapes, recovery, CLI output is a model reference."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.cli import main
from lmstack.compress.prune import is_two_four, layer_sparsity, named_block_linears, prune_model
from lmstack.errors import LmstackError
from lmstack.eval import evaluate
from lmstack.model.io import save_model_dir
from tests.eval.tiny import markov_tokens, tiny_model, tiny_tokenizer, token_loss, trained_tiny_model


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_methods_hit_the_requested_sparsity_in_every_layer(method):
    model, report = prune_model(trained_tiny_model(), method, 0.3, markov_tokens(8))
    for name, linear in named_block_linears(model).items():
        if method == "wanda":  # per output row
            assert torch.all((linear.weight == 0).sum(1) == int(0.3 * linear.in_features))
        assert report.layers[name] == pytest.approx(int(0.3 * linear.weight.numel()) / linear.weight.numel(), abs=0.01)
    assert report.overall == pytest.approx(0.3, abs=0.01)


def test_global_magnitude_uses_one_threshold():
    model, report = prune_model(trained_tiny_model(), "magnitude", 0.5, scope="global")
    survivors = torch.cat([lin.weight[lin.weight != 0].abs() for lin in named_block_linears(model).values()])
    pruned_max = 0.0
    original = trained_tiny_model()
    for name, lin in named_block_linears(original).items():
        removed = named_block_linears(model)[name].weight == 0
        pruned_max = max(pruned_max, float(lin.weight.detach()[removed].abs().max()))
    assert pruned_max <= float(survivors.min())
    assert report.overall == pytest.approx(0.5, abs=0.001)
    assert len(set(round(v, 2) for v in report.layers.values())) > 1  # layers differ under a global threshold


def test_two_four_pattern_is_exact_and_wanda_beats_magnitude():
    data = markov_tokens(32, seed=5)
    model, report = prune_model(trained_tiny_model(), "2:4", 0.5)
    assert all(is_two_four(lin.weight) for lin in named_block_linears(model).values())
    assert all(v == pytest.approx(0.5) for v in report.layers.values())
    wanda, _ = prune_model(trained_tiny_model(), "wanda", 0.5, markov_tokens(16, seed=6))
    magnitude, _ = prune_model(trained_tiny_model(), "magnitude", 0.5)
    assert token_loss(wanda, data) < token_loss(magnitude, data)


@pytest.mark.parametrize(
    ("method", "field", "expected"), [("heads", "n_kv_head", 1), ("channels", "d_ff", 64), ("layers", "n_layer", 1)]
)
def test_structured_pruning_shrinks_shapes_and_recovery_lowers_the_loss(method, field, expected):
    data = markov_tokens(64, seed=7)
    model, report = prune_model(trained_tiny_model(), method, 0.5, data, recovery_steps=15, recovery_lr=1e-3)
    assert getattr(model.cfg, field) == expected
    assert model.cfg.n_head % model.cfg.n_kv_head == 0
    assert report.params_after < report.params_before
    unrecovered, _ = prune_model(trained_tiny_model(), method, 0.5, data, recovery_steps=0)
    assert token_loss(model, data) < token_loss(unrecovered, data)
    assert len(report.recovery_losses) == 15
    with torch.no_grad():
        assert model(data[:2]).logits.shape == (2, data.shape[1], model.cfg.vocab_size)


def test_bad_sparsity_is_a_clear_error():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(LmstackError, match=r"--sparsity must be in \[0, 1\)"):
            prune_model(tiny_model(), "magnitude", bad)
    with pytest.raises(LmstackError, match="2:4 pruning removes exactly half"):
        prune_model(tiny_model(), "2:4", 0.3)
    with pytest.raises(LmstackError, match="unknown pruning method"):
        prune_model(tiny_model(), "random", 0.3)


def test_prune_cli_writes_a_model_reference_eval_accepts(tmp_path, capsys):
    tok = tiny_tokenizer()
    save_model_dir(tiny_model(vocab_size=tok.vocab_size, max_seq_len=128), tmp_path / "m", tok)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(["The harbour town woke slowly on winter mornings."] * 400), encoding="utf-8")
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tmp_path / "m"), "--method", "wanda", "--sparsity", "0.4", "--out", str(out)]
    assert main([*argv, "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "64"]) == 0
    assert "overall 0.39" in capsys.readouterr().out  # floor(0.4 * 64) = 25 of every 64-weight row
    assert json.loads((out / "config.json").read_text())["pruning"]["method"] == "wanda"
    from lmstack.hub import load_model

    pruned, _ = load_model(out)
    assert all(v == pytest.approx(0.4, abs=0.01) for v in layer_sparsity(pruned).values())
    assert "ppl" in evaluate(str(out), ["ppl"], device="cpu")
    assert main([*argv[:-4], "--sparsity", "1", "--out", str(out)]) == 2
    calib.write_text("too short", encoding="utf-8")
    assert main([*argv, "--calib", str(calib)]) == 2
    assert "calibration needs" in capsys.readouterr().err
