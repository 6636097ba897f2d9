"""The engine's captured decode steps (ModelRunner + lmstack.model.cpu_graph): with fused weights
(quantized or float), pure decode steps replay a captured step per batch size, and every output equals
the eager engine's and single-stream generation's, token for token, under continuous batching, prefix
caching, an int8 KV cache, seeded sampling and reallocated row buffers."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import GREEDY, mixed_prompts, reference, tiny_model

from lmstack.compress.model import quantize_model
from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
from lmstack.engine import runner as runner_module
from lmstack.model import cpu_graph
from lmstack.model.transformer import fuse_for_inference


@pytest.fixture(scope="module")
def int4_model():
    return fuse_for_inference(quantize_model(tiny_model(), "int4"))


def _engine(model, **overrides) -> LLMEngine:
    return LLMEngine(model, config=EngineConfig(block_size=8, max_batch_tokens=64, **overrides))


def _token_ids(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]


def _captures(engine: LLMEngine) -> list[int]:
    """Batch sizes with a captured step."""
    return sorted(rows for (rows, _), step in engine.runner._captured.items() if step is not None)


def test_captured_engine_equals_single_stream_generation(int4_model, monkeypatch):
    prompts = mixed_prompts()
    engine = _engine(int4_model)
    got = _token_ids(engine, prompts)
    assert _captures(engine), "decode steps of a quantized model should be captured"
    assert len(_captures(engine)) >= 2, "several batch sizes occur as requests finish"
    assert got == reference(int4_model, prompts)
    monkeypatch.setenv(cpu_graph.ENV, "0")
    eager = _engine(int4_model)
    assert _token_ids(eager, prompts) == got
    assert not _captures(eager)


@pytest.mark.parametrize("overrides", [{"kv_cache_dtype": "int8"}, {"enable_prefix_caching": False}])
def test_captured_engine_equals_eager_engine(int4_model, monkeypatch, overrides):
    prompts = mixed_prompts() + [mixed_prompts()[1]]  # a repeated prompt: prefix-cache hits
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=20, ignore_eos=True)
    captured = _engine(int4_model, **overrides)
    got = _token_ids(captured, prompts, params)
    assert _captures(captured)
    monkeypatch.setenv(cpu_graph.ENV, "0")
    assert _token_ids(_engine(int4_model, **overrides), prompts, params) == got


def test_reallocated_row_buffers_retire_their_captures(int4_model):
    prompts = mixed_prompts()
    engine = _engine(int4_model)
    cache = engine.runner.cache
    cache._allocate_row_buffers(rows=1, width=1)  # too small: the first steps reallocate them
    version = cache.row_buffers_version
    assert _token_ids(engine, prompts) == reference(int4_model, prompts)
    assert cache.row_buffers_version > version
    current = [key for key, step in engine.runner._captured.items() if step is not None]
    assert current and all(key[1] == cache.row_buffers_version for key in current[-1:])


def test_captures_are_bounded(int4_model, monkeypatch):
    monkeypatch.setattr(runner_module, "MAX_CAPTURES", 2)
    prompts = mixed_prompts()
    engine = _engine(int4_model)
    assert _token_ids(engine, prompts) == reference(int4_model, prompts)
    assert 1 <= len(engine.runner._captured) <= 2


def test_float_models_are_captured_and_unfused_ones_stay_eager():
    # Fused fp32 linears run `cpu_ops.linear`, which joins a capture; unfused ones run F.linear, which
    # cannot, so their decode steps stay eager.
    model = tiny_model()
    prompts = mixed_prompts()[:3]
    engine = _engine(model)
    assert _token_ids(engine, prompts) == reference(model, prompts)
    assert _captures(engine)
    unfused = _engine(tiny_model(), fuse=False)
    assert _token_ids(unfused, prompts) == reference(model, prompts)
    assert not _captures(unfused)
    assert all(step is None for step in unfused.runner._captured.values())


def test_replayed_engine_logits_equal_eager_logits(int4_model, monkeypatch):
    """Compare the logits themselves, not only the argmax: every replayed decode step of the engine gives
    the eager step's logits bit for bit."""
    seen: dict[str, list[torch.Tensor]] = {"on": [], "off": []}
    real_run = runner_module.ModelRunner.run

    def recording_run(self, rows):
        out = real_run(self, rows)
        seen[label].extend(t.clone() for t in out if t is not None)
        return out

    monkeypatch.setattr(runner_module.ModelRunner, "run", recording_run)
    prompts = mixed_prompts()[:4]
    label = "on"
    _token_ids(_engine(int4_model), prompts)
    monkeypatch.setenv(cpu_graph.ENV, "0")
    label = "off"
    _token_ids(_engine(int4_model), prompts)
    assert len(seen["on"]) == len(seen["off"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["on"], seen["off"], strict=True))
