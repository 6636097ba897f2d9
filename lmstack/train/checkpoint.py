"""Training checkpoints: a normal model directory plus what resuming needs.

OUT/checkpoint/
  model.safetensors, config.json   the lmstack model format (lmstack.model.io): `--model OUT/checkpoint` works
  tokenizer.json, ...              copied from the data directory's tokenizer/
  optimizer.pt                     AdamW state, keyed by parameter name (torch.distributed.checkpoint
                                   `get_state_dict` with full_state_dict), so single-process, DDP and FSDP
                                   checkpoints are interchangeable
  rng.pt                           torch (and CUDA) RNG state of every rank (dropout)
  trainer_state.json               step, tokens seen, elapsed time, world size, the run's config

The LR schedule is a function of the step and the data sampler a function of (seed, step), so
step + weights + optimizer + RNG is the whole state: a resumed run is bit-for-bit the run that was
never interrupted. Under FSDP the sharded parameters and optimizer state are gathered to rank 0,
which writes the same single-file format.

Atomicity: files go to OUT/.checkpoint.partial/, which then replaces OUT/checkpoint by two renames
(the old one is parked at OUT/.checkpoint.old until the new one is in place). An interrupted save
leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.config import TrainConfig
from lmstack.errors import LmstackError
from lmstack.model.io import load_weights, read_safetensors, save_model_dir
from lmstack.model.transformer import Transformer
from lmstack.train.distributed import DistContext, barrier, gather_objects, unwrap
from lmstack.utils.config_loader import to_dict
from lmstack.utils.io import atomic_path, atomic_write_text

FORMAT = "lmstack-trainer-v1"
CHECKPOINT = "checkpoint"


def checkpoint_dir(out: str | Path) -> Path | None:
    """The run's checkpoint directory, or None. Falls back to the parked old one after a crashed swap."""
    out = Path(out)
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        if (out / name / "trainer_state.json").is_file():
            return out / name
    return None


def _state_options(cpu_offload: bool):
    # torch.distributed.checkpoint takes ~3 s to import; only saving and resuming need it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(
    out: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    tokenizer_dir: Path | None,
    write_model: Callable[[Path], None] | None = None,
) -> Path:
    """Collective under torchrun (every rank calls it); rank 0 writes. Returns the checkpoint path.

    write_model(dir): writes the model part instead of the full lmstack model directory (fine-tuning
    writes an adapter directory there).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    inner = unwrap(model)
    model_sd, optim_sd = get_state_dict(inner, optimizer, options=_state_options(ctx.enabled))
    rng = gather_objects(_rng_state(ctx.device), ctx)
    out = Path(out)
    final = out / CHECKPOINT
    if ctx.is_main:
        partial, old = out / f".{CHECKPOINT}.partial", out / f".{CHECKPOINT}.old"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if write_model is not None:
            write_model(partial)
        else:
            # Rebuild a plain model on the meta device around the gathered CPU tensors (no copy), so the
            # one writer of the model format (lmstack.model.io) writes it whatever the parallelism.
            with torch.device("meta"):
                plain = Transformer(inner.cfg)
            if inner.cfg.tie_embeddings:
                model_sd.pop("lm_head.weight", None)
            load_weights(plain, {k: v.detach().cpu() for k, v in model_sd.items()})
            save_model_dir(plain, partial)
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            for f in tokenizer_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, partial / f.name)
        with atomic_path(partial / "optimizer.pt") as tmp:
            torch.save(optim_sd, tmp)
        with atomic_path(partial / "rng.pt") as tmp:
            torch.save(rng, tmp)
        atomic_write_text(partial / "trainer_state.json", json.dumps({"format": FORMAT, **trainer_state}, indent=2))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmstackError(f"{path} is unreadable ({exc}); the checkpoint is corrupt, start a new --out") from None
    if state.get("format") != FORMAT:
        raise LmstackError(f"{path} is not an lmstack training checkpoint")
    return state


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_resumable(state: dict[str, Any], cfg: TrainConfig, world_size: int, ckpt: Path) -> None:
    """A checkpoint continues only the same model on the same data stream; anything else is an error.

    What must match: every model field, seq_len, seed, and the global batch (batch_size * grad_accum
    * world size: the sampler's layout). Free to change: max_steps, lr and schedule, eval/log/save
    cadence, threads, compile, and how the global batch is split over processes.
    """
    saved = state.get("config", {})
    now = to_dict(cfg)
    diffs = []
    for key in ("model", "seq_len", "seed"):
        a, b = _flatten({key: saved.get(key)}), _flatten({key: now[key]})
        diffs += [
            f"{k}={a.get(k)!r} (config now says {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        ]
    saved_batch = state.get("global_batch")
    batch = cfg.batch_size * cfg.grad_accum * world_size
    if saved_batch != batch:
        diffs.append(
            f"global batch batch_size*grad_accum*world_size={saved_batch} "
            f"(now {cfg.batch_size}*{cfg.grad_accum}"
            f"*{world_size}={batch})"
        )
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise LmstackError(
            f"cannot resume {ckpt}: it was trained with {shown}. Resume with the run's own settings "
            f"(see {ckpt.parent / 'config.yaml'}) or start a new run with a different --out"
        )


def load_model_weights(model: nn.Module, ckpt: Path) -> None:
    """Load the checkpoint's weights into an unwrapped model (before DDP/FSDP wrapping)."""
    load_weights(model, read_safetensors(ckpt / "model.safetensors"))


def load_optimizer_and_rng(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, ctx: DistContext) -> None:
    """Restore the optimizer (sharding it again under FSDP) and this rank's RNG state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    try:
        optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise LmstackError(
            f"cannot read the optimizer/RNG state in {ckpt} ({exc}); the checkpoint is corrupt"
        ) from None
    set_optimizer_state_dict(unwrap(model), optimizer, optim_sd, options=_state_options(False))
    if ctx.rank < len(rng):  # a different process count keeps the fresh RNG of the new ranks
        torch.set_rng_state(rng[ctx.rank]["torch"])
        if ctx.device.type == "cuda" and "cuda" in rng[ctx.rank]:
            torch.cuda.set_rng_state(rng[ctx.rank]["cuda"], ctx.device)
