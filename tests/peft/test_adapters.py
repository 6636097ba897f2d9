"""Adapters as artifacts: merge equivalence, several adapters over one base, DyLoRA ranks, and the
PEFT library round trip (our adapter on our HF export in `peft` == lmstack; `peft`'s adapter here)."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.peft import PeftConfig, apply_peft, load_adapter, merge_adapter, save_adapter, set_adapter
from lmstack.peft.model import set_dylora_rank
from tests.peft.conftest import randomize_adapters, tiny_model


def _adapted(method: str, seed: int = 3, **settings):
    model = apply_peft(tiny_model(), PeftConfig(method=method, r=4, alpha=8, **settings), verbose=False)
    randomize_adapters(model, seed)
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "dora", "dylora", "qlora", "adalora"])
def test_merge_gives_identical_outputs(method, batch):
    model = _adapted(method, use_rslora=method == "lora")
    with torch.no_grad():
        adapted = model(batch[0]).logits
        base = tiny_model()(batch[0]).logits
        merged = merge_adapter(model)
        assert all(type(m).__name__ != "LoraLinear" for m in merged.modules())
        out = merged(batch[0]).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=1e-5)


def test_rslora_scaling():
    plain = _adapted("lora").layers[0].attn.q_proj
    rs = _adapted("lora", use_rslora=True).layers[0].attn.q_proj
    assert plain.scaling("default") == 8 / 4 and rs.scaling("default") == 8 / 2


def test_dylora_serves_any_rank(batch):
    model = _adapted("dylora")
    reference = tiny_model()
    set_dylora_rank(model, 2)
    with torch.no_grad():
        two = model(batch[0]).logits
        # the same adapter truncated by hand to rank 2 as a plain LoRA
        for name, module in model.named_modules():
            if type(module).__name__ == "LoraLinear":
                target = reference.get_submodule(name)
                delta = module.lora_B["default"].weight[:, :2] @ module.lora_A["default"].weight[:2] * (8 / 2)
                target.weight.add_(delta)
        torch.testing.assert_close(two, reference(batch[0]).logits, atol=1e-5, rtol=1e-5)
        set_dylora_rank(model, None)
        assert not torch.allclose(model(batch[0]).logits, two, atol=1e-4)


def test_several_adapters_switch_per_call(tmp_path, batch):
    first, second = _adapted("lora", seed=3), _adapted("dora", seed=4)
    save_adapter(first, tmp_path / "a", "base")
    save_adapter(second, tmp_path / "b", "base")
    with torch.no_grad():
        want_a, want_b = first(batch[0]).logits, second(batch[0]).logits
        model = tiny_model()
        want_base = model(batch[0]).logits
        load_adapter(model, tmp_path / "a", name="a")
        load_adapter(model, tmp_path / "b", name="b")
        set_adapter(model, "a")
        torch.testing.assert_close(model(batch[0]).logits, want_a)
        set_adapter(model, "b")
        torch.testing.assert_close(model(batch[0]).logits, want_b)
        set_adapter(model, None)
        torch.testing.assert_close(model(batch[0]).logits, want_base)
    with pytest.raises(LmstackError, match="no adapter named 'c'"):
        set_adapter(model, "c")


@pytest.mark.parametrize("method", ["qlora", "ia3", "prompt", "ptuning-v2", "prefix", "adapter"])
def test_other_adapters_round_trip(method, tmp_path, batch):
    model = _adapted(method, num_virtual_tokens=3, adapter_size=8)
    save_adapter(model, tmp_path, "base")
    loaded = load_adapter(tiny_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch[0]).logits, model(batch[0]).logits, atol=1e-5, rtol=1e-5)


def test_merge_refuses_non_lora():
    with pytest.raises(LmstackError, match="only LoRA-family"):
        merge_adapter(_adapted("ia3"))


def test_corrupt_adapter_is_a_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LmstackError, match="not valid JSON"):
        load_adapter(tiny_model(), tmp_path)


# --- the PEFT library ------------------------------------------------------------------------------


def _hf_export(model, path):
    from lmstack.convert.hf import save_hf_dir

    save_hf_dir(model, None, path)
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize(
    ("method", "settings"),
    [("lora", {}), ("lora", {"use_rslora": True}), ("dora", {}), ("ia3", {}), ("prompt", {}), ("ptuning-v2", {})],
)
def test_peft_library_loads_our_adapter_with_equal_logits(method, settings, tmp_path, batch):
    peft = pytest.importorskip("peft")
    model = _adapted(method, target_modules=["q_proj", "v_proj", "down_proj"], num_virtual_tokens=3, **settings)
    save_adapter(model, tmp_path / "adapter", "base")
    hf = _hf_export(tiny_model(), tmp_path / "hf")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=batch[0]).logits
        ours = model(batch[0]).logits
    torch.testing.assert_close(theirs[:, -ours.shape[1] :], ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_library_adapter_loads_here(use_dora, tmp_path, batch):
    peft = pytest.importorskip("peft")
    hf = _hf_export(tiny_model(), tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], use_dora=use_dora)
    peft_model = peft.get_peft_model(hf, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_adapter(tiny_model(), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=batch[0]).logits
        ours = model(batch[0]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_adalora_prunes_to_budget_and_round_trips(tmp_path, batch):
    """The allocator keeps exactly the final budget; the pruned adapter saves as a per-module-rank LORA
    that the PEFT library and lmstack both load with the trained model's logits."""
    from lmstack.peft.adalora import RankAllocator, orthogonal_penalty

    peft = pytest.importorskip("peft")
    model = _adapted("adalora", adalora_init_r=6, target_modules=["q_proj", "v_proj", "down_proj"]).train()
    allocator = RankAllocator(model, model.peft_config, total_steps=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 5):
        loss = model(*batch).loss + 0.5 * orthogonal_penalty(model)
        loss.backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
    kept = allocator.kept_ranks()
    assert sum(kept.values()) == 4 * len(kept) and len(set(kept.values())) > 1  # budget r=4/module, spread unevenly
    model.eval()
    save_adapter(model, tmp_path / "adapter", "base")
    with torch.no_grad():
        ours = model(batch[0]).logits
        reloaded = load_adapter(tiny_model(), tmp_path / "adapter")(batch[0]).logits
        hf = _hf_export(tiny_model(), tmp_path / "hf")
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=batch[0]).logits
    torch.testing.assert_close(reloaded, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning-v2"])
def test_virtual_tokens_decode_through_the_kv_cache(method):
    """Greedy decoding with the KV cache (virtual positions written in before the first step) equals
    decoding that recomputes the whole sequence every step."""
    from lmstack.engine.generate import SamplingParams, generate_tokens

    model = _adapted(method, num_virtual_tokens=3)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    cached = list(generate_tokens(model, [5, 9, 17, 3], params))
    assert cached == list(generate_tokens(model, [5, 9, 17, 3], params, use_cache=False))


def test_prompt_tuning_equals_prepended_embeddings(batch):
    model = _adapted("prompt", num_virtual_tokens=3)
    with torch.no_grad():
        ours = model(batch[0]).logits
        soft = model.peft_prompt.embedding[None].expand(batch[0].shape[0], -1, -1)
        model.peft_prompt.busy = True  # run the plain model on [soft prompt; tokens]
        prepended = model(None, inputs_embeds=torch.cat([soft, model.tok_emb(batch[0])], dim=1)).logits
        model.peft_prompt.busy = False
    torch.testing.assert_close(ours, prepended[:, 3:], atol=1e-5, rtol=1e-5)


def test_batched_engine_serves_adapters_switched_per_call(tmp_path):
    """The paged, batched engine runs LoRA-family adapters in their slots; set_adapter switches between calls."""
    from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
    from lmstack.engine.generate import generate_tokens

    save_adapter(_adapted("lora", seed=3), tmp_path / "a", "base")
    save_adapter(_adapted("dora", seed=4), tmp_path / "b", "base")
    model = tiny_model()
    load_adapter(model, tmp_path / "a", name="a")
    load_adapter(model, tmp_path / "b", name="b")
    engine = LLMEngine(model, None, EngineConfig(max_batch_tokens=64, kv_cache_mb=4))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 17, 3], [40, 2, 2, 8, 11]]
    for name in ("a", "b", None):
        set_adapter(model, name)
        served = [out.outputs[0].token_ids for out in engine.generate(prompts, params)]
        assert served == [list(generate_tokens(model, p, params)) for p in prompts], name
