"""Captured decode steps (lmstack.model.cpu_graph): a replayed step gives the eager step's logits bit for
bit at every position, generation is unchanged, anything the recorder cannot replay stays eager, and a
capture that does not reproduce its logits is refused."""

from __future__ import annotations

import threading

import pytest
import torch

from lmstack.compress.model import quantize_model
from lmstack.config import ModelConfig
from lmstack.engine.generate import SamplingParams, generate_tokens
from lmstack.errors import LmstackError
from lmstack.model import cpu_graph, cpu_ops, step_recorder
from lmstack.model.transformer import KVCache, Transformer, fuse_for_inference

TINY = dict(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64)
PROMPT = [5, 17, 42, 9, 77, 3]


def _model(method: str | None, **overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    if method is not None:
        quantize_model(model, method)
    return fuse_for_inference(model)


def _cache(model: Transformer, length: int = 40) -> KVCache:
    return KVCache(model.cfg, 1, length, "cpu", torch.float32)


def _eager_logits(model: Transformer, tokens: list[int]) -> list[torch.Tensor]:
    cache = _cache(model)
    model(torch.tensor([PROMPT]), cache=cache)
    return [model(torch.tensor([[t]]), cache=cache, last_logits_only=True).logits.clone() for t in tokens]


@pytest.mark.parametrize("method", [None, "int4", "int8", "nf4"], ids=["fp32", "int4", "int8", "nf4"])
@torch.inference_mode()
def test_replayed_steps_equal_eager_steps_bit_for_bit(method):
    model = _model(method)
    tokens = [11, 99, 4, 64, 23, 7, 120, 0, 56, 31]
    runner = cpu_graph.StepRunner(model, _cache(model))
    runner(torch.tensor([PROMPT]))  # prefill: eager, never captured
    assert runner.captured is None
    replayed = [runner(torch.tensor([[t]])).clone() for t in tokens]
    assert runner.captured is not None, "the first single-token step of a fused model should be captured"
    # 2 layers x (2 norms, qkv, rope, attention, o, add, gate_up, silu, down, add) + final norm + head
    assert len(runner.captured.program) == 2 * 11 + 2
    for got, want in zip(replayed, _eager_logits(model, tokens), strict=True):
        assert torch.equal(got, want)
    assert runner.cache.length == len(PROMPT) + len(tokens)


@torch.inference_mode()
def test_generation_is_unchanged_by_capture(monkeypatch):
    model = _model("int4")
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=20, seed=3, ignore_eos=True)
    captured = list(generate_tokens(model, PROMPT, params))
    monkeypatch.setenv(cpu_graph.ENV, "0")
    assert list(generate_tokens(model, PROMPT, params)) == captured


@torch.inference_mode()
def test_replay_runs_out_of_cache_room_with_a_clear_error():
    model = _model("int8")
    runner = cpu_graph.StepRunner(model, _cache(model, length=len(PROMPT) + 2))
    runner(torch.tensor([PROMPT]))
    runner(torch.tensor([[1]]))
    runner(torch.tensor([[2]]))
    assert runner.captured is not None
    with pytest.raises(LmstackError, match="exceeds the KV cache"):
        runner(torch.tensor([[3]]))


def _first_decode_step(model: Transformer) -> tuple[cpu_graph.StepRunner, torch.Tensor]:
    """A StepRunner after the prompt and one decode step (token 1): the step that is captured, if any."""
    runner = cpu_graph.StepRunner(model, _cache(model))
    runner(torch.tensor([PROMPT]))
    return runner, runner(torch.tensor([[1]]))


@torch.inference_mode()
def test_plain_pytorch_ops_keep_the_step_eager():
    # An unfused model's nn.Linear runs F.linear, which the recorder never sees: the next fused op reads
    # its output, so the capture is refused, and generation still runs (eagerly).
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval()
    runner, logits = _first_decode_step(model)
    assert runner.captured is None
    assert torch.equal(logits, _eager_logits(model, [1])[0])


@torch.inference_mode()
def test_capture_that_does_not_reproduce_its_logits_is_refused(monkeypatch):
    # An in-place PyTorch op on a recorded output changes the eager step but not its replay: the
    # check replay must catch it.
    model = _model("int4")
    real_silu_mul = cpu_ops.silu_mul

    def silu_mul_then_scale(gate_up):
        y = real_silu_mul(gate_up)
        return None if y is None else y.mul_(1.5)

    monkeypatch.setattr(cpu_ops, "silu_mul", silu_mul_then_scale)
    with pytest.warns(UserWarning, match="did not reproduce its eager logits"):
        runner, logits = _first_decode_step(model)
    assert runner.captured is None
    assert torch.equal(logits, _eager_logits(model, [1])[0])


@torch.inference_mode()
def test_capture_is_off_when_asked_or_out_of_scope(monkeypatch):
    model = _model("int4")
    assert cpu_graph.can_capture(model, _cache(model))
    assert not cpu_graph.can_capture(model, KVCache(model.cfg, 2, 40, "cpu", torch.float32))  # two rows
    assert not cpu_graph.can_capture(model, None)
    monkeypatch.setenv(cpu_graph.ENV, "0")
    assert not cpu_graph.can_capture(model, _cache(model))
    runner, _ = _first_decode_step(model)
    assert runner.captured is None


@torch.no_grad()
def test_capture_needs_gradients_off_only():
    model = _model("int4")
    assert cpu_graph.can_capture(model, _cache(model))
    with torch.enable_grad():
        assert not cpu_graph.can_capture(model, _cache(model))
    model.train()
    assert not cpu_graph.can_capture(model, _cache(model))


def test_recorder_refuses_a_tensor_made_outside_the_recorded_ops():
    weight, made_elsewhere = torch.ones(4), torch.zeros(4)
    recorder = step_recorder.StepRecorder([weight], position=0)
    made_steps = []

    def make_step(*tensors):
        made_steps.append(tensors)
        return "step"

    out = torch.empty(4)
    recorder.record(make_step, (weight,), (out,))
    recorder.record(make_step, (out, weight), (torch.empty(4),))  # reads an earlier output: fine
    assert recorder.failure is None and recorder.steps == ["step", "step"]
    recorder.record(make_step, (made_elsewhere,), (torch.empty(4),))
    assert recorder.failure is not None and "outside the recorded ops" in recorder.failure
    assert len(made_steps) == 2 and recorder.produced(out) and not recorder.produced(weight)


def test_a_recording_sees_only_its_own_thread():
    recorder = step_recorder.StepRecorder([], position=0)
    seen = []
    with step_recorder.recording(recorder):
        assert step_recorder.active() is recorder
        worker = threading.Thread(target=lambda: seen.append(step_recorder.active()))
        worker.start()
        worker.join()
    assert seen == [None] and step_recorder.active() is None
