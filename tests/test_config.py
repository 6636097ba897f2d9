"""Recipe/override parsing: strict keys, preset + field overrides, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from lmstack.config import load_train_config
from lmstack.errors import LmstackError
from lmstack.utils.config_loader import build_dataclass, merge, parse_overrides
from lmstack.utils.device import resolve_dtype, torch_dtype


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


@dataclass
class _Inner:
    size: int = 1
    name: str = "a"


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    maybe: _Inner | None = None
    rate: float = 0.5


def test_the_generic_loader_builds_nested_dataclasses_strictly():
    cfg = build_dataclass(_Outer, {"inner": {"size": "3"}, "maybe": {"name": "b"}, "rate": "1e-2"})
    assert cfg == _Outer(_Inner(3, "a"), _Inner(1, "b"), 0.01)
    with pytest.raises(LmstackError, match="unknown config key 'inner.sise'; did you mean 'size'"):
        build_dataclass(_Outer, {"inner": {"sise": 2}})
    with pytest.raises(LmstackError, match="inner must be a mapping of _Inner fields"):
        build_dataclass(_Outer, {"inner": 5})


def test_a_name_refined_by_a_mapping_becomes_a_preset():
    assert merge({"model": "tiny"}, {"model": {"n_layer": 2}}) == {"model": {"preset": "tiny", "n_layer": 2}}
    assert load_train_config(None, ["model=tiny-gpt2", "model.n_layer=1"]).model.family == "gpt2"


def test_one_dtype_table_with_aliases_and_a_clear_error():
    assert torch_dtype("bf16") is torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("FP16") is torch.float16 and torch_dtype(None) is None
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    with pytest.raises(LmstackError, match="dtype 'int3' is not supported"):
        resolve_dtype("int3", torch.device("cpu"))
