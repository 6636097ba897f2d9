"""The small training config the trainer tests share: a 2-layer `tiny` model over the session's shards."""

from __future__ import annotations

from pathlib import Path

from lmstack.config import TrainConfig, load_train_config

TINY_MODEL = ["model.preset=tiny", "model.vocab_size=1024", "model.n_layer=2", "model.d_model=64", "model.d_ff=128"]


def tiny_config(out: Path, data: Path, *settings: str) -> TrainConfig:
    return load_train_config(None, [*TINY_MODEL, f"data={data}", f"out={out}", *settings])
