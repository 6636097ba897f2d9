"""Pretraining on CUDA: bf16 and fp16 autocast (GradScaler), torch.compile, resume. Marked `gpu`.

Run on a GPU machine with `python -m pytest -m gpu tests/train/test_train_cuda.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.config import load_train_config
from lmstack.train.pretrain import pretrain

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BASE = [
    "model.vocab_size=1024",
    "device=cuda",
    "batch_size=16",
    "seq_len=128",
    "max_steps=30",
    "eval_every=15",
    "log_every=5",
    "warmup_steps=5",
    "eval_batches=4",
    "sample_tokens=8",
    "tensorboard=false",
]


@pytest.mark.parametrize(
    "extra",
    [
        ["dtype=bfloat16"],
        ["dtype=float16"],
        ["dtype=bfloat16", "compile=true"],
        ["model.preset=moe-tiny", "dtype=bfloat16"],
    ],
    ids=["bf16", "fp16-gradscaler", "bf16-compile", "moe-bf16"],
)
def test_cuda_training_learns(extra, tmp_path, token_data_dir):
    summary = pretrain(load_train_config(None, [*extra, *BASE, f"data={token_data_dir}", f"out={tmp_path}"]))
    assert summary["steps"] == 30 and math.isfinite(summary["val_loss"])
    assert summary["val_loss"] < math.log(1024) - 0.5


def test_cuda_resume_continues_the_run(tmp_path, token_data_dir, monkeypatch):
    import signal

    from lmstack.train.pretrain import Trainer

    over = [*BASE, "dtype=bfloat16", f"data={token_data_dir}"]
    straight = pretrain(load_train_config(None, [*over, f"out={tmp_path / 'a'}"]))
    original = Trainer.train_step

    def step_then_signal(self):
        result = original(self)
        if self.step == 15:
            signal.raise_signal(signal.SIGINT)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", step_then_signal)
        with pytest.raises(KeyboardInterrupt):
            pretrain(load_train_config(None, [*over, f"out={tmp_path / 'b'}"]))
    resumed = pretrain(load_train_config(None, [*over, f"out={tmp_path / 'b'}"]), resume=True)
    assert resumed["steps"] == straight["steps"] == 30
    # CUDA attention backward may use atomics, so equal up to float noise rather than bit for bit.
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-3)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-3)
