"""Hugging Face format directories <-> lmstack.

Import reads `config.json` + `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) for LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
MixtralForCausalLM and GPT2LMHeadModel. Tensors are read one at a time with `safe_open` (memory-mapped)
and assigned to a model built on the meta device, so peak memory is about one copy of the weights in
the requested dtype, never a state dict plus a model.

Name mapping (HF -> ours; the tables `_NAME_TABLES` serve both directions):
  model.embed_tokens -> tok_emb          model.layers.N.input_layernorm -> layers.N.attn_norm
  self_attn.{q,k,v,o}_proj -> attn.*     model.layers.N.post_attention_layernorm -> layers.N.ffn_norm
  mlp.{gate,up,down}_proj -> ffn.*       model.norm -> norm, lm_head -> lm_head
  Mixtral: block_sparse_moe.gate -> ffn.router, experts.E.{w1,w3,w2} -> ffn.experts.E.{gate,up,down}_proj
  GPT-2: Conv1D weights are stored (in, out), so they are transposed; c_attn is split into q/k/v.
HF LLaMA q/k weights already use the `rotate_half` RoPE layout our model uses: no permutation.

Export writes the same names back with config.json (architectures/model_type), generation_config.json
and the tokenizer files, which `transformers.AutoModelForCausalLM.from_pretrained` and vLLM load.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmstack.config import ModelConfig
from lmstack.convert.gguf_tokenizer import QWEN2_SPLIT
from lmstack.errors import LmstackError
from lmstack.model.io import empty_model, load_weights, model_state
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.utils.config_loader import build_dataclass
from lmstack.utils.io import atomic_path, atomic_write_text

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
    "GPT2LMHeadModel",
)
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
_GPT2_ACTIVATIONS = (*_TANH_GELU, "gelu")


# --- config ----------------------------------------------------------------------------------------


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise LmstackError(f"no config.json in {str(directory)!r}; pass a Hugging Face model directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmstackError(f"{path} is not valid JSON ({exc}); the download is corrupt") from None


def hf_architecture(raw: dict[str, Any], path: Path) -> str:
    archs = raw.get("architectures") or []
    by_type = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "gpt2": "GPT2LMHeadModel",
    }
    arch = archs[0] if archs else by_type.get(raw.get("model_type", ""), raw.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LmstackError(
            f"{path / 'config.json'}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def hf_model_config(raw: dict[str, Any], path: Path) -> ModelConfig:
    """An HF config.json (as a dict) -> ModelConfig. Unrepresentable features are clear errors."""
    arch = hf_architecture(raw, path)
    where = path / "config.json"

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise LmstackError(f"{where}: key {key!r} is missing; the config is incomplete")
        return raw[key]

    if arch == "GPT2LMHeadModel":
        act = raw.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            raise LmstackError(f"{where}: activation_function {act!r} is not supported; supported: {_GPT2_ACTIVATIONS}")
        if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("reorder_and_upcast_attn"):
            raise LmstackError(f"{where}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx) are not supported")
        d = int(need("n_embd"))
        values = dict(
            family="gpt2",
            vocab_size=int(need("vocab_size")),
            n_layer=int(need("n_layer")),
            n_head=int(need("n_head")),
            d_model=d,
            d_ff=int(raw.get("n_inner") or 4 * d),
            max_seq_len=int(need("n_positions")),
            norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
            bias=True,
            tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
            gelu_approximate="tanh" if act in _TANH_GELU else "none",
        )
        return build_dataclass(ModelConfig, values, "model")

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise LmstackError(f"{where}: hidden_act {act!r} is not supported; supported: 'silu' (SwiGLU)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise LmstackError(f"{where}: RoPE scaling {rope_type!r} is not supported; supported: default (none)")
    n_head = int(need("num_attention_heads"))
    d = int(need("hidden_size"))
    values = dict(
        family="llama",
        vocab_size=int(need("vocab_size")),
        n_layer=int(need("num_hidden_layers")),
        n_head=n_head,
        n_kv_head=int(raw.get("num_key_value_heads") or n_head),
        d_model=d,
        d_ff=int(need("intermediate_size")),
        head_dim=int(raw.get("head_dim") or d // n_head),
        max_seq_len=int(raw.get("max_position_embeddings", 2048)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    if arch == "Qwen2ForCausalLM":
        values["qkv_bias"] = True
    elif raw.get("mlp_bias"):
        if not raw.get("attention_bias"):
            raise LmstackError(f"{where}: mlp_bias without attention_bias is not supported")
        values["bias"] = True
    elif raw.get("attention_bias"):
        # q/k/v/o biases without MLP biases: Qwen2's layout when the o_proj biases are zero (checked on load).
        values["qkv_bias"] = True
    window = raw.get("sliding_window")
    sliding = arch == "MistralForCausalLM" or raw.get("use_sliding_window")
    if window and sliding and int(window) < values["max_seq_len"]:
        # We have no sliding-window attention; up to the window, full attention is identical.
        print(
            f"note: {where}: sliding window {window} -> context limited to {window} tokens",
            file=sys.stderr,
        )
        values["max_seq_len"] = int(window)
    if arch == "MixtralForCausalLM":
        values.update(
            n_experts=int(need("num_local_experts")),
            n_experts_per_tok=int(need("num_experts_per_tok")),
            moe_norm_topk_prob=True,
            moe_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.01)),
        )
    return build_dataclass(ModelConfig, values, "model")


# --- weights ---------------------------------------------------------------------------------------


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise LmstackError(f"{index} is not a valid safetensors index ({exc}); the download is corrupt") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise LmstackError(f"{index} lists shard {missing[0]} which does not exist; the download is incomplete")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        hint = (
            " (only PyTorch .bin weights found: re-save with save_pretrained(safe_serialization=True))"
            if (list(directory.glob("*.bin")))
            else ""
        )
        raise LmstackError(f"no *.safetensors weights in {str(directory)!r}{hint}")
    return files


class _LazyTensors:
    """name -> tensor across safetensors shards, opened memory-mapped, read one tensor at a time."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Any] = {}
        self.files: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as exc:  # SafetensorError, OSError: header unreadable or truncated
                raise LmstackError(f"{f} is not a readable safetensors file ({exc}); the file is corrupt") from None
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self.where[name] = handle
                self.files[name] = f

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise LmstackError(f"tensor {name!r} is missing from the checkpoint; the download is incomplete")
        try:
            return self.where[name].get_tensor(name)
        except Exception as exc:
            raise LmstackError(
                f"{self.files[name]}: tensor {name!r} cannot be read ({exc}); the file is corrupt"
            ) from None


