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

import torch
from torch import Tensor

from lmstack.model import cpu_ops, step_recorder
from lmstack.model.transformer import KVCache, Transformer

ENV = "LMSTACK_CPU_GRAPH"
log = logging.getLogger(__name__)


class CapturedStep:
    """A recorded single-token decode step over `cache`, replayed by `replay` for each next token."""

    def __init__(self, model: Transformer, cache: KVCache, program, inputs: list[Tensor], logits: Tensor):
        self.model, self.cache, self.program = model, cache, program
        self.inputs = inputs  # the buffers the program starts from: embedded token, cos row, signed sin row
        self.logits = logits  # (1, 1, vocab), overwritten by every replay

    def replay(self, idx: Tensor) -> Tensor:
        """Logits (1, 1, vocab) for token `idx` (1, 1) at the cache's next position; the cache advances.
        The tensor is the step's own output: read it before the next replay."""
        past = self.cache.length
        self.cache.check_room(past + 1)
        x, rope = self.model.step_inputs(idx, None, self.cache.positions[past : past + 1], past)
        for buffer, value in zip(self.inputs, (x, *rope), strict=True):
            buffer.copy_(value)
        self.program.run(past)
        self.cache.advance(1)
        return self.logits


def can_capture(model: Transformer, cache) -> bool:
    """Whether single-token steps over `cache` may be captured: a one-row contiguous `KVCache` of a
    RoPE model on the CPU, gradients off, the fused ops built, and LMSTACK_CPU_GRAPH not 0."""
    return (
        os.environ.get(ENV, "1").strip() != "0"
        and isinstance(cache, KVCache)
        and cache.k[0].shape[0] == 1
        and model.cfg.family == "llama"
        and not model.training
        and not torch.is_grad_enabled()
        and model.tok_emb.weight.is_cpu
        and cpu_ops.extension() is not None
    )


def capture(model: Transformer, cache: KVCache, idx: Tensor) -> tuple[CapturedStep | None, Tensor]:
    """Run token `idx` (1, 1) eagerly while recording it; return the captured step (None where the step
    cannot be replayed) and the step's logits (1, 1, vocab)."""
    position = cache.length
    recorder = step_recorder.StepRecorder([*model.parameters(), *model.buffers(), *cache.k, *cache.v], position)
    with step_recorder.recording(recorder):
        logits = model(idx, cache=cache, last_logits_only=True).logits
    if recorder.failure is None and not recorder.produced(logits):
        recorder.fail("the logits were not made by a recorded op")
    if recorder.failure is None and len(recorder.inputs) != 3:
        recorder.fail(f"the step declared {len(recorder.inputs)} inputs, not the token and two RoPE rows")
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
    return CapturedStep(model, cache, program, recorder.inputs, logits), logits


class StepRunner:
    """`model(idx, cache=cache, last_logits_only=True).logits` for each step of one generation; the first
    single-token step is captured where `can_capture`, and later ones replay it."""

    def __init__(self, model: Transformer, cache):
        self.model, self.cache = model, cache
        self.captured: CapturedStep | None = None
        self._may_capture = cache is not None and can_capture(model, cache)

    def __call__(self, idx: Tensor) -> Tensor:
        if self.captured is not None:
            return self.captured.replay(idx)
        if self._may_capture and idx.shape[1] == 1:
            self._may_capture = False
            self.captured, logits = capture(self.model, self.cache, idx)
            return logits
        return self.model(idx, cache=self.cache, last_logits_only=True).logits
