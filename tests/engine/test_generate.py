"""Generation: KV cache equivalence, sampling filters, stop strings, streaming, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmstack.config import model_config
from lmstack.engine.generate import generate_text, generate_tokens, load_for_inference
from lmstack.engine.sampling import SamplingParams, apply_repetition_penalty, draw_token, filter_top_k_top_p
from lmstack.engine.stops import StopStringScanner
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.io import save_model_dir
from lmstack.model.transformer import InferenceLinear
from lmstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(
        model_config("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, d_ff=None, max_seq_len=128)
    )
    return model.eval(), tok


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2", "moe-tiny"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_and_no_cache_generate_identical_tokens(preset, temperature):
    torch.manual_seed(1)
    model = Transformer(model_config(preset, vocab_size=300, n_layer=2, d_model=64, max_seq_len=96)).eval()
    params = SamplingParams(max_new_tokens=40, temperature=temperature, top_k=20, seed=7, ignore_eos=True)
    prompt = list(range(5, 25))
    with_cache = list(generate_tokens(model, prompt, params, use_cache=True))
    without = list(generate_tokens(model, prompt, params, use_cache=False))
    assert with_cache == without and len(with_cache) == 40


def test_generation_budget_is_clamped_to_context():
    model = Transformer(model_config("tiny", vocab_size=300, n_layer=1, d_model=64, max_seq_len=32)).eval()
    out = list(generate_tokens(model, list(range(1, 21)), SamplingParams(max_new_tokens=100, ignore_eos=True)))
    assert len(out) == 12


def test_stops_at_eos_unless_ignored():
    model = Transformer(model_config("tiny", vocab_size=50, n_layer=1, d_model=64, max_seq_len=64)).eval()
    greedy = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    first = next(iter(generate_tokens(model, [1, 2, 3], greedy)))
    # Declare the first greedy token a stop id: generation ends at once, unless ignore_eos is set.
    assert list(generate_tokens(model, [1, 2, 3], SamplingParams(max_new_tokens=10, temperature=0), {first})) == []
    assert len(list(generate_tokens(model, [1, 2, 3], greedy, {first}))) == 10


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    k2 = filter_top_k_top_p(logits, 2, 1.0)
    assert torch.isinf(k2[0, [0, 3]]).all() and torch.isfinite(k2[0, [1, 2]]).all()
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    p = filter_top_k_top_p(probs, 0, 0.75)  # 0.5 + 0.3 reaches 0.75: keep two
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    penalised = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]


def test_draw_token_follows_the_weights_and_never_draws_a_zero():
    weights = torch.zeros(1000)
    weights[[3, 10, 500, 998]] = torch.tensor([0.1, 0.2, 0.3, 0.4]) * 7  # unnormalised, zeros in between
    generator = torch.Generator().manual_seed(0)
    draws = [draw_token(weights, generator) for _ in range(8000)]
    assert set(draws) <= {3, 10, 500, 998}
    counts = torch.tensor([draws.count(i) for i in (3, 10, 500, 998)], dtype=torch.float64)
    expected = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) * 8000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # 3 degrees of freedom: p = 0.001
    again = torch.Generator().manual_seed(0)
    assert [draw_token(weights, again) for _ in range(50)] == draws[:50]
    assert draw_token(torch.tensor([0.0, 0.0, 5.0])) == 2
    with pytest.raises(LmstackError, match="zero probability"):
        draw_token(torch.zeros(4))


def test_seeded_sampling_is_reproducible(model_and_tokenizer):
    model, tok = model_and_tokenizer
    a = generate_text(model, tok, "Return the", max_new_tokens=20, temperature=1.0, seed=3)
    b = generate_text(model, tok, "Return the", max_new_tokens=20, temperature=1.0, seed=3)
    c = generate_text(model, tok, "Return the", max_new_tokens=20, temperature=1.0, seed=4)
    assert a == b and a != c


def test_stop_string_scanner_never_leaks_the_stop():
    scanner = StopStringScanner(["STOP"])
    text, pieces = "", []
    for chunk in ["Hello S", "T", "O", "P world"]:
        text += chunk
        pieces.append(scanner.feed(text))
    assert "".join(pieces) == "Hello " and scanner.stopped
    holdback = StopStringScanner(["\n\n"])
    assert holdback.feed("line\n") == "line"
    assert holdback.feed("line\nmore") == "\nmore"
    assert StopStringScanner([]).feed("abc\ufffd") == "abc"  # incomplete UTF-8 waits


def test_prompt_errors(model_and_tokenizer):
    model, _ = model_and_tokenizer
    with pytest.raises(LmstackError, match="context is 128"):
        list(generate_tokens(model, [5] * 200, SamplingParams()))
    with pytest.raises(LmstackError, match="empty"):
        list(generate_tokens(model, [], SamplingParams()))
    with pytest.raises(LmstackError, match="outside the model's vocabulary"):
        list(generate_tokens(model, [10**6], SamplingParams()))
    with pytest.raises(LmstackError, match="top_p"):
        SamplingParams(top_p=0)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_generate_prints_only_generated_text(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    save_model_dir(model, tmp_path / "m", tok)
    expected = generate_text(model, tok, "Return the", max_new_tokens=16, temperature=0)
    proc = _run_cli(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "Return the",
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_load_for_inference_prepares_the_decode_layout_unless_asked_not_to(model_and_tokenizer, tmp_path):
    """`lmstack generate`/`chat` load through here: q/k/v and gate/up fused, plain linears made
    `InferenceLinear` (the decode-size kernel)."""
    model, tok = model_and_tokenizer
    save_model_dir(model, tmp_path / "m", tok)
    fused, _ = load_for_inference(str(tmp_path / "m"), "cpu")
    attn, ffn = fused.layers[0].attn, fused.layers[0].ffn
    assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj") and hasattr(ffn, "gate_up_proj")
    assert type(attn.qkv_proj) is InferenceLinear and type(fused.lm_head) is InferenceLinear
    plain, _ = load_for_inference(str(tmp_path / "m"), "cpu", fuse=False)
    assert type(plain.layers[0].attn.q_proj) is torch.nn.Linear and not hasattr(plain.layers[0].attn, "qkv_proj")


def test_cli_errors_are_one_line_exit_2(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    save_model_dir(model, tmp_path / "m", tok)
    proc = _run_cli("generate", "--model", str(tmp_path / "m"), "--prompt", "word " * 300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "shorten the prompt" in proc.stderr
    proc = _run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
