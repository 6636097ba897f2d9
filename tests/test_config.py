"""Recipe/override parsing: strict keys, preset + field overrides, clear errors."""

from __future__ import annotations

import pytest

from lmstack.config import load_train_config, parse_overrides
from lmstack.errors import LmstackError


def test_preset_then_field_override_keeps_the_preset():
    cfg = load_train_config(None, ["model=tiny", "model.vocab_size=512", "lr=3e-3"])
    assert cfg.model.vocab_size == 512
    assert cfg.model.n_layer == 4  # still the tiny preset
    assert cfg.lr == pytest.approx(3e-3)


def test_later_override_wins():
    assert parse_overrides(["lr=1", "lr=2"]) == {"lr": 2}
    assert parse_overrides(["model.n_layer=2", "model=small"]) == {"model": "small"}


def test_unknown_key_suggests_the_right_name():
    with pytest.raises(LmstackError, match="did you mean 'lr'"):
        load_train_config(None, ["learning_rate=1e-3"])
    with pytest.raises(LmstackError, match="did you mean 'n_layer'"):
        load_train_config(None, ["model=tiny", "model.num_hidden_layers=2"])


@pytest.mark.parametrize("bad", ["lr", "model..n_layer=2", "=3"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(LmstackError, match="override"):
        parse_overrides([bad])


def test_wrong_type_names_the_key():
    with pytest.raises(LmstackError, match="'max_steps' expects int"):
        load_train_config(None, ["max_steps=ten"])
