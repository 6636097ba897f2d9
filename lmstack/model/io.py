"""The lmstack model directory: `model.safetensors` + `config.json` (+ tokenizer files).

config.json: {"format": "lmstack", "version": ..., "model": {ModelConfig fields}, "dtype": "float32"}.
Tensor names are the module's own parameter names; a tied `lm_head.weight` is not stored twice.
Writes are atomic, so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmstack.config import ModelConfig
from lmstack.errors import LmstackError
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.utils.config_loader import build_dataclass
from lmstack.utils.io import atomic_path, atomic_write_text

FORMAT = "lmstack"


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip parameter init while building on the meta device: the values are replaced anyway, and
    torch's first `normal_` on a meta tensor imports its decompositions (~1 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def empty_model(cfg: ModelConfig) -> Transformer:
    """A `Transformer` on the meta device (no memory, no init), ready for `load_weights`."""
    with torch.device("meta"), _no_init():
        return Transformer(cfg)


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors by name, without the tied lm_head copy."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_model_dir(
    model: Transformer,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model_state(model)
    dtype = next(iter(state.values())).dtype
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "version": 1,
        "model": dataclasses.asdict(model.cfg),
        "dtype": str(dtype).removeprefix("torch."),
        **(extra or {}),
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)


def is_model_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except json.JSONDecodeError:
        return False


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise LmstackError(f"no config.json in {str(directory)!r}; pass a directory written by lmstack")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmstackError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if raw.get("format") != FORMAT:
        raise LmstackError(f"{path} was not written by lmstack")
    return build_dataclass(ModelConfig, raw["model"], "model")


def load_model_dir(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Build the model from config.json, load its weights, and the tokenizer when present."""
    directory = Path(directory)
    cfg = read_model_config(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise LmstackError(f"no model.safetensors in {str(directory)!r}; the checkpoint is incomplete")
    model = empty_model(cfg)
    load_weights(model, read_safetensors(weights))
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else None
    return model.eval(), tokenizer


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LmstackError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is corrupt") from None


def load_weights(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Assign tensors to a (possibly meta-device) model, checking names and shapes with clear errors."""
    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LmstackError(
            "checkpoint does not match the model config: "
            + (f"missing {missing[:4]}{'...' if len(missing) > 4 else ''} " if missing else "")
            + (f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}" if unexpected else "")
            + "; was it saved from a different config?"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LmstackError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but the config expects "
                f"{tuple(expected[name].shape)}; the checkpoint is from a different config"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model._rope_cache = None
