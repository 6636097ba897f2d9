"""What the calibrated methods share: calibration tokens, a block-by-block runner, quantization grids,
and a short fine-tuning loop.

- Calibration text is a file (`--calib FILE`: .txt/.md paragraphs or .jsonl {"text": ...}) or, by
  default, the standard library's docstrings (real English prose every machine has; distinct from the
  held-out text `lmstack eval` scores, so calibration never sees the test text).
- `BlockRunner` feeds the calibration set through the model one Transformer block at a time, the way
  GPTQ/AWQ do it: each method observes a block's linear inputs (forward pre-hooks), rewrites the block,
  and the *rewritten* block produces the next block's inputs, so later layers calibrate against the
  errors earlier ones actually make. Only one block's activations are alive at a time.
- `QuantGrid` is the exact arithmetic of the stored formats (`Int8Linear`, `Int4Linear`): scales and
  minimums are rounded to float16 before codes are computed, so what GPTQ/AWQ/QAT optimise against is
  bit for bit what the saved module computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.compress.int4 import Int4Linear, pack_int4
from lmstack.compress.int8 import Int8Linear
from lmstack.errors import require
from lmstack.model.transformer import Block, Transformer
from lmstack.tokenizer import Tokenizer

LINEAR_SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- calibration data --------------------------------------------------------------------------------


def calibration_texts(path: str | Path | None = None) -> list[str]:
    """Documents to calibrate on: `path` (.txt/.md/.jsonl) or the built-in standard-library docstrings."""
    if path is None:
        from lmstack.data.builtin import stdlib_docstrings

        return list(stdlib_docstrings(max_bytes=400_000))
    from lmstack.eval.text import load_texts

    return load_texts(path)


def calibration_tokens(
    tokenizer: Tokenizer,
    texts: list[str],
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    source: str = "the calibration text",
) -> Tensor:
    """(n_samples, seq_len) token windows drawn without overlap from the concatenated documents.

    Too little text for n_samples distinct windows is an error: repeating windows would calibrate on
    fewer distinct activations than asked for, silently.
    """
    require(n_samples > 0 and seq_len > 1, f"need n_samples > 0 and seq_len > 1, got {n_samples}, {seq_len}")
    separator = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    stream: list[int] = []
    for ids in tokenizer.encode_batch(texts):
        stream += ids + ([separator] if separator is not None else [])
    needed = n_samples * seq_len
    require(
        len(stream) >= needed,
        f"{source} has {len(stream):,} tokens but calibration needs {needed:,} ({n_samples} samples x {seq_len} "
        "tokens); pass a larger --calib file or lower --calib-samples / --calib-seq-len",
    )
    windows = torch.tensor(stream[: (len(stream) // seq_len) * seq_len]).view(-1, seq_len)
    pick = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:n_samples]
    return windows[pick.sort().values]


# -- block-by-block runner ---------------------------------------------------------------------------


class BlockRunner:
    """Runs calibration tokens through `model` one block at a time (see the module docstring).

    runner = BlockRunner(model, tokens)
    for index, block in runner:
        with capture_inputs(linears_of(block), observe):
            runner.run_block()       # observe this block's linear inputs
        ...rewrite block...          # the loop then advances with the rewritten block
    """

    def __init__(self, model: Transformer, tokens: Tensor, batch_size: int = 8):
        self.model = model
        device = model.tok_emb.weight.device
        T = tokens.shape[1]
        positions = torch.arange(T, device=device)
        self.rope = model._rope(positions, T) if model.cfg.family == "llama" else None
        with torch.no_grad():
            self.hidden = [
                self._embed(tokens[i : i + batch_size].to(device), positions) for i in range(0, len(tokens), batch_size)
            ]
        self.current: Block | None = None

    def _embed(self, idx: Tensor, positions: Tensor) -> Tensor:
        x = self.model.tok_emb(idx)
        if self.model.cfg.family == "gpt2":
            x = x + self.model.pos_emb(positions)
        return x

    def run_block(self, block: Block | None = None) -> list[Tensor]:
        """Outputs of `block` (default: the current one) on every calibration batch."""
        block = block or self.current
        with torch.no_grad():
            return [block(h, self.rope, None, None)[0] for h in self.hidden]

    def __iter__(self) -> Iterator[tuple[int, Block]]:
        for index, block in enumerate(self.model.layers):
            self.current = block
            yield index, block
            self.hidden = self.run_block(block)


def linears_of(block: Block) -> dict[str, nn.Linear]:
    """The block's linear slots that hold plain nn.Linear modules, by slot name (MoE experts excluded)."""
    found = {}
    for owner in (block.attn, block.ffn):
        for slot in LINEAR_SLOTS:
            module = getattr(owner, slot, None)
            if isinstance(module, nn.Linear):
                found[slot] = module
    return found


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module], observe: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Call observe(name, x (tokens, in_features)) with every input each module receives."""
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: observe(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def set_slot(block: Block, slot: str, module: nn.Module) -> None:
    owner = block.attn if hasattr(block.attn, slot) else block.ffn
    setattr(owner, slot, module)


# -- quantization grids --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantGrid:
    """The value grid of a stored format. bits 8: symmetric int8 (`Int8Linear`); bits 4: `Int4Linear`,
    symmetric (w = s * (code - 8)) or asymmetric (w = s * code + min). group_size None: per output row."""

    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = False

    def __post_init__(self) -> None:
        require(self.bits in (4, 8), f"bits must be 4 or 8, got {self.bits}")
        require(self.bits == 4 or self.symmetric, "int8 is stored symmetric; use symmetric=True with bits=8")
        require(self.bits == 8 or self.group_size is not None, "int4 needs a group size (32, 64, 128 ...)")

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def params(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """Scale and minimum (None when symmetric) per row of a weight group w (out, g), as float16-rounded floats."""
        w = w.float()
        tiny = torch.finfo(torch.float16).tiny
        if self.bits == 8:
            return (w.abs().amax(dim=-1) / 127).half().float().clamp_min(tiny), None
        if self.symmetric:  # Q4_0's rule: the value of largest magnitude maps to code 0 (= -8)
            extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            scale = (extreme / -8).half().float()
            return torch.where(scale.abs() < tiny, torch.ones_like(scale), scale), None
        lo, hi = w.amin(dim=-1).clamp_max(0), w.amax(dim=-1).clamp_min(0)  # the grid always holds 0 exactly-ish
        return ((hi - lo) / 15).half().float().clamp_min(tiny), lo.half().float()

    def codes(self, w: Tensor, scale: Tensor, minimum: Tensor | None) -> Tensor:
        """Integer codes (as float) of w (out, ...) under per-row scale/minimum (broadcast on the last dim)."""
        if self.bits == 8:
            return torch.round(w / scale).clamp(-127, 127)
        if minimum is None:
            return (torch.round(w / scale) + 8).clamp(0, 15)
        return torch.round((w - minimum) / scale).clamp(0, 15)

    def values(self, codes: Tensor, scale: Tensor, minimum: Tensor | None) -> Tensor:
        if self.bits == 8:
            return codes * scale
        return scale * (codes - 8) if minimum is None else scale * codes + minimum

    def fake_quant(self, weight: Tensor) -> Tensor:
        """Round-to-nearest quantize-dequantize of a whole (out, in) weight."""
        out_features, in_features = weight.shape
        w = weight.float().reshape(out_features, -1, self.group(in_features))
        scale, minimum = self.params(w)
        scale = scale[..., None]
        minimum = None if minimum is None else minimum[..., None]
        return self.values(self.codes(w, scale, minimum), scale, minimum).reshape(out_features, in_features)

    def to_module(self, codes: Tensor, scales: Tensor, minimums: Tensor | None, bias: Tensor | None) -> nn.Module:
        """The stored module for codes (out, in) and per-group scales/minimums (out, groups)."""
        if self.bits == 8:
            return Int8Linear.from_quantized(codes.to(torch.int8), scales, bias)
        return Int4Linear(pack_int4(codes.to(torch.uint8)), scales, minimums, bias)

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        """Round-to-nearest: the stored module whose `dequantize()` equals `fake_quant(linear.weight)`."""
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        grouped = w.reshape(out_features, -1, self.group(in_features))
        scale, minimum = self.params(grouped)
        codes = self.codes(grouped, scale[..., None], None if minimum is None else minimum[..., None])
        return self.to_module(codes.reshape(out_features, in_features), scale, minimum, linear.bias)

    def describe(self) -> str:
        kind = "int8" if self.bits == 8 else f"int4 {'symmetric' if self.symmetric else 'asymmetric'}"
        return f"{kind}, group {self.group_size or 'per row'}"


# -- a short fine-tune (QAT, recovery after structured pruning) ---------------------------------------


def short_finetune(
    model: Transformer,
    tokens: Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """`steps` AdamW steps of next-token loss on random rows of `tokens` (N, T); returns the losses.

    Uses the pretraining loop's optimizer (decay groups) and warmup + cosine schedule from
    `lmstack.train.optim`; the model is trained in place, in whatever modules it holds (fake-quant
    wrappers for QAT, pruned shapes after structured pruning), without a run directory.
    """
    from lmstack.config import TrainConfig
    from lmstack.train.optim import build_optimizer, lr_at, set_lr

    require(steps > 0, f"fine-tuning needs at least one step, got {steps}")
    device = model.tok_emb.weight.device
    cfg = TrainConfig(lr=lr, min_lr_ratio=0.1, warmup_steps=max(1, steps // 10), max_steps=steps, weight_decay=0.0)
    optimizer = build_optimizer(model, cfg, device)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        set_lr(optimizer, lr_at(step, cfg))
        rows = tokens[torch.randint(len(tokens), (batch_size,), generator=generator)].to(device)
        logits = model(rows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses
