"""A tiny model learns real text, the run folder holds its artifacts, MoE balancing works."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tiny_run import tiny_config

from lmstack.config import TrainConfig, load_train_config
from lmstack.errors import LmstackError
from lmstack.model.io import load_model_dir
from lmstack.train.pretrain import pretrain


def _cfg(out, data, *extra: str) -> TrainConfig:
    return tiny_config(
        out,
        data,
        "batch_size=8",
        "seq_len=64",
        "warmup_steps=10",
        "lr=1e-2",
        "eval_batches=8",
        "log_every=10",
        "sample_prompt=Return the",
        "sample_tokens=16",
        *extra,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, token_data_dir):
    out = tmp_path_factory.mktemp("run")
    summary = pretrain(_cfg(out, token_data_dir, "max_steps=150", "eval_every=75"))
    return out, summary


def test_tiny_model_beats_the_unigram_baseline(trained_run, token_data_dir, unigram_baseline):
    _, summary = trained_run
    baseline = unigram_baseline(token_data_dir)
    print(f"val loss {summary['val_loss']:.3f} vs unigram baseline {baseline:.3f}")
    assert summary["val_loss"] < baseline - 0.3, (summary["val_loss"], baseline)
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert 0 < summary["val_bpb"] < 8


def test_run_folder_artifacts(trained_run):
    out, summary = trained_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(10, 151, 10))
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "tokens"} <= set(train[0])
    assert [r["step"] for r in evals] == [75, 150] and all("val_bpb" in r and "val_ppl" in r for r in evals)
    assert evals[-1]["prompt"] == "Return the" and isinstance(evals[-1]["sample"], str)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report and "Return the" in report and "val loss" in report
    assert "max_steps: 150" in (out / "config.yaml").read_text()
    assert any((out / "tb").iterdir())
    model, tok = load_model_dir(out / "checkpoint")
    assert model.cfg.vocab_size == 1024 and tok is not None
    from lmstack.engine.generate import generate_text

    assert isinstance(generate_text(model, tok, "The", max_new_tokens=5, seed=0), str)
    assert summary["checkpoint"] == str(out / "checkpoint") and summary["tokens"] == 150 * 8 * 64


def test_moe_logs_aux_loss_and_balancing_pushes_towards_uniform(tmp_path, token_data_dir, capsys):
    moe = [
        "model.n_experts=4",
        "model.n_experts_per_tok=1",
        "model.moe_d_ff=64",
        "max_steps=30",
        "log_every=5",
        "eval_every=30",
        "lr=5e-3",
        "warmup_steps=2",
        "sample_tokens=4",
    ]

    def spread(run, coef: float) -> tuple[list[float], float]:
        pretrain(_cfg(run, token_data_dir, *moe, f"model.moe_aux_loss_coef={coef}"))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logs = [r for r in records if "aux_loss" in r]
        load = np.array(logs[-1]["expert_load"])  # (layers, experts), rows sum to 1
        assert load.shape == (2, 4) and np.allclose(load.sum(axis=1), 1.0, atol=1e-3)
        return [r["aux_loss"] for r in logs], float(np.abs(load - 0.25).max())

    aux_balanced, dev_balanced = spread(tmp_path / "balanced", 1.0)
    cfg = _cfg(tmp_path, token_data_dir, *moe).model
    start_line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("[train] llama model"))
    assert f"{cfg.num_params() / 1e6:.2f}M parameters" in start_line
    assert f"{cfg.active_params() / 1e6:.2f}M active per token" in start_line and "MFLOPs/token" in start_line
    aux_free, dev_free = spread(tmp_path / "free", 0.0)
    assert all(a >= 0.99 for a in aux_balanced)  # the Switch loss is >= 1, equal to 1 when uniform
    assert aux_balanced[-1] < aux_free[-1]
    assert dev_balanced < dev_free
    assert "MoE expert load" in (tmp_path / "balanced/report.html").read_text()


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(LmstackError, match="data directory .*does not exist.*lmstack data tokenize"):
        pretrain(_cfg(tmp_path / "run", tmp_path / "nope"))
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(LmstackError, match="no training data given"):
        pretrain(TrainConfig(out=str(tmp_path / "run")))


def test_model_too_small_for_the_data(tmp_path, token_data_dir):
    with pytest.raises(LmstackError, match="model.vocab_size=1024"):
        pretrain(_cfg(tmp_path, token_data_dir, "model.vocab_size=512"))
    with pytest.raises(LmstackError, match="seq_len=512 is longer"):
        pretrain(_cfg(tmp_path, token_data_dir, "seq_len=512", "model.max_seq_len=256"))


def test_data_smaller_than_one_batch(tmp_path, token_data_dir):
    with pytest.raises(LmstackError, match="val tokens, fewer than one seq_len=.*window per rank"):
        pretrain(_cfg(tmp_path, token_data_dir, "seq_len=16384", "model.max_seq_len=16384"))


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\nlearning_rte: 1e-3\n")
    with pytest.raises(LmstackError, match="unknown config key 'learning_rte'"):
        load_train_config(recipe, [])
