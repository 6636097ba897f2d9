"""The pretraining loop: `lmstack train --recipe recipes/tiny.yaml --data DIR --out runs/NAME`.

One step: for each of `grad_accum` micro-batches, forward under autocast (bf16/fp16 when asked),
backward of loss / grad_accum (gradient all-reduce only on the last micro-batch under DDP/FSDP);
then unscale (fp16 GradScaler on CUDA), clip the global gradient norm, AdamW step at the schedule's
learning rate for this step, zero the gradients.

Around it: periodic validation (loss, perplexity, bits per byte) with a sample printed, metrics to
the run folder (see lmstack.track), checkpoints (lmstack.train.checkpoint) every `save_every`
steps, at the end, at `max_minutes`, and on Ctrl-C / SIGTERM. A signal only sets a flag; the loop
stops at the next step boundary (all ranks agree on it), saves, and re-raises KeyboardInterrupt,
so the checkpoint is always a clean step boundary and `--resume` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmstack.config import TrainConfig
from lmstack.data.shards import load_meta, load_split
from lmstack.engine.generate import SamplingParams, generate_tokens
from lmstack.errors import LmstackError
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.track import RunTracker, measure_peak_flops
from lmstack.train import checkpoint as ckpt_io
from lmstack.train.data import TrainBatches, check_data_fits, val_batches
from lmstack.train.distributed import (
    DistContext,
    all_reduce_sum,
    cleanup,
    grad_sync,
    init_distributed,
    unwrap,
    wrap_model,
)
from lmstack.train.optim import build_optimizer, lr_at, set_lr
from lmstack.utils.config_loader import to_dict
from lmstack.utils.device import DTYPES, resolve_device


def pretrain(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train `cfg.model` on the token shards in `cfg.data`; write the run folder `cfg.out`.

    Returns a summary: steps, tokens, train_loss, val_loss, val_ppl, val_bpb, tokens_per_s, mfu,
    elapsed_s, run_dir, checkpoint, stopped ("max_steps" | "max_minutes").
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = _open_data(cfg)
    ckpt = _checkpoint_to_resume(cfg, resume)
    ctx = init_distributed(device)
    try:
        return Trainer(cfg, ctx, data, ckpt).run()
    finally:
        cleanup(ctx)


def preflight(cfg: TrainConfig, resume: bool, world_size: int) -> None:
    """What a launcher checks before it starts `world_size` processes, so a bad run fails once, early."""
    data = _open_data(cfg)
    check_data_fits(len(data.train), len(data.val), cfg.batch_size, cfg.seq_len, world_size, cfg.data)
    _checkpoint_to_resume(cfg, resume)


def _checkpoint_to_resume(cfg: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint `--resume` continues; refuses a missing one, and overwriting one without --resume."""
    out = Path(cfg.out)
    ckpt = ckpt_io.checkpoint_dir(out)
    if resume and ckpt is None:
        raise LmstackError(f"--resume: no checkpoint in {out}/checkpoint to continue; run without --resume")
    if not resume and ckpt is not None:
        step = ckpt_io.read_trainer_state(ckpt).get("step", "?")
        raise LmstackError(
            f"{out} already holds a checkpoint (step {step}); pass --resume to continue it or choose a new --out"
        )
    return ckpt if resume else None


@dataclass
class PretrainData:
    """A token-shard directory opened for training: its meta.json, both splits (memory-mapped), the tokenizer."""

    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray
    tokenizer_dir: Path | None  # None when the shards were written without a tokenizer copy

    def val_bits_per_byte(self, loss: float) -> float:
        """Mean loss (nats/token) over the val split -> bits per UTF-8 byte of its text (nan if unknown)."""
        val = self.meta["splits"]["val"]
        return loss * val["tokens"] / (math.log(2) * val["bytes"]) if val.get("bytes") else float("nan")


