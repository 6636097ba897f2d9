"""Checkpoints and --resume: an interrupted and resumed run ends bit for bit where a straight run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_run import TINY_MODEL, interrupt_after, run_losses, tiny_config

from lmstack.config import TrainConfig
from lmstack.errors import LmstackError
from lmstack.model.io import load_model_dir
from lmstack.train.pretrain import pretrain


def _cfg(out, data, *extra: str) -> TrainConfig:
    return tiny_config(
        out,
        data,
        "batch_size=4",
        "seq_len=64",
        "max_steps=8",
        "warmup_steps=2",
        "eval_every=3",
        "eval_batches=2",
        "log_every=1",
        "save_every=100",
        "tensorboard=false",
        "sample_tokens=8",
        *extra,
    )


def _weights(run) -> dict[str, torch.Tensor]:
    model, _ = load_model_dir(run / "checkpoint")
    return model.state_dict()


@pytest.mark.parametrize("extra", [[], ["grad_accum=2", "model.dropout=0.1"]], ids=["plain", "accum2-dropout"])
def test_resumed_run_matches_straight_run(tmp_path, token_data_dir, extra, monkeypatch):
    straight = pretrain(_cfg(tmp_path / "straight", token_data_dir, *extra))
    with monkeypatch.context() as patch:
        interrupt_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C: the checkpoint of step 4 is saved, then re-raised
            pretrain(_cfg(tmp_path / "split", token_data_dir, *extra))
    assert json.loads((tmp_path / "split/checkpoint/trainer_state.json").read_text())["step"] == 4
    resumed = pretrain(_cfg(tmp_path / "split", token_data_dir, *extra), resume=True)
    assert resumed["steps"] == straight["steps"] == 8
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["train_loss"] == straight["train_loss"]
    assert resumed["val_loss"] == straight["val_loss"]
    assert run_losses(tmp_path / "straight") == run_losses(tmp_path / "split")  # the log continues, no duplicates
    opt_a = torch.load(tmp_path / "straight/checkpoint/optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "split/checkpoint/optimizer.pt", weights_only=True)
    assert all(
        torch.equal(opt_a["state"][k][s], opt_b["state"][k][s]) for k in opt_a["state"] for s in opt_a["state"][k]
    )


def test_resume_with_a_different_config_is_refused(tmp_path, token_data_dir):
    pretrain(_cfg(tmp_path, token_data_dir, "max_steps=2", "eval_every=100"))
    before = (tmp_path / "checkpoint/model.safetensors").read_bytes()
    with pytest.raises(LmstackError, match=r"cannot resume .*model.n_layer=2 \(config now says 3\)"):
        pretrain(_cfg(tmp_path, token_data_dir, "max_steps=4", "model.n_layer=3"), resume=True)
    with pytest.raises(LmstackError, match="global batch"):
        pretrain(_cfg(tmp_path, token_data_dir, "max_steps=4", "batch_size=8"), resume=True)
    assert (tmp_path / "checkpoint/model.safetensors").read_bytes() == before  # nothing lost
    # Free to change on resume: the step budget and the learning rate.
    summary = pretrain(_cfg(tmp_path, token_data_dir, "max_steps=3", "lr=1e-4"), resume=True)
    assert summary["steps"] == 3


def test_resume_without_checkpoint_and_overwrite_are_refused(tmp_path, token_data_dir):
    with pytest.raises(LmstackError, match="no checkpoint .* run without --resume"):
        pretrain(_cfg(tmp_path / "fresh", token_data_dir), resume=True)
    pretrain(_cfg(tmp_path / "run", token_data_dir, "max_steps=1"))
    with pytest.raises(LmstackError, match="already holds a checkpoint .*--resume"):
        pretrain(_cfg(tmp_path / "run", token_data_dir, "max_steps=1"))


def test_max_minutes_stops_and_saves(tmp_path, token_data_dir):
    summary = pretrain(_cfg(tmp_path, token_data_dir, "max_steps=100000", "max_minutes=0.02"))
    assert summary["stopped"] == "max_minutes" and 0 < summary["steps"] < 100000
    state = json.loads((tmp_path / "checkpoint/trainer_state.json").read_text())
    assert state["step"] == summary["steps"]
    assert summary["val_loss"] == summary["val_loss"]  # evaluated before stopping (not NaN)


def test_ctrl_c_saves_a_checkpoint_then_exits(tmp_path, token_data_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmstack.cli", "train", "--out", str(out), "--data", str(token_data_dir)]
    for item in [
        *TINY_MODEL,
        "batch_size=4",
        "seq_len=64",
        "max_steps=1000000",
        "eval_every=1000000",
        "log_every=1",
        "tensorboard=false",
    ]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted at step" in err and "--resume" in err
    state = json.loads((out / "checkpoint/trainer_state.json").read_text())
    assert state["step"] >= 3
    model, tok = load_model_dir(out / "checkpoint")
    assert tok is not None and model.cfg.n_layer == 2
    assert not any(p.name.startswith(".checkpoint") for p in out.iterdir())  # no half-written leftovers
    assert os.path.getsize(out / "checkpoint/optimizer.pt") > 0
