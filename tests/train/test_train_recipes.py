"""Every shipped recipe loads strictly; the CPU-sized ones train a couple of steps."""

from __future__ import annotations

import math
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
    """A few steps of each CPU recipe, as shipped apart from size: the model already beats guessing."""
    recipe = Path(__file__).parents[2] / "recipes" / f"{name}.yaml"
    overrides = [
        "model.vocab_size=1024",  # the session tokenizer's: log(V) is then the loss of uniform guessing
        "max_steps=16",
        "warmup_steps=4",
        "batch_size=4",
        "seq_len=64",
        "eval_batches=2",
        "sample_tokens=4",
        f"data={token_data_dir}",
        f"out={tmp_path}",
        "tensorboard=false",
    ]
    cfg = load_train_config(recipe, overrides)
    summary = pretrain(cfg)
    uniform = math.log(cfg.model.vocab_size)  # the loss of a model that predicts every token alike
    print(f"{name}: val loss {summary['val_loss']:.3f} after 16 steps vs log(V) {uniform:.3f}")
    assert summary["steps"] == 16 and math.isfinite(summary["val_loss"])
    assert summary["val_loss"] < uniform - 0.3, (summary["val_loss"], uniform)
