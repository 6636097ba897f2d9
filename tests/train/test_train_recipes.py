"""Every shipped recipe loads strictly; the CPU-sized ones train a couple of steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.config import load_train_config
from lmstack.train.pretrain import pretrain

# The pretraining recipes (recipes/ also holds data-curation recipes, which are not TrainConfigs).
NAMES = ["tiny", "small", "gpt2-124m", "smollm2-135m", "qwen2.5-0.5b", "moe-tiny"]
RECIPES = [Path(__file__).parents[2] / "recipes" / f"{name}.yaml" for name in NAMES]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_says_how_to_run(recipe):
    cfg = load_train_config(recipe, [])
    assert cfg.seq_len <= cfg.model.max_seq_len
    header = recipe.read_text().split("\nmodel:")[0]
    assert header.startswith("#") and "lmstack" in header and "train" in header


@pytest.mark.parametrize("name", ["tiny", "moe-tiny"])
def test_cpu_recipes_train(name, tmp_path, token_data_dir):
    recipe = Path(__file__).parents[2] / "recipes" / f"{name}.yaml"
    overrides = [
        "max_steps=2",
        "batch_size=2",
        "seq_len=64",
        "eval_batches=1",
        "sample_tokens=4",
        f"data={token_data_dir}",
        f"out={tmp_path}",
        "tensorboard=false",
    ]
    summary = pretrain(load_train_config(recipe, overrides))
    assert summary["steps"] == 2 and summary["val_loss"] == summary["val_loss"]
