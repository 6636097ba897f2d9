"""Distributed setup on PyTorch's own engine: torchrun env vars, process group, DDP / FSDP2 wrapping.

`torchrun --nproc-per-node N -m lmstack.cli train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
`lmstack train` has none and runs as a single process with no process group. Backend: nccl on CUDA,
gloo on CPU (so every parallel path runs, and is tested, on a laptop).

  ddp : `DistributedDataParallel`; gradients all-reduced (averaged) during backward.
  fsdp: FSDP2 `fully_shard` on each Transformer block, then on the root; parameters, gradients and
        optimizer state are sharded across ranks (DTensor) and all-gathered per block for compute.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmstack.errors import LmstackError


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the env:// variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0, or not under a launcher; known from the environment before the process group is joined,
    so what every rank prepares (data, models) is reported once."""
    return os.environ.get("RANK", "0") == "0"


def print_main(message: str) -> None:
    """A progress line on stderr from rank 0 only."""
    if is_main_process():
        print(message, file=sys.stderr)


def launch_local(nproc: int, cli_args: list[str]) -> int:
    """Run `lmstack <cli_args>` in `nproc` processes on this machine via torchrun; its exit status."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "lmstack.cli", *cli_args]
    return subprocess.run(cmd).returncode


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LmstackError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices on this node; "
                "lower --nproc-per-node to the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device)


def wrap_model(model: nn.Module, ctx: DistContext, parallel: str) -> nn.Module:
    """DDP or FSDP2 around `model` (already on ctx.device); unchanged when not distributed."""
    if not ctx.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside torch.compile and DDP wrappers (FSDP2 shards in place: no wrapper)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def grad_sync(model: nn.Module, ctx: DistContext, parallel: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-step of gradient accumulation."""
    if not ctx.enabled or sync:
        if ctx.enabled and parallel == "fsdp":
            unwrap(model).set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if parallel == "fsdp":
        unwrap(model).set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return getattr(model, "_orig_mod", model).no_sync()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few scalars over ranks (identity when single-process)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
