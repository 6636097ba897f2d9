"""The model: parameter counts, KV-cache equivalence, padding masks, GQA, MoE routing."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.config import MODEL_PRESETS, ModelConfig, model_config
from lmstack.errors import LmstackError
from lmstack.model import KVCache, Transformer

SMALL_OVERRIDES = dict(vocab_size=512, n_layer=2, d_model=64, max_seq_len=64)


def tiny(preset: str = "tiny", **over) -> Transformer:
    torch.manual_seed(0)
    cfg = model_config(preset, **{**SMALL_OVERRIDES, **({"d_ff": None} if preset != "moe-tiny" else {}), **over})
    return Transformer(cfg).eval()


@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
def test_param_count_formula_matches_module(preset):
    cfg = model_config(preset)
    if cfg.num_params() > 200_000_000:
        cfg = model_config(preset, n_layer=1)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    assert cfg.flops_per_token() > 6 * cfg.active_params()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2", "moe-tiny"])
def test_kv_cache_matches_full_forward(preset):
    model = tiny(preset)
    idx = torch.randint(0, 512, (2, 24))
    full = model(idx).logits
    cache = KVCache(model.cfg, 2, 64, "cpu", torch.float32)
    pieces = [model(idx[:, :10], cache=cache).logits]  # prefill
    pieces.append(model(idx[:, 10:13], cache=cache).logits)  # chunked prefill with an offset mask
    for t in range(13, 24):  # one token at a time
        pieces.append(model(idx[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 24


def test_left_padding_with_key_mask_matches_unpadded():
    model = tiny()
    seq = torch.randint(0, 512, (1, 12))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], dim=1)
    key_mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    positions = torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(12)])[None]
    out = model(padded, positions=positions, key_mask=key_mask).logits[:, pad:]
    torch.testing.assert_close(out, model(seq).logits, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(model(padded, positions=positions, key_mask=key_mask).logits).any()


def test_left_padded_decode_step_through_kv_cache_respects_the_key_mask():
    """A one-token step with a padding mask must not take KVCache's fused single-token attention (which
    attends to every cached position): the padded row's next logits equal the unpadded row's."""
    model = tiny().eval()
    seq = torch.randint(0, 512, (1, 13))
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq[:, :12]], dim=1)
    key_mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 13, dtype=torch.bool)], dim=1)
    positions = torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(13)])[None]
    with torch.inference_mode():
        cache = KVCache(model.cfg, 1, 32, "cpu", torch.float32)
        model(padded, positions=positions[:, :-1], key_mask=key_mask[:, :-1], cache=cache)
        step = model(seq[:, 12:], positions=positions[:, -1:], key_mask=key_mask, cache=cache).logits
        reference = model(seq).logits[:, -1:]
    torch.testing.assert_close(step, reference, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals an MHA model whose k/v heads are the GQA heads repeated."""
    gqa = tiny(n_head=4, n_kv_head=2)
    mha = tiny(n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    hd = gqa.cfg.head_dim
    for i in range(gqa.cfg.n_layer):
        for name in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.attn.{name}.weight"].view(2, hd, -1)
            state[f"layers.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(mha(idx).logits, gqa(idx).logits, atol=1e-5, rtol=1e-5)


def _loss_by_hand(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean over non-ignored positions of (1 - e) * NLL(target) + e * mean over the vocabulary of -log p."""
    log_p = torch.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    keep = targets != -100
    nll = -log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T)
    uniform = -log_p.mean(dim=-1)
    per_position = (1 - smoothing) * nll + smoothing * uniform
    return per_position[keep].sum() / keep.sum()


def test_loss_and_label_smoothing():
    model = tiny()
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    out = model(idx, targets)
    assert abs(out.loss.item() - math.log(512)) < 0.5  # near-uniform at init
    assert out.loss.item() == pytest.approx(_loss_by_hand(out.logits, targets).item(), rel=1e-6)
    smoothed = model(idx, targets, label_smoothing=0.1).loss
    assert smoothed.item() == pytest.approx(_loss_by_hand(out.logits, targets, 0.1).item(), rel=1e-6)
    assert not torch.isclose(smoothed, out.loss)


def test_ignored_positions_do_not_count():
    model = tiny()
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    targets[0, :8] = -100
    targets[1, 3] = -100
    logits = model(idx).logits
    expected = _loss_by_hand(logits, targets)
    # The same mean taken over the kept positions only, by listing them: no -100 leaks into it.
    kept = torch.cat([logits[0, 8:], logits[1, :3], logits[1, 4:]])
    kept_targets = torch.cat([targets[0, 8:], targets[1, :3], targets[1, 4:]])
    listed = torch.nn.functional.cross_entropy(kept.double(), kept_targets)
    assert expected.item() == pytest.approx(listed.item(), rel=1e-9)
    assert model(idx, targets).loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for smoothing in (0.1, 0.3):
        ours = model(idx, targets, label_smoothing=smoothing).loss.item()
        assert ours == pytest.approx(_loss_by_hand(logits, targets, smoothing).item(), rel=1e-6)
    # Had the ignored positions counted (as token 0, say), the loss would be another number.
    counted = targets.masked_fill(targets == -100, 0)
    assert model(idx, counted).loss.item() != pytest.approx(expected.item(), rel=1e-3)
    all_ignored = torch.full_like(targets, -100)
    assert torch.isnan(model(idx, all_ignored).loss)  # nothing to average: NaN, never a silent 0


def test_gpt2_context_overflow_is_a_clear_error():
    model = tiny("tiny-gpt2")
    with pytest.raises(LmstackError, match="context"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_kv_cache_overflow_is_a_clear_error():
    model = tiny()
    cache = KVCache(model.cfg, 1, 8, "cpu", torch.float32)
    with pytest.raises(LmstackError, match="KV cache"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_bad_config_is_a_clear_error():
    with pytest.raises(LmstackError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(LmstackError, match="unknown model preset"):
        model_config("gpt5")


# --- mixture of experts --------------------------------------------------------------------------


def test_moe_aux_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    model = tiny("moe-tiny")
    moe = model.layers[0].ffn
    x = torch.randn(1, 64, 64)
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities; argsort ties still assign experts
    _, aux_uniform = moe(x)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] += 5.0  # expert 0 favoured for positive inputs
    x_pos = x.abs()
    _, aux_skewed = moe(x_pos)
    assert aux_skewed.item() > aux_uniform.item() >= 0.99


def test_moe_matches_dense_computation_of_selected_experts():
    """Routed output equals sum over top-k experts of gate weight * expert(x), computed naively."""
    model = tiny("moe-tiny", moe_shared_expert=False)
    moe = model.layers[0].ffn
    x = torch.randn(10, 64)
    out, _ = moe(x)
    probs = torch.softmax(moe.router(x), dim=-1)
    w, i = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    expected = torch.stack([sum(w[t, j] * moe.experts[int(i[t, j])](x[t]) for j in range(2)) for t in range(10)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_moe_capacity_drops_overflow_tokens():
    model = tiny("moe-tiny", moe_capacity_factor=0.5, moe_shared_expert=False)
    moe = model.layers[0].ffn
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] += 5.0
    out, _ = moe(torch.randn(32, 64).abs())
    assert moe.last_dropped_fraction > 0.2
    assert (out.abs().sum(-1) == 0).any()  # some tokens got no expert output


def test_load_balancing_loss_evens_out_expert_load():
    """Training on the aux loss alone drives a skewed router towards uniform load."""
    torch.manual_seed(0)
    model = tiny("moe-tiny", moe_shared_expert=False)
    moe = model.layers[0].ffn
    with torch.no_grad():
        moe.router.weight[0] += 0.5
    x = torch.randn(256, 64)
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.5)
    _, aux0 = moe(x)
    load0 = moe.last_expert_load.max().item()
    for _ in range(60):
        opt.zero_grad()
        _, aux = moe(x)
        aux.backward()
        opt.step()
    _, aux1 = moe(x)
    assert aux1.item() < aux0.item()
    assert moe.last_expert_load.max().item() < load0