# --- tensor names: one table per architecture, used as is for export and inverted for import ------
#
# Our module name -> HF module name (".weight"/".bias" follow unchanged). Top-level modules by full
# name; modules inside layer N by their path in the layer, "*" standing for an expert index. GPT-2's
# c_attn holds q, k and v fused: the importer splits it (hf_state) and the exporter fuses it again.

_LLAMA_TOP = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"ffn.{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
}
_MIXTRAL_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("ffn.")},
    "ffn.router": "block_sparse_moe.gate",
    "ffn.experts.*.gate_proj": "block_sparse_moe.experts.*.w1",
    "ffn.experts.*.up_proj": "block_sparse_moe.experts.*.w3",
    "ffn.experts.*.down_proj": "block_sparse_moe.experts.*.w2",
}
_GPT2_TOP = {
    "tok_emb": "transformer.wte",
    "pos_emb": "transformer.wpe",
    "norm": "transformer.ln_f",
    "lm_head": "lm_head",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "ffn_norm": "ln_2",
    "attn.c_attn": "attn.c_attn",
    "attn.o_proj": "attn.c_proj",
    "ffn.up_proj": "mlp.c_fc",
    "ffn.down_proj": "mlp.c_proj",
}
# (top-level table, HF prefix of layer N, layer table) per architecture
_NAME_TABLES: dict[str, tuple[dict[str, str], str, dict[str, str]]] = {
    "LlamaForCausalLM": (_LLAMA_TOP, "model.layers", _LLAMA_LAYER),
    "MistralForCausalLM": (_LLAMA_TOP, "model.layers", _LLAMA_LAYER),
    "Qwen2ForCausalLM": (_LLAMA_TOP, "model.layers", _LLAMA_LAYER),
    "MixtralForCausalLM": (_LLAMA_TOP, "model.layers", _MIXTRAL_LAYER),
    "GPT2LMHeadModel": (_GPT2_TOP, "transformer.h", _GPT2_LAYER),
}
# HF spellings read on import only: transformers>=5 Mixtral checkpoints name the router `mlp.gate` and
# store the experts fused, (E, 2*ff, d) gate_up and (E, d, ff) down, which hf_state splits per expert.
_IMPORT_ALIASES = {
    "MixtralForCausalLM": {
        "mlp.gate": "ffn.router",
        "mlp.experts.gate_up_proj": "ffn.experts.gate_up_proj",
        "mlp.experts.down_proj": "ffn.experts.down_proj",
    }
}
_PARAM_KINDS = ("weight", "bias")


