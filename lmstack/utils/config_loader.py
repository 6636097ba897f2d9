"""Building dataclasses from plain dicts (YAML recipes, `--set key=value` overrides), strictly.

Generic: it knows nothing about models or training. A key that does not exist is an error naming it
and suggesting the closest real key. A field whose type is a dataclass is built from a mapping; a
dataclass that accepts other spellings (a preset name, say) provides a classmethod
`from_config_value(value, key)` that the converter calls instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmstack.errors import LmstackError

# Names users bring from other tools, mapped to ours for the "did you mean" hint.
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "steps": "max_steps",
    "num_layers": "n_layer",
    "n_layers": "n_layer",
    "num_hidden_layers": "n_layer",
    "n_heads": "n_head",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_kv_head",
    "hidden_size": "d_model",
    "n_embd": "d_model",
    "intermediate_size": "d_ff",
    "block_size": "max_seq_len",
    "max_position_embeddings": "max_seq_len",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
}


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Instantiate dataclass `cls` from `values`, converting types and rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise LmstackError(unknown_key_message(key, list(fields), where))
        kwargs[key] = convert_value(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a field without default left unset
        raise LmstackError(f"incomplete {where or cls.__name__} config: {exc}") from None


def unknown_key_message(key: str, known: list[str], where: str) -> str:
    full = f"{where}.{key}" if where else key
    familiar = FAMILIAR_NAMES.get(key)
    close = [familiar] if familiar in known else difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown config key {full!r}{hint}"


def convert_value(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, with an error naming the key."""
    if dataclasses.is_dataclass(hint):
        return _convert_dataclass(value, hint, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return convert_value(value, args[0], key)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise LmstackError(f"config key {key!r} expects {hint.__name__}, got {value!r}") from None
    return value


def _convert_dataclass(value: Any, cls: type, key: str) -> Any:
    if isinstance(value, cls):
        return value
    custom = getattr(cls, "from_config_value", None)
    if custom is not None:
        return custom(value, key)
    if isinstance(value, dict):
        return build_dataclass(cls, value, key)
    raise LmstackError(f"{key} must be a mapping of {cls.__name__} fields, got {value!r}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["model.n_layer=4", "lr=1e-3"]` -> nested dict; values parsed as YAML scalars.

    Pairs apply in order with `merge` semantics, so `model=tiny model.vocab_size=512` means
    "preset tiny with vocab_size 512", and a later pair wins over an earlier one.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise LmstackError(f"override {pair!r} is not key=value; write e.g. --set lr=1e-3")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise LmstackError(f"override {pair!r} has an empty key part; write e.g. --set model.n_layer=4")
        value: Any = yaml.safe_load(raw) if raw else ""
        for part in reversed(parts[1:]):
            value = {part: value}
        out = merge(out, {parts[0]: value})
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into a copy of `base`.

    A name (string) refined by a mapping becomes that mapping plus `"preset": name`, so
    `model: tiny` followed by `model.n_layer=2` means "preset tiny with n_layer 2".
    """
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = merge(old, value)
        elif isinstance(value, dict) and isinstance(old, str):
            out[key] = {"preset": old, **value}
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"recipe file {str(path)!r} not found; pass an existing YAML file such as recipes/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LmstackError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise LmstackError(f"recipe {str(path)!r} must be a mapping of keys to values")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
