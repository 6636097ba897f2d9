"""The small training config the trainer tests share: a 2-layer `tiny` model over the session's shards."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from lmstack.config import TrainConfig, load_train_config

TINY_MODEL = ["model.preset=tiny", "model.vocab_size=1024", "model.n_layer=2", "model.d_model=64", "model.d_ff=128"]


def tiny_config(out: Path, data: Path, *settings: str) -> TrainConfig:
    return load_train_config(None, [*TINY_MODEL, f"data={data}", f"out={out}", *settings])


def run_losses(run: Path) -> dict[int, float]:
    """Training loss per logged step from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def interrupt_after(monkeypatch, stop_step: int) -> None:
    """A real SIGINT right after optimizer step `stop_step` (the trainer saves that step, then re-raises)."""
    from lmstack.train.pretrain import Trainer

    original = Trainer.train_step

    def step_then_signal(self):
        result = original(self)
        if self.step == stop_step:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