def _split_param(name: str) -> tuple[str, str]:
    """`a.b.weight` -> (`a.b`, `.weight`); a name without a parameter kind is a module: (name, "")."""
    module, _, kind = name.rpartition(".")
    return (module, f".{kind}") if kind in _PARAM_KINDS else (name, "")


def _as_template(path: str) -> tuple[str, str]:
    """`ffn.experts.3.gate_proj` -> (`ffn.experts.*.gate_proj`, "3"); paths without an index unchanged."""
    m = re.fullmatch(r"(.*?)\.(\d+)\.(.*)", path)
    return (f"{m[1]}.*.{m[3]}", m[2]) if m else (path, "")


def hf_name(arch: str, ours: str) -> str:
    """Our parameter or module name -> the HF name in an `arch` checkpoint."""
    top, prefix, layer = _NAME_TABLES[arch]
    module, kind = _split_param(ours)
    if module in top:
        return top[module] + kind
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    template, index = _as_template(m[2]) if m else ("", "")
    if template not in layer:
        raise LmstackError(f"parameter {ours!r} has no name in a {arch} checkpoint")
    return f"{prefix}.{m[1]}.{layer[template].replace('*', index)}{kind}"


def our_name(arch: str, hf: str) -> str | None:
    """An HF parameter or module name in an `arch` checkpoint -> ours (None: not a parameter we keep)."""
    top, prefix, layer = _NAME_TABLES[arch]
    if arch == "GPT2LMHeadModel" and not hf.startswith(("transformer.", "lm_head.")):
        hf = f"transformer.{hf}"  # OpenAI's original GPT-2 checkpoints store names without the prefix
    module, kind = _split_param(hf)
    from_top = {theirs: ours for ours, theirs in top.items()}
    if module in from_top:
        return from_top[module] + kind
    m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.(.+)", module)
    if not m:
        return None
    from_layer = {theirs: ours for ours, theirs in layer.items()} | _IMPORT_ALIASES.get(arch, {})
    template, index = _as_template(m[2])
    if template not in from_layer:
        return None
    return f"layers.{m[1]}.{from_layer[template].replace('*', index)}{kind}"


