"""Adapters as artifacts: the PEFT library's directory format, loading back, and merging.

An adapter directory holds
  adapter_config.json          PEFT's config (peft_type LORA with use_dora / IA3 / PROMPT_TUNING /
                               PREFIX_TUNING), with `base_model_name_or_path`
  adapter_model.safetensors    tensors under PEFT's names over the Hugging Face module names
                               (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
                               from the converters' name table (lmstack.convert.hf)
  lmstack_adapter.json         what PEFT has no field for: the method, its full PeftConfig, the base
so `PeftModel.from_pretrained(hf_model, DIR)` loads it onto `lmstack convert --to hf` output and gives
the same logits, and adapters trained with `peft` load here. Bottleneck adapters have no PEFT
counterpart: they use the same layout with lmstack's own peft_type, which `peft` refuses by name.
A DyLoRA adapter is saved at its serving rank as a plain LORA, an AdaLoRA adapter as a LORA with the
ranks it kept per module (E folded into A; PEFT's rank_pattern/alpha_pattern): what each computes at
inference.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.peft.config import PeftConfig
from lmstack.peft.layers import BottleneckAdapter, IA3Linear
from lmstack.peft.lora import LoraLinear
from lmstack.peft.model import DEFAULT_ADAPTER, add_lora, apply_peft, quantize_targets_nf4, set_adapter
from lmstack.utils.io import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from lmstack.model.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LMSTACK_ADAPTER = "lmstack_adapter.json"
PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _arch(model: Transformer) -> str:
    if model.cfg.family == "gpt2":
        raise LmstackError(
            "PEFT-format adapters map onto LLaMA-family module names; GPT-2's fused c_attn has no per-projection "
            "slot. Merge the adapter (lmstack merge) and export the merged model instead"
        )
    return "MixtralForCausalLM" if model.cfg.is_moe else "LlamaForCausalLM"


def hf_module_name(model: Transformer, ours: str) -> str:
    """`layers.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj` (the converters' name table)."""
    from lmstack.convert.hf import hf_name

    return hf_name(_arch(model), ours)


def our_module_name(model: Transformer, hf: str) -> str:
    from lmstack.convert.hf import our_name

    ours = our_name(_arch(model), hf)
    if ours is None:
        raise LmstackError(f"adapter module {hf!r} has no counterpart in this model")
    return ours


def _target_spec(model: Transformer, names: list[str]) -> list[str] | str:
    """PEFT target_modules: the leaf names when every slot of those names is targeted, else an exact regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    every = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in leaves and hasattr(m, "out_features")]
    every = [n for n in every if "base_layer" not in n and ".lora_" not in n]
    if set(every) == set(names):
        return leaves
    return "^(" + "|".join(re.escape(hf_module_name(model, n)) for n in sorted(names)) + ")$"


def _lora_tensors(model: Transformer, name: str) -> tuple[dict[str, torch.Tensor], list[str], int, float, str]:
    tensors: dict[str, torch.Tensor] = {}
    slots, rank, alpha, kind = [], 0, 0.0, "lora"
    for slot, layer in model.named_modules():
        if not isinstance(layer, LoraLinear) or name not in layer.lora_A:
            continue
        kind, hf = layer.kind[name], PREFIX + hf_module_name(model, slot)
        A, B = layer.lora_A[name].weight.detach().float(), layer.lora_B[name].weight.detach().float()
        rank, alpha = layer.rank(name), layer.lora_alpha[name]
        if kind == "dylora":  # serve rank b: the first b rows/columns, scale alpha/b as trained
            rank = min(layer.serve_rank or rank, rank)
            A, B = A[:rank], B[:, :rank]
        elif kind == "adalora":  # E folded into A, pruned ranks dropped; alpha rescaled per module below
            keep = layer.lora_E[name].detach().flatten() != 0
            A, B = (A * layer.lora_E[name].detach().float())[keep], B[:, keep]
            if not keep.any():  # every rank pruned: one zero rank (LoRA needs r >= 1)
                A, B = A.new_zeros(1, A.shape[1]), B.new_zeros(B.shape[0], 1)
        tensors[f"{hf}.lora_A.weight"], tensors[f"{hf}.lora_B.weight"] = A.contiguous(), B.contiguous()
        if kind == "dora":
            tensors[f"{hf}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name].detach().float()
        slots.append(slot)
    if not slots:
        raise LmstackError(f"the model has no LoRA adapter named {name!r} to save")
    return tensors, slots, rank, alpha, kind


def _ranks_equal(model: Transformer, name: str) -> None:
    ranks = {layer.rank(name) for layer in model.modules() if isinstance(layer, LoraLinear) and name in layer.lora_A}
    if len(ranks) > 1:  # adapters loaded from a PEFT rank_pattern
        raise LmstackError(f"adapter {name!r} has different ranks per layer ({sorted(ranks)}); cannot save one r")


def adapter_state(model: Transformer, name: str = DEFAULT_ADAPTER) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(PEFT-named tensors, PEFT adapter_config) of the model's adapter `name`."""
    cfg: PeftConfig = model.peft_config
    method = cfg.method
    base: dict[str, Any] = {"task_type": "CAUSAL_LM", "inference_mode": True, "revision": None}
    if method in ("lora", "dora", "qlora", "dylora", "adalora"):
        tensors, slots, rank, alpha, kind = _lora_tensors(model, name)
        rank_pattern, alpha_pattern = {}, {}
        if kind == "adalora":  # per-module kept ranks; alpha so that alpha_k / r_k = alpha / init_r as trained
            for slot in slots:
                hf = hf_module_name(model, slot)
                r_k = tensors[f"{PREFIX}{hf}.lora_A.weight"].shape[0]
                rank_pattern[hf], alpha_pattern[hf] = r_k, alpha * r_k / rank
            rank = max(rank_pattern.values())
        else:
            _ranks_equal(model, name)
        config = {
            **base,
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": _target_spec(model, slots),
            "use_rslora": cfg.use_rslora,
            "use_dora": kind == "dora",
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
        }
        return tensors, config
    if method == "ia3":
        tensors, slots, ff = {}, [], []
        for slot, layer in model.named_modules():
            if isinstance(layer, IA3Linear):
                tensors[f"{PREFIX}{hf_module_name(model, slot)}.ia3_l"] = layer.ia3_l["default"].detach().float()
                slots.append(slot)
                ff += [slot] if layer.is_feedforward else []
        config = {
            **base,
            "peft_type": "IA3",
            "target_modules": _target_spec(model, slots),
            "feedforward_modules": _target_spec(model, ff) if ff else [],
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "modules_to_save": None,
        }
        return tensors, config
    if method in ("prompt", "prefix", "ptuning-v2"):
        prompt, m = model.peft_prompt, model.cfg
        table = (prompt.embedding if method == "prompt" else prompt.kv_table()).detach().float().contiguous()
        config = {**base, "num_virtual_tokens": prompt.n, "num_layers": m.n_layer, "num_transformer_submodules": 1}
        if method == "prompt":
            config.update(peft_type="PROMPT_TUNING", token_dim=m.d_model, num_attention_heads=m.n_head)
            config.update(prompt_tuning_init="RANDOM", tokenizer_name_or_path=None)
        else:
            kv_dim = m.n_kv_head * m.head_dim
            config.update(peft_type="PREFIX_TUNING", token_dim=kv_dim, num_attention_heads=m.n_kv_head)
            config.update(prefix_projection=False, encoder_hidden_size=kv_dim)
        return {"prompt_embeddings": table}, config
    if method == "adapter":
        tensors, slots = {}, []
        for slot, layer in model.named_modules():
            if isinstance(layer, BottleneckAdapter):
                hf = PREFIX + hf_module_name(model, slot)
                for key, t in layer.state_dict().items():
                    if not key.startswith("base_layer."):
                        tensors[f"{hf}.{key}"] = t.detach().float().contiguous()
                slots.append(slot)
        config = {**base, "peft_type": "LMSTACK_BOTTLENECK", "target_modules": _target_spec(model, slots)}
        return tensors, config
    raise LmstackError(f"method {method!r} trains the model itself; save it as a model directory, not an adapter")


def save_adapter(model: Transformer, out_dir: str | Path, base_model: str, name: str = DEFAULT_ADAPTER) -> Path:
    """Write adapter `name` of `model` as a PEFT-format directory that records `base_model`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, config = adapter_state(model, name)
    config["base_model_name_or_path"] = base_model
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2))
    info = {"base_model": base_model, "peft": dataclasses.asdict(model.peft_config)}
    atomic_write_text(out / LMSTACK_ADAPTER, json.dumps(info, indent=2))
    return out


def read_adapter_config(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, lmstack_adapter.json or {}) with clear errors for broken files."""
    directory = Path(directory)
    out = []
    for fname, required in ((ADAPTER_CONFIG, True), (LMSTACK_ADAPTER, False)):
        path = directory / fname
        if not path.is_file():
            if required:
                raise LmstackError(f"no {ADAPTER_CONFIG} in {str(directory)!r}; pass an adapter directory")
            out.append({})
            continue
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise LmstackError(f"{path} is not valid JSON ({exc}); the adapter is corrupt") from None
    return out[0], out[1]


def adapter_base(directory: str | Path) -> str:
    """The base model reference an adapter directory records."""
    config, info = read_adapter_config(directory)
    base = info.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise LmstackError(f"{directory}: the adapter records no base model (base_model_name_or_path)")
    return str(base)


def _peft_config_from_file(model: Transformer, config: dict[str, Any], info: dict[str, Any], keys: list[str]):
    """The PeftConfig to rebuild the adapter's modules with (lmstack's own when we wrote it)."""
    from lmstack.utils.config_loader import build_dataclass

    kind = config.get("peft_type")
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k})
    if kind == "LORA":
        if config.get("fan_in_fan_out") or config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise LmstackError("this LoRA adapter uses fan_in_fan_out, trained biases or modules_to_save: unsupported")
        return PeftConfig(
            method="dora" if config.get("use_dora") else "lora",
            r=int(config["r"]),
            alpha=float(config.get("lora_alpha", 8)),
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=[re.escape(our_module_name(model, m)) + "$" for m in modules],
        )
    if info.get("peft"):
        return build_dataclass(PeftConfig, info["peft"], "peft")
    if kind == "IA3":
        ia3 = sorted({k.removeprefix(PREFIX).removesuffix(".ia3_l") for k in keys})
        ff = config.get("feedforward_modules") or []
        ff = [ff] if isinstance(ff, str) else ff
        return PeftConfig(
            method="ia3",
            ia3_target_modules=[re.escape(our_module_name(model, m)) + "$" for m in ia3],
            ia3_feedforward_modules=[f for f in ff if re.fullmatch(r"\w+", f)] or ["down_proj"],
        )
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
        method = "prompt" if kind == "PROMPT_TUNING" else "ptuning-v2"
        return PeftConfig(method=method, num_virtual_tokens=int(config["num_virtual_tokens"]))
    raise LmstackError(f"adapter type {kind!r} is not supported; supported: LORA (incl. DoRA), IA3, prompt/prefix")


