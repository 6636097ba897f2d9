"""CUDA paths: bf16 autocast, the flash SDPA kernel, torch.compile, KV-cache decoding on GPU.

Marked `gpu`: skipped where no CUDA device exists (every CI machine here). Run on a GPU with
`python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from lmstack.config import model_config
from lmstack.engine.generate import SamplingParams, generate_tokens
from lmstack.model import Transformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(preset: str = "tiny", **over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config(preset, vocab_size=1024, max_seq_len=512, **over)).cuda()


def test_bf16_autocast_training_step_reduces_loss():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 1024, (8, 128), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_flash_attention_kernel_is_used_for_causal_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model(n_kv_head=4).to(torch.bfloat16)
    idx = torch.randint(0, 1024, (2, 256), device="cuda")
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.MATH]):  # the plain softmax(QK^T)V reference, not flash itself
            reference = model(idx).logits.float()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if our call cannot use flash
            flash = model(idx).logits.float()
    torch.testing.assert_close(flash, reference, atol=2e-2, rtol=2e-2)


def test_compiled_model_matches_eager():
    model = _model("tiny-gpt2")
    compiled = torch.compile(model)
    idx = torch.randint(0, 1024, (4, 128), device="cuda")
    eager = model(idx, idx).loss
    out = compiled(idx, idx).loss
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    out.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset", ["tiny", "moe-tiny"])
def test_kv_cache_decoding_on_gpu_matches_uncached(preset):
    model = _model(preset).eval()
    params = SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True)
    prompt = list(range(3, 40))
    assert list(generate_tokens(model, prompt, params)) == list(generate_tokens(model, prompt, params, use_cache=False))
