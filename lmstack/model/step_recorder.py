"""Recording one eager decode step as a program of C++ steps (what `lmstack.model.cpu_graph` replays).

While a `StepRecorder` is active (`recording`), every fused CPU op that ran (`cpu_ops`, and the
quantized kernels' `qlinear`) hands the recorder the tensors it read and returned, together with the
extension's `*_node` function that makes a replayable step of them (a graph_node.h capsule). The
recorder checks that each tensor a step reads is something the replay will keep up to date:
  - a constant: a parameter or buffer of the model, or the KV cache (`constants`);
  - a step input: what `note_inputs` declared (the embedded token and its RoPE rows), which the
    replay refills before running;
  - the output of an earlier recorded step.
Anything else was made by an op the recorder never saw (plain PyTorch: an adapter's matmul, a
GPT-2 LayerNorm, an fp32 `nn.Linear`), so the replay could not recompute it: the recording is then
marked failed and the step stays eager. This module imports nothing from lmstack, so the ops can
report to it without an import cycle.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor

# The recorder of the step being captured on this thread, if any: per thread, so that a model running
# on another thread (a second engine in the same server) never reports into this capture.
_local = threading.local()


def _storage(t: Tensor) -> int | None:
    """The address of t's storage; None where it has none to read (a sharded FSDP2 parameter): such a
    tensor is never known, so a step that reads it keeps the generation eager."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


class StepRecorder:
    """Collects the steps of one decode step at `position` (the cache length when it runs)."""

    def __init__(self, constants: Iterable[Tensor], position: int):
        self.position = position
        self.steps: list[Any] = []  # capsules, in execution order
        self.inputs: list[Tensor] = []  # the tensors `note_inputs` declared, refilled before each replay
        self.failure: str | None = None
        self._known = {_storage(t) for t in constants} - {None}
        self._produced: set[int] = set()  # storages written by recorded steps (each step holds its outputs)

    def note_inputs(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            self.inputs.append(t)
            self._known.add(_storage(t))

    def record(self, make_step: Callable[..., Any], args: tuple, outputs: tuple[Tensor, ...]) -> None:
        """One op ran as `op(*args) -> outputs`; `make_step(*args, *outputs)` makes its replayable step."""
        if self.failure is not None:
            return
        for value in args:
            if isinstance(value, Tensor) and _storage(value) not in self._known:  # None is never known
                self.fail(f"{getattr(make_step, '__name__', 'an op')} read a tensor made outside the recorded ops")
                return
        for t in outputs:
            self._known.add(_storage(t))
            self._produced.add(_storage(t))
        self.steps.append(make_step(*args, *outputs))

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason

    def produced(self, t: Tensor) -> bool:
        """Whether a recorded step writes `t` (a replay keeps it current)."""
        return _storage(t) in self._produced


@contextlib.contextmanager
def recording(recorder: StepRecorder) -> Iterator[StepRecorder]:
    previous = active()
    _local.recorder = recorder
    try:
        yield recorder
    finally:
        _local.recorder = previous


def active() -> StepRecorder | None:
    """The recorder capturing the current step on this thread, or None (the usual case)."""
    return getattr(_local, "recorder", None)


def report(make_step: Callable[..., Any], args: tuple, out: Tensor | tuple[Tensor, ...] | None) -> None:
    """An op ran as `op(*args) -> out` (a tensor, a tuple, or None where it declined): record it in the
    step being captured on this thread, if any. `make_step` is the extension's `*_node` for the op."""
    recorder = active()
    if recorder is not None and out is not None:
        recorder.record(make_step, args, out if isinstance(out, tuple) else (out,))


def note_inputs(*tensors: Tensor) -> None:
    """Declare the tensors a decode step starts from (called by `Transformer.forward`; no-op unless recording)."""
    recorder = active()
    if recorder is not None:
        recorder.note_inputs(tensors)
