"""Captured decode steps on the CPU: one token's forward replayed from C++ (what CUDA graphs do on GPUs).

A decode token of a small quantized model spends as long around its kernels as inside them: SmolLM2-135M
makes about 360 calls a token (norms, RoPE, attention, residual adds and 121 quantized matmuls), and
each pays for Python, the module calls and ATen's dispatch, about 5 ms of a 13 ms token on the 2-core
EPYC (docs/engine.md). The arithmetic of every step is the same each token; only the token, its
position and the cache length change.

So the first single-token step of a generation runs eagerly under a `StepRecorder`
(`lmstack.model.step_recorder`): each fused op reports what it read and returned, and becomes a C++
step that recomputes it into the same output tensor. The steps form a `DecodeProgram` (csrc/cpu_ops.cpp).
Every later token refills the step's inputs (the embedded token and its RoPE rows, made by the model's
own `Transformer.step_inputs`) and runs the program once, for its position, with no Python in between;
the logits land in the captured step's output tensor. The model definition is not copied: the program
is the list of calls the one `Transformer.forward` made.

Capture is checked twice before it is used: every tensor a step reads must be a model parameter or
buffer, the KV cache, a declared input or an earlier step's output (else some plain PyTorch op ran,
say an fp32 `nn.Linear`, an adapter, GPT-2's LayerNorm, and the generation stays eager), and one
replay of the captured token must give bit-identical logits. Replays are bit-identical to eager steps
(same kernels, same inputs, same thread split); `LMSTACK_CPU_GRAPH=0` turns capture off.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from lmstack.model import cpu_ops, step_recorder
from lmstack.model.transformer import KVCache, Transformer

ENV = "LMSTACK_CPU_GRAPH"
log = logging.getLogger(__name__)


class CapturedStep:
    """A recorded single-token decode step, replayed by `run` for each next token."""

    def __init__(self, program, inputs: list[Tensor], logits: Tensor):
        self.program = program
        self.inputs = inputs  # the buffers the program starts from: embedded tokens, cos rows, signed sin rows
        self.logits = logits  # (B, 1, vocab), overwritten by every run

    def run(self, x: Tensor, rope: tuple[Tensor, Tensor], position: int) -> Tensor:
        """Logits for the step whose first-block input and RoPE rows are `x`, `rope` (what
        `Transformer.step_inputs` makes) at cache position `position`. The tensor is the step's own
        output: read it before the next run."""
        for buffer, value in zip(self.inputs, (x, *rope), strict=True):
            buffer.copy_(value)
        self.program.run(position)
        return self.logits


def capture(
    forward: Callable[[], Tensor], constants: list[Tensor], position: int, fixed_inputs: tuple[Tensor, ...] = ()
) -> tuple[CapturedStep | None, Tensor]:
    """Run one single-token decode step, `forward()` -> logits, eagerly while recording it; return the
    captured step (None where it cannot be replayed) and the step's logits.

    constants: the tensors the replay may read as they are (parameters, buffers, the KV cache);
    position: the contiguous cache's length (the position where its attention stores k/v);
    fixed_inputs: tensors the caller refills in place before every replay (the engine's block tables).
    """
    recorder = step_recorder.StepRecorder(constants, position)
    recorder.note_inputs(fixed_inputs)
    with step_recorder.recording(recorder):
        logits = forward()
    if recorder.failure is None and not recorder.produced(logits):
        recorder.fail("the logits were not made by a recorded op")
    step_inputs = recorder.inputs[len(fixed_inputs) :]
    if recorder.failure is None and len(step_inputs) != 3:
        recorder.fail(f"the step declared {len(step_inputs)} inputs, not the tokens and two RoPE tables")
    if recorder.failure is not None:
        log.debug("decode step not captured: %s; it runs eagerly", recorder.failure)
        return None, logits
    program = cpu_ops.extension().DecodeProgram()
    for step in recorder.steps:
        program.append(step)
    eager = logits.clone()
    program.run(position)  # the same token again: stores the same k/v, must give the same logits
    if not torch.equal(eager, logits):
        warnings.warn(
            "lmstack: a captured decode step did not reproduce its eager logits; decoding stays eager "
            f"(set {ENV}=0 to skip the capture, and please report this)",
            stacklevel=2,
        )
        return None, eager
    return CapturedStep(program, step_inputs, logits), logits


def enabled(model: Transformer) -> bool:
    """Whether `model`'s decode steps may be captured at all: a RoPE model on the CPU in eval mode with
    gradients off, the fused ops built, and LMSTACK_CPU_GRAPH not 0."""
    return (
        os.environ.get(ENV, "1").strip() != "0"
        and model.cfg.family == "llama"
        and not model.training
        and not torch.is_grad_enabled()
        and model.tok_emb.weight.is_cpu
        and cpu_ops.extension() is not None
    )


def can_capture(model: Transformer, cache) -> bool:
    """Whether single-token steps over `cache` may be captured by a `StepRunner`: `enabled`, with a
    one-row contiguous `KVCache`."""
    return isinstance(cache, KVCache) and cache.k[0].shape[0] == 1 and enabled(model)


def model_constants(model: Transformer) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


class StepRunner:
    """`model(idx, cache=cache, last_logits_only=True).logits` for each step of one generation; the first
    single-token step is captured where `can_capture`, and later ones replay it."""

    def __init__(self, model: Transformer, cache):
        self.model, self.cache = model, cache
        self.captured: CapturedStep | None = None
        self._may_capture = cache is not None and can_capture(model, cache)

    def __call__(self, idx: Tensor) -> Tensor:
        if self.captured is not None:
            return self._replay(idx)
        if self._may_capture and idx.shape[1] == 1:
            self._may_capture = False
            constants = [*model_constants(self.model), *self.cache.k, *self.cache.v]
            self.captured, logits = capture(self._eager_step(idx), constants, self.cache.length)
            return logits
        return self._eager_step(idx)()

    def _eager_step(self, idx: Tensor) -> Callable[[], Tensor]:
        return lambda: self.model(idx, cache=self.cache, last_logits_only=True).logits

    def _replay(self, idx: Tensor) -> Tensor:
        past = self.cache.length
        self.cache.check_room(past + 1)
        x, rope = self.model.step_inputs(idx, None, self.cache.positions[past : past + 1], past)
        logits = self.captured.run(x, rope, past)
        self.cache.advance(1)
        return logits