def _open_data(cfg: TrainConfig) -> PretrainData:
    if not cfg.data:
        raise LmstackError("no training data given; pass --data DIR (a directory from `lmstack data tokenize`)")
    if not Path(cfg.data).is_dir():
        raise LmstackError(
            f"data directory {cfg.data!r} does not exist; create it with "
            "`lmstack data tokenize --input TEXT --tokenizer DIR --out DIR` or fix --data"
        )
    meta = load_meta(cfg.data)
    model = cfg.model
    if meta["vocab_size"] > model.vocab_size:
        raise LmstackError(
            f"the data's tokenizer has {meta['vocab_size']:,} tokens "
            f"but model.vocab_size is {model.vocab_size:,}; "
            f"set --set model.vocab_size={meta['vocab_size']}"
        )
    if cfg.seq_len > model.max_seq_len:
        raise LmstackError(
            f"seq_len={cfg.seq_len} is longer than the model's context "
            f"model.max_seq_len={model.max_seq_len}; "
            "lower seq_len or raise model.max_seq_len"
        )
    tok_dir = Path(cfg.data) / meta.get("tokenizer", "tokenizer")
    return PretrainData(
        meta=meta,
        train=load_split(cfg.data, "train"),
        val=load_split(cfg.data, "val"),
        tokenizer_dir=tok_dir if (tok_dir / "tokenizer.json").is_file() else None,
    )


def tune_cpu_allocator() -> None:
    """Keep freed activation memory in glibc's heap instead of returning it to the OS every step.

    By default glibc serves large blocks with mmap and unmaps them on free, so each training step
    page-faults (and the kernel zeroes) hundreds of MB of activations afresh. Raising the mmap and
    trim thresholds makes steps reuse the memory: +10% tokens/s for the tiny model on 2 cores.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


_VAL_KEYS = ("val_loss", "val_ppl", "val_bpb")  # what every evaluate returns


def _every(step: int, period: int) -> bool:
    """True every `period` steps; a period of 0 means never (the end of the run still logs/evals/saves)."""
    return period > 0 and step % period == 0


class _StopFlag:
    """SIGINT/SIGTERM set a flag; a second signal interrupts at once (the default behaviour)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(
            "\n[train] stopping after this step and saving a checkpoint (signal again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _LogWindow:
    """The steps since the last log line: losses summed on the device (no host sync per step) and the
    wall time they took. Evaluation and checkpoint time is not training time: `restart_clock` after them."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.aux: torch.Tensor | None = None
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, lm: torch.Tensor, aux: torch.Tensor | None) -> None:
        self.loss += lm
        if aux is not None:
            self.aux = aux if self.aux is None else self.aux + aux
        self.steps += 1

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def reset(self) -> None:
        self.loss.zero_()
        self.aux, self.steps = None, 0
        self.restart_clock()


@dataclass(frozen=True)
class _StepBoundary:
    """What happens after optimizer step `step`, agreed by every rank so all take the same collective
    path (eval, save) here: `final` (max_steps reached), a stop signal, or the time budget spent."""

    step: int
    final: bool
    interrupted: bool
    timed_out: bool

    @property
    def ends_run(self) -> bool:
        return self.final or self.interrupted or self.timed_out


class Trainer:
    """The pretraining engine: one model, its optimizer and data, stepped from `step` to `cfg.max_steps`.

    `run()` trains, logging every `log_every` steps, evaluating (and sampling) every `eval_every`,
    saving every `save_every` and at the end, and stopping cleanly on a signal or the time budget.
    The same object runs under torchrun (DDP or FSDP2 through `ctx`). Subclasses (fine-tuning) replace
    the hooks `check_data`, `build_model`, `build_batches`, `forward_micro`, `evaluate`, `sample` and
    `save`; the step and the loop stay one.
    """

    def __init__(self, cfg: TrainConfig, ctx: DistContext, data: PretrainData, resume_from: Path | None):
        self.cfg, self.ctx, self.data = cfg, ctx, data
        self.out = Path(cfg.out)
        self.device = ctx.device
        self.check_data()
        self.global_batch = cfg.batch_size * cfg.grad_accum * ctx.world_size
        self.tokens_per_step = self.global_batch * cfg.seq_len
        state: dict[str, Any] = {}
        if resume_from is not None:
            state = ckpt_io.read_trainer_state(resume_from)
            ckpt_io.check_resumable(state, cfg, ctx.world_size, resume_from)
        self.step = int(state.get("step", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.device.type == "cpu":
            tune_cpu_allocator()
        elif self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = wrap_model(self.build_model(resume_from).to(self.device), ctx, cfg.parallel)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        torch.manual_seed(cfg.seed + 1 + ctx.rank)  # dropout masks differ between ranks
        if resume_from is not None:
            ckpt_io.load_optimizer_and_rng(self.model, self.optimizer, resume_from, ctx)

        self.amp_dtype = DTYPES[cfg.dtype]
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )
        self.batches = self.build_batches()
        self.flops_per_token = self.model_flops_per_token()
        self.peak_flops = measure_peak_flops(self.device, self.amp_dtype)
        self.tracker = RunTracker(
            self.out,
            to_dict(cfg),
            enabled=ctx.is_main,
            tensorboard=cfg.tensorboard,
            resume_step=self.step if resume_from is not None else None,
        )
        self.last: dict[str, Any] = dict(state.get("last", {}))  # latest logged metrics
        if ctx.is_main:
            print(self._describe(), file=sys.stderr)
        if ctx.is_main and resume_from is not None:
            print(f"[train] resuming {resume_from} at step {self.step}", file=sys.stderr)

    # -- what subclasses (SFT) replace: the data, the model, one micro-batch's forward ----------------
    def check_data(self) -> None:
        cfg, data = self.cfg, self.data
        check_data_fits(len(data.train), len(data.val), cfg.batch_size, cfg.seq_len, self.ctx.world_size, cfg.data)

    def build_model(self, resume_from: Path | None) -> torch.nn.Module:
        model = Transformer(self.cfg.model)
        if resume_from is not None:
            ckpt_io.load_model_weights(model, resume_from)
        return model

    def build_batches(self) -> Any:
        cfg, ctx = self.cfg, self.ctx
        return TrainBatches(
            self.data.train, cfg.batch_size, cfg.seq_len, cfg.grad_accum, cfg.seed, ctx.rank, ctx.world_size
        )

    def forward_micro(self, step: int, micro: int) -> Any:
        """The model output (with .loss, .lm_loss, .aux_loss) for micro-batch `micro` of optimizer step `step`."""
        x, y = self.batches.get(step, micro)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return self.model(x, y, label_smoothing=self.cfg.label_smoothing)

    def model_flops_per_token(self) -> float:
        """Training FLOPs per token of the model being trained (for MFU)."""
        return self.cfg.model.flops_per_token(self.cfg.seq_len)

    def after_optimizer_step(self) -> None:
        """Runs after each optimizer step while the gradients are still there (AdaLoRA's rank allocation)."""

    def _describe(self) -> str:
        """One line saying what is about to train: size, cost per token, batch, where and how."""
        cfg, m = self.cfg, self.cfg.model
        moe = f", {m.active_params() / 1e6:.2f}M active per token" if m.is_moe else ""
        return (
            f"[train] {m.family} model: {m.num_params() / 1e6:.2f}M parameters "
            f"({m.num_params(include_embeddings=False) / 1e6:.2f}M without embeddings{moe}), "
            f"{self.flops_per_token / 1e6:,.1f} MFLOPs/token (training); "
            f"global batch {self.global_batch} x {cfg.seq_len} = {self.tokens_per_step:,} tokens/step; "
            f"{self.ctx.world_size} process(es) on {self.device.type}"
            f"{f' ({cfg.parallel})' if self.ctx.world_size > 1 else ''}, {cfg.dtype}"
        )

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (mean lm loss, mean aux loss or None, grad norm) as device tensors (no sync)."""
        cfg, model = self.cfg, self.model
        set_lr(self.optimizer, lr_at(self.step, cfg))
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = None
        for micro in range(cfg.grad_accum):
            with grad_sync(model, self.ctx, cfg.parallel, micro == cfg.grad_accum - 1):
                with self.autocast:
                    out = self.forward_micro(self.step, micro)
                self.scaler.scale(out.loss / cfg.grad_accum).backward()
            lm_sum += out.lm_loss.detach()
            if out.aux_loss is not None:
                aux = out.aux_loss.detach().float()
                aux_sum = aux if aux_sum is None else aux_sum + aux
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        n = cfg.grad_accum
        return lm_sum / n, (aux_sum / n if aux_sum is not None else None), grad_norm

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x, y in val_batches(self.data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches, ctx.rank, ctx.world_size):
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast:
                out = self.model(x, y)
            total += out.lm_loss.double() * y.numel()
            count += y.numel()
        self.model.train()
        total_sum, count_sum = all_reduce_sum([float(total), float(count)], ctx)
        loss = total_sum / count_sum
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": self.data.val_bits_per_byte(loss)}

    def sample(self) -> tuple[str, str] | None:
        """A continuation of `sample_prompt` (or of a document start) from the current weights."""
        if self.data.tokenizer_dir is None:
            return None
        if self.ctx.enabled and self.cfg.parallel == "fsdp":
            collective = True  # sharded weights: every rank runs the same forwards, rank 0 prints
        else:
            collective = False
            if not self.ctx.is_main:
                return None
        tokenizer = Tokenizer.load(self.data.tokenizer_dir)
        prompt = self.cfg.sample_prompt
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
        model = unwrap(self.model)
        model.eval()
        params = SamplingParams(max_new_tokens=self.cfg.sample_tokens, temperature=0.8, top_k=50, seed=self.step)
        with self.autocast:
            new = list(generate_tokens(model, ids, params, stop_ids=tokenizer.stop_ids))
        model.train()
        if collective and not self.ctx.is_main:
            return None
        return prompt, tokenizer.decode(new)

    def expert_load(self) -> list[list[float]] | None:
        loads = [
            block.ffn.last_expert_load.tolist()
            for block in unwrap(self.model).layers
            if getattr(block.ffn, "last_expert_load", None) is not None
        ]
        return [[round(v, 4) for v in row] for row in loads] or None

    # -- the loop ----------------------------------------------------------------------------------
    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for each `with`: one `torch.autocast` object entered twice (nested, as
        GRPO's rollouts inside a step are) saves the outer state over the inner one and leaves autocast
        switched on after both exit, for everything the process runs next."""
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def checkpoint_state(self) -> dict[str, Any]:
        """What every checkpoint records beside the weights and optimizer (subclasses save through this)."""
        return {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "elapsed_s": self.elapsed_before + (time.time() - self.started),
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "last": self.last,
            "config": to_dict(self.cfg),
        }

    def save(self) -> Path:
        state = self.checkpoint_state()
        return ckpt_io.save_checkpoint(self.out, self.model, self.optimizer, state, self.ctx, self.data.tokenizer_dir)

    def run(self) -> dict[str, Any]:
        """Train to `cfg.max_steps` (or a stop); returns the summary `pretrain` documents."""
        cfg, ctx = self.cfg, self.ctx
        self.started = time.time()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=None if ctx.is_main else True,
            dynamic_ncols=True,
        )
        window = _LogWindow(self.device)
        stopped = "max_steps"
        self.model.train()
        try:
            with _StopFlag() as stop:
                while self.step < cfg.max_steps:
                    lm, aux, grad_norm = self.train_step()
                    window.add(lm, aux)
                    bar.update(1)
                    at = self._step_boundary(stop)
                    self._after_step(at, window, grad_norm, bar)
                    if at.interrupted:
                        raise KeyboardInterrupt
                    if at.timed_out:
                        stopped = "max_minutes"
                        break
        except KeyboardInterrupt:
            bar.close()
            self._report_interrupt()
            self.tracker.close(self._summary("interrupted"))
            raise
        bar.close()
        summary = self._summary(stopped)
        self.tracker.close(summary)
        if ctx.is_main:
            s = summary
            bpb = "" if math.isnan(s["val_bpb"]) else f", {s['val_bpb']:.3f} bits/byte"  # nan: masked LM
            print(
                f"[train] {s['steps']} steps, {s['tokens']:,} tokens in {s['elapsed_s']:.0f}s: "
                f"train loss {s['train_loss']:.4f}, val loss {s['val_loss']:.4f} "
                f"(ppl {s['val_ppl']:.2f}{bpb}), "
                f"{s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.1f}% -> {self.out / 'checkpoint'}",
                file=sys.stderr,
            )
        return summary

    def _step_boundary(self, stop: _StopFlag) -> _StepBoundary:
        """The stop decision after a step: a signal or the time budget counts when any rank saw it
        (all-reduced), and neither counts on the final step, which ends the run anyway."""
        cfg = self.cfg
        final = self.step >= cfg.max_steps
        time_up = cfg.max_minutes > 0 and time.time() - self.started >= 60 * cfg.max_minutes
        flags = [float(stop.signal is not None), float(time_up)]
        interrupted, timed_out = (v > 0 for v in all_reduce_sum(flags, self.ctx))
        return _StepBoundary(self.step, final, interrupted and not final, timed_out and not final)

    def _after_step(self, at: _StepBoundary, window: _LogWindow, grad_norm: torch.Tensor, bar: tqdm) -> None:
        """Log, evaluate/sample and save as the schedule (and a stop) asks, in that order."""
        cfg = self.cfg
        if _every(at.step, cfg.log_every) or at.ends_run:
            self._log_window(at.step, window, grad_norm, bar)
        do_eval = _every(at.step, cfg.eval_every) or at.final or (at.timed_out and not at.interrupted)
        if do_eval or _every(at.step, cfg.sample_every):
            self._eval_and_sample(at.step, bar, do_eval=do_eval)
            window.restart_clock()
        if _every(at.step, cfg.save_every) or at.ends_run:
            self.save()
            window.restart_clock()

    def _log_window(self, step: int, window: _LogWindow, grad_norm: torch.Tensor, bar: tqdm) -> None:
        """One metrics line for the window's steps (mean loss over ranks, throughput, MFU), then reset it."""
        cfg, ctx = self.cfg, self.ctx
        elapsed = time.perf_counter() - window.start
        loss = all_reduce_sum([float(window.loss) / window.steps], ctx)[0] / ctx.world_size
        tps = window.steps * self.tokens_per_step / elapsed
        record = {
            "step": step,
            "tokens": step * self.tokens_per_step,
            "lr": lr_at(step - 1, cfg),
            "loss": loss,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / (self.peak_flops * ctx.world_size),
        }
        if window.aux is not None:
            record["aux_loss"] = float(window.aux) / window.steps
            record["expert_load"] = self.expert_load()
        self.tracker.log(record)
        self.last.update({k: record[k] for k in ("loss", "tokens_per_s", "mfu")})
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * record['mfu']:.1f}%")
        window.reset()

    def _report_interrupt(self) -> None:
        if not self.ctx.is_main:
            return
        # After the first signal the checkpoint is this step; after a second (abort) it is the last one
        # saved, since a half-done step is not a state worth resuming from.
        saved = ckpt_io.checkpoint_dir(self.out)
        at = ckpt_io.read_trainer_state(saved)["step"] if saved else None
        print(
            f"[train] interrupted at step {self.step}; "
            + (f"checkpoint of step {at} in {saved} (continue with --resume)" if saved else "no checkpoint"),
            file=sys.stderr,
        )

    def _eval_and_sample(self, step: int, bar, do_eval: bool) -> None:
        record: dict[str, Any] = {"step": step, "tokens": step * self.tokens_per_step}
        if do_eval:
            record.update(self.evaluate())
            self.last.update({k: record[k] for k in _VAL_KEYS})
        every = self.cfg.sample_every
        if (every == 0 and do_eval) or _every(step, every):
            sampled = self.sample()
            if sampled is not None:
                record["prompt"], record["sample"] = sampled
        if self.ctx.is_main:
            parts = [f"step {step}"]
            if do_eval:
                shown = [f"val loss {record['val_loss']:.4f}", f"ppl {record['val_ppl']:.2f}"]
                if not math.isnan(record["val_bpb"]):
                    shown.append(f"bpb {record['val_bpb']:.3f}")
                # What a subclass's evaluate adds (masked-LM accuracy, say) is shown too.
                extra = {k: v for k, v in record.items() if k.startswith("val_") and k not in _VAL_KEYS}
                shown += [f"{k.removeprefix('val_')} {v:.4f}" for k, v in extra.items() if isinstance(v, float)]
                parts.append(" | ".join(shown))
            bar.write(": ".join(parts), file=sys.stderr)
            if "sample" in record:
                bar.write(f"  sample: {record['prompt'] + record['sample']!r}"[:400], file=sys.stderr)
        self.tracker.log(record)

    def _summary(self, stopped: str) -> dict[str, Any]:
        last = self.last
        return {
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "train_loss": last.get("loss", float("nan")),
            "val_loss": last.get("val_loss", float("nan")),
            "val_ppl": last.get("val_ppl", float("nan")),
            "val_bpb": last.get("val_bpb", float("nan")),
            "tokens_per_s": last.get("tokens_per_s", 0.0),
            "mfu": last.get("mfu", 0.0),
            "elapsed_s": self.elapsed_before + (time.time() - self.started),
            "world_size": self.ctx.world_size,
            "run_dir": str(self.out),
            "checkpoint": str(self.out / "checkpoint"),
            "stopped": stopped,
        }