def hf_state(
    arch: str, cfg: ModelConfig, tensors: _LazyTensors, dtype: torch.dtype
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (HF name, our name, tensor in `dtype`) one at a time."""
    for name in tensors.names():
        if arch == "GPT2LMHeadModel" and name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers in old GPT-2 checkpoints
        if "rotary_emb.inv_freq" in name:
            continue  # recomputed from rope_theta
        ours = our_name(arch, name)
        if ours is None:
            raise LmstackError(
                f"{tensors.files[name]}: tensor {name!r} has no place in a {arch} model; "
                "the checkpoint is not a supported variant of this architecture"
            )
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = tensors.get(name)
        if ours.endswith("attn.o_proj.bias") and cfg.qkv_bias and not cfg.bias:
            if t.any():
                raise LmstackError(
                    f"{tensors.files[name]}: tensor {name!r} is non-zero; attention output biases without "
                    "MLP biases are not supported (supported: q/k/v biases as in Qwen2, or biases everywhere)"
                )
            continue
        if ours.endswith("experts.gate_up_proj"):  # transformers>=5 fused experts: (E, 2*ff, d)
            layer = ours.split(".")[1]
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1), strict=True)):
                yield name, f"layers.{layer}.ffn.experts.{e}.gate_proj.weight", gate.to(dtype).contiguous()
                yield name, f"layers.{layer}.ffn.experts.{e}.up_proj.weight", up.to(dtype).contiguous()
        elif ours.endswith("experts.down_proj"):
            layer = ours.split(".")[1]
            for e in range(t.shape[0]):
                yield name, f"layers.{layer}.ffn.experts.{e}.down_proj.weight", t[e].to(dtype).contiguous()
        elif arch == "GPT2LMHeadModel" and ".attn.c_attn." in ours:
            parts = (t.t() if t.dim() == 2 else t).to(dtype).chunk(3, dim=0)
            for proj, p in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                yield name, ours.replace("c_attn", proj), p.contiguous()
        elif arch == "GPT2LMHeadModel" and t.dim() == 2 and ours.startswith("layers."):
            yield name, ours, t.t().to(dtype).contiguous()  # Conv1D stores (in, out)
        else:
            yield name, ours, t.to(dtype)


def load_hf_dir(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer | None]:
    directory = Path(directory)
    raw = read_hf_config(directory)
    arch = hf_architecture(raw, directory)
    cfg = hf_model_config(raw, directory)
    tensors = _LazyTensors(safetensors_files(directory))
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors.where:
        cfg.tie_embeddings = True  # some exporters drop a tied head despite tie_word_embeddings=false
    model = empty_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for theirs, ours, t in hf_state(arch, cfg, tensors, dtype or torch.float32):
        if ours not in expected:
            raise LmstackError(
                f"{tensors.files[theirs]}: tensor {theirs!r} has no place in this {arch} config "
                f"(as {ours!r}); the checkpoint is not a supported variant of this architecture"
            )
        if tuple(t.shape) != expected[ours]:
            raise LmstackError(
                f"{tensors.files[theirs]}: tensor {theirs!r} has shape {tuple(t.shape)} but config.json "
                f"implies {expected[ours]}; config.json and the weights do not belong together"
            )
        state[ours] = t
    try:
        load_weights(model, state)  # also reports tensors the config needs but the checkpoint lacks
    except LmstackError as exc:
        raise LmstackError(f"{directory}: {exc}") from None
    del state
    model.to(device)
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(directory)
        tokenizer.stop_ids |= _generation_eos_ids(directory)
    return model.eval(), tokenizer


def _generation_eos_ids(directory: Path) -> set[int]:
    """generation_config.json may list several end tokens (e.g. <|eot_id|> besides <|end_of_text|>)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except json.JSONDecodeError:
        return set()
    return {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}


# --- export ----------------------------------------------------------------------------------------


def export_architecture(cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> str:
    """The transformers class for this config.

    q/k/v biases alone are Qwen2's layout, but transformers>=5 always gives a qwen2 model its Qwen2
    tokenizer class, which imposes Qwen2's split regex. With any other tokenizer (ours use the GPT-4
    split) such a model is exported as LLaMA with attention_bias=True and zero o_proj biases: the same
    function, and the tokenizer survives.
    """
    if cfg.family == "gpt2":
        if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model or cfg.is_moe:
            raise LmstackError("HF export: a gpt2-family model needs plain multi-head attention and no MoE")
        return "GPT2LMHeadModel"
    if cfg.is_moe:
        if cfg.moe_shared_expert or not cfg.moe_norm_topk_prob or cfg.moe_capacity_factor or cfg.bias or cfg.qkv_bias:
            raise LmstackError(
                "HF export: only Mixtral-style MoE (no shared expert, renormalised top-k, no capacity limit, "
                "no biases) maps to a transformers architecture"
            )
        return "MixtralForCausalLM"
    if cfg.qkv_bias and not cfg.bias and (tokenizer is None or _has_qwen2_split(tokenizer)):
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _has_qwen2_split(tokenizer: Tokenizer) -> bool:
    return QWEN2_SPLIT in tokenizer.backend.to_str()


def hf_config_dict(cfg: ModelConfig, tokenizer: Tokenizer | None, dtype: torch.dtype) -> dict[str, Any]:
    arch = export_architecture(cfg, tokenizer)
    special = {
        "bos_token_id": tokenizer.bos_id if tokenizer else None,
        "eos_token_id": tokenizer.eos_id if tokenizer else None,
        "pad_token_id": tokenizer.pad_id if tokenizer else None,
    }
    common = {
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        **special,
    }
    if arch == "GPT2LMHeadModel":
        return {
            **common,
            "model_type": "gpt2",
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "n_inner": cfg.d_ff,
            "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
        }
    out = {
        **common,
        "model_type": {
            "LlamaForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2",
            "MixtralForCausalLM": "mixtral",
        }[arch],
        "hidden_size": cfg.d_model,
        "intermediate_size": (cfg.moe_d_ff or cfg.d_ff) if cfg.is_moe else cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers>=5 reads rope_parameters; older versions, vLLM and llama.cpp read rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.bias or cfg.qkv_bias, mlp_bias=cfg.bias)
    elif arch == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        out.update(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.n_experts_per_tok,
            router_aux_loss_coef=cfg.moe_aux_loss_coef,
            sliding_window=None,
        )
    return out


def hf_export_state(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """Our parameters under HF names (GPT-2: Conv1D layout, fused c_attn, zero biases when absent)."""

    cfg = model.cfg
    state = model_state(model)
    out: dict[str, torch.Tensor] = {}
    if arch == "LlamaForCausalLM" and cfg.qkv_bias and not cfg.bias:
        for i in range(cfg.n_layer):
            w = state[f"layers.{i}.attn.o_proj.weight"]
            state[f"layers.{i}.attn.o_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    if arch != "GPT2LMHeadModel":
        return {hf_name(arch, k): v for k, v in state.items()}
    for i in range(cfg.n_layer):
        p = f"layers.{i}"
        ws = [state.pop(f"{p}.attn.{x}_proj.weight") for x in "qkv"]
        zeros = [torch.zeros(w.shape[0], dtype=w.dtype) for w in ws]
        bs = [state.pop(f"{p}.attn.{x}_proj.bias", z) for x, z in zip("qkv", zeros, strict=True)]
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(ws).t().contiguous()
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(bs)
        for mod in ("attn.o_proj", "ffn.up_proj", "ffn.down_proj"):
            w = state[f"{p}.{mod}.weight"]
            state.setdefault(f"{p}.{mod}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
    for name, t in state.items():
        is_conv1d = name.startswith("layers.") and t.dim() == 2
        out[hf_name(arch, name)] = t.t().contiguous() if is_conv1d else t
    return out


def save_hf_dir(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_export_state(model, export_architecture(model.cfg, tokenizer))
    dtype = next(iter(state.values())).dtype
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = hf_config_dict(model.cfg, tokenizer, dtype)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    generation: dict[str, Any] = {"_from_model_config": False}
    if tokenizer is not None:
        eos = [tokenizer.eos_id, *sorted(tokenizer.stop_ids - {tokenizer.eos_id})]
        eos = [i for i in eos if i is not None]
        generation.update(
            bos_token_id=tokenizer.bos_id,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=eos[0] if len(eos) == 1 else eos or None,
        )
        tokenizer.save(out)
    else:
        print(f"note: no tokenizer to write to {out}; add tokenizer files before serving it", file=sys.stderr)
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2))
    return out


def describe_safetensors(files: list[Path]) -> dict[str, Any]:
    """dtype counts and parameter count from safetensors headers only (for `lmstack inspect`)."""

    dtypes: Counter[str] = Counter()
    n_params = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LmstackError(f"{f} is not a readable safetensors file ({exc}); the file is corrupt") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtypes[info["dtype"]] += 1
            count = 1
            for s in info["shape"]:
                count *= s
            n_params += count
    return {"tensor_dtypes": dict(dtypes.most_common()), "stored_params": n_params}