def load_adapter(model: Transformer, directory: str | Path, name: str = DEFAULT_ADAPTER) -> Transformer:
    """Add the adapter in `directory` (PEFT format, ours or the `peft` library's) to `model` as `name`.

    LoRA/DoRA adapters can be loaded several times under different names and switched with
    `set_adapter(model, name)`; the other methods take one adapter per model.
    """
    from lmstack.model.io import read_safetensors

    directory = Path(directory)
    config, info = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LmstackError(f"no {ADAPTER_WEIGHTS} in {str(directory)!r}; the adapter is incomplete")
    tensors = read_safetensors(weights)
    cfg = _peft_config_from_file(model, config, info, list(tensors))
    if config.get("peft_type") == "LORA":
        if not hasattr(model, "peft_config"):
            model.requires_grad_(False)
        if info.get("peft", {}).get("method") == "qlora":  # serve over the NF4 base it was trained on
            block = int(info["peft"].get("nf4_block_size", 64))
            quantize_targets_nf4(model, dataclasses.replace(cfg, nf4_block_size=block))
        names = _add_lora_modules(model, cfg, config, name)
        _assign_lora(model, names, tensors, name)
        set_adapter(model, name)
        model.peft_config = cfg
        return model
    if hasattr(model, "peft_config"):
        raise LmstackError(f"{cfg.method} adapters take one per model; load it onto a fresh base model")
    apply_peft(model, cfg, verbose=False)
    _assign_other(model, cfg, tensors)
    model.requires_grad_(False)
    return model


def _pattern_value(patterns: dict[str, Any], hf: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", hf):
            return value
    return default


def _add_lora_modules(model: Transformer, cfg: PeftConfig, config: dict[str, Any], name: str) -> list[str]:
    """add_lora for every targeted module, each with its own rank/alpha where the file's patterns say so."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not ranks and not alphas:
        return add_lora(model, cfg, name)
    names = []
    for target in cfg.target_modules:
        hf = hf_module_name(model, target.removesuffix("$").replace("\\", ""))
        one = dataclasses.replace(
            cfg,
            target_modules=[target],
            r=int(_pattern_value(ranks, hf, cfg.r)),
            alpha=float(_pattern_value(alphas, hf, cfg.alpha)),
        )
        names += add_lora(model, one, name)
    return names


def _assign_lora(model: Transformer, names: list[str], tensors: dict[str, torch.Tensor], name: str) -> None:
    used = set()
    for slot in names:
        layer: LoraLinear = model.get_submodule(slot)
        hf = PREFIX + hf_module_name(model, slot)
        for part, target in (("lora_A", layer.lora_A[name].weight), ("lora_B", layer.lora_B[name].weight)):
            key = f"{hf}.{part}.weight"
            if key not in tensors or tensors[key].shape != target.shape:
                raise LmstackError(f"adapter tensor {key!r} is missing or has the wrong shape for this base model")
            target.data.copy_(tensors[key])
            used.add(key)
        if layer.kind[name] == "dora":
            key = f"{hf}.lora_magnitude_vector"
            layer.lora_magnitude_vector[name].data.copy_(tensors[key])
            used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise LmstackError(f"adapter tensors {extra[:3]} do not belong to this base model's modules")


def _assign_other(model: Transformer, cfg: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    if cfg.method in ("prompt", "prefix", "ptuning-v2"):
        prompt = model.peft_prompt
        table = tensors["prompt_embeddings"]
        if cfg.method == "prefix":  # stored folded: serve the table directly
            prompt.method = "ptuning-v2"
            del prompt.transform
        prompt.embedding = nn.Parameter(table.to(prompt.embedding.device))
        return
    for key, t in tensors.items():
        module_key = key.removeprefix(PREFIX)
        hf_module, _, param = module_key.partition(".ia3_l") if cfg.method == "ia3" else (None, None, None)
        if cfg.method == "ia3":
            layer = model.get_submodule(our_module_name(model, hf_module))
            layer.ia3_l["default"].data.copy_(t)
        else:  # bottleneck: <module>.adapter_{down,up}.{weight,bias}
            module, sub, leaf = module_key.rsplit(".", 2)
            layer = model.get_submodule(our_module_name(model, module))
            getattr(getattr(layer, sub), leaf).data.copy_(t)


@torch.no_grad()
def merge_adapter(model: Transformer, name: str | None = None) -> Transformer:
    """Fold LoRA-family adapter `name` (default: the active one) into the weights; plain nn.Linear slots remain.

    The result has exactly the base's architecture and computes what base + adapter computed (up to
    float rounding). A QLoRA base is dequantized: the merged model is a float model.
    """
    layers = [(slot, m) for slot, m in model.named_modules() if isinstance(m, LoraLinear)]
    others = [type(m).__name__ for m in model.modules() if isinstance(m, (IA3Linear, BottleneckAdapter))]
    if others or hasattr(model, "peft_prompt"):
        raise LmstackError("only LoRA-family adapters (lora, dora, qlora, dylora, adalora) can be merged")
    if not layers:
        raise LmstackError("the model has no LoRA adapter to merge")
    for slot, layer in layers:
        adapter = name or layer.active_adapter
        if adapter not in layer.lora_A:
            raise LmstackError(f"no adapter named {adapter!r} in {slot}")
        weight = layer.merged_weight(adapter)
        bias = layer.bias
        linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device)
        linear = linear.to(weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        parent, _, child = slot.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
