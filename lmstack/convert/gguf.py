"""GGUF (llama.cpp's format) <-> lmstack: import with dequantization, export with `gguf.GGUFWriter`.

Import:
  header      our own small reader (`read_gguf`) for the metadata and tensor table. `gguf.GGUFReader`
              builds one numpy view per array element, which costs ~3 s on SmolLM2's 49k-token
              vocabulary alone; this reader takes ~0.1 s and is tested against `GGUFReader`.
  tensors     zero-copy views of the memory-mapped file, dequantized one at a time by
              `gguf.quants.dequantize` (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/K-quants), then assigned
              to a model built on the meta device, so peak memory is about one copy of the weights.
  config      `{arch}.*` metadata -> `ModelConfig` for the architectures llama (LLaMA, SmolLM2,
              Mistral, Mixtral), qwen2 and gpt2.
  tokenizer   `gguf_tokenizer.py` rebuilds a `tokenizers` BPE from the vocabulary and merges.

llama.cpp runs the "llama" architecture with interleaved-pair RoPE, so its converter permutes the
rows of each attention head in q/k (`_permute_qk`); our model uses the HF `rotate_half` layout, so
import undoes that permutation and export applies it. "qwen2" uses NeoX RoPE (rotate_half) and needs
no permutation.

Export writes F32 / F16 / Q8_0 (1-D tensors always F32) plus the tokenizer and chat template, so
llama.cpp, Ollama and LM Studio load the file as is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmstack.config import ModelConfig
from lmstack.convert.gguf_reader import GGUFFile, dequantize_tensor, read_gguf
from lmstack.convert.gguf_tokenizer import tokenizer_from_gguf, write_gguf_tokenizer
from lmstack.errors import LmstackError
from lmstack.model.io import empty_model, load_weights
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.utils.config_loader import build_dataclass
from lmstack.utils.io import atomic_path

SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2")
EXPORT_DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")


# --- config ----------------------------------------------------------------------------------------


def gguf_model_config(gf: GGUFFile) -> ModelConfig:
    """`{arch}.*` metadata -> ModelConfig, with clear errors for what we cannot represent."""
    arch, meta, path = gf.architecture, gf.metadata, gf.path
    if arch not in SUPPORTED_ARCHS:
        raise LmstackError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in meta and default is None:
            raise LmstackError(f"{path}: metadata key {full!r} is missing; the file is incomplete")
        return meta.get(full, default)

    vocab = meta.get(f"{arch}.vocab_size") or _embedding_rows(gf)
    n_head = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    values: dict[str, Any] = dict(
        vocab_size=int(vocab),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        d_model=d_model,
        d_ff=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        tie_embeddings="output.weight" not in gf.tensors,
    )
    if arch == "gpt2":
        values.update(family="gpt2", bias=True, norm_eps=float(get("attention.layer_norm_epsilon")))
        if "output.weight" in gf.tensors:
            # llama.cpp's converter writes GPT-2's tied head twice; keep it tied when it is a copy.
            values["tie_embeddings"] = _same_tensor(gf, "output.weight", "token_embd.weight")
        return build_dataclass(ModelConfig, values, "model")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    if head_dim and int(head_dim) != d_model // n_head:
        values["head_dim"] = int(head_dim)
    values.update(
        family="llama",
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        qkv_bias="blk.0.attn_q.bias" in gf.tensors,
    )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") and float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) != 1.0:
        raise LmstackError(f"{path}: RoPE scaling {scaling!r} is not supported; supported: none")
    if "blk.0.attn_output.bias" in gf.tensors:
        raise LmstackError(f"{path}: attention output biases (blk.0.attn_output.bias) are not supported")
    n_experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    if n_experts:
        if "blk.0.ffn_gate_exps.weight" not in gf.tensors:
            raise LmstackError(
                f"{path}: MoE experts stored per expert (blk.N.ffn_gate.E.weight) are not supported; "
                "supported: stacked experts (blk.N.ffn_gate_exps.weight) as written by current llama.cpp"
            )
        values.update(
            n_experts=n_experts,
            n_experts_per_tok=int(get("expert_used_count")),
            moe_d_ff=int(meta[f"{arch}.expert_feed_forward_length"])
            if f"{arch}.expert_feed_forward_length" in meta
            else None,
            moe_norm_topk_prob=True,
        )
    return build_dataclass(ModelConfig, values, "model")


def _embedding_rows(gf: GGUFFile) -> int:
    emb = gf.tensors.get("token_embd.weight")
    if emb is None:
        raise LmstackError(f"{gf.path}: tensor 'token_embd.weight' is missing; the file is incomplete")
    return emb.shape[0]


def _same_tensor(gf: GGUFFile, a: str, b: str) -> bool:
    ta, tb = gf.tensors[a], gf.tensors[b]
    return ta.qtype == tb.qtype and ta.shape == tb.shape and np.array_equal(ta.data, tb.data)


# --- tensor names ----------------------------------------------------------------------------------


def _layer_names(cfg: ModelConfig, arch: str, i: int) -> dict[str, str]:
    """lmstack parameter name -> GGUF tensor name for layer i."""
    ours, b = f"layers.{i}", f"blk.{i}"
    names = {
        f"{ours}.attn_norm.weight": f"{b}.attn_norm.weight",
        f"{ours}.attn.o_proj.weight": f"{b}.attn_output.weight",
        f"{ours}.ffn_norm.weight": f"{b}.ffn_norm.weight",
    }
    if arch == "gpt2":  # q/k/v fused as attn_qkv; LayerNorm and linear biases everywhere
        for n in ("attn_norm", "ffn_norm"):
            names[f"{ours}.{n}.bias"] = f"{b}.{n}.bias"
        names[f"{ours}.attn.o_proj.bias"] = f"{b}.attn_output.bias"
        for ffn, g in (("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            names[f"{ours}.ffn.{ffn}.weight"] = f"{b}.{g}.weight"
            names[f"{ours}.ffn.{ffn}.bias"] = f"{b}.{g}.bias"
        return names
    for proj, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        names[f"{ours}.attn.{proj}.weight"] = f"{b}.{g}.weight"
        if cfg.qkv_bias:
            names[f"{ours}.attn.{proj}.bias"] = f"{b}.{g}.bias"
    if cfg.is_moe:
        names[f"{ours}.ffn.router.weight"] = f"{b}.ffn_gate_inp.weight"
    else:
        for ffn, g in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            names[f"{ours}.ffn.{ffn}.weight"] = f"{b}.{g}.weight"
    return names


def _global_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if cfg.family == "gpt2":
        names["pos_emb.weight"] = "position_embd.weight"
        names["norm.bias"] = "output_norm.bias"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    return names


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate_half row order -> llama.cpp interleaved order (what convert_hf_to_gguf.py does)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- import ----------------------------------------------------------------------------------------


def load_gguf(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer]:
    """A .gguf file -> (Transformer with dequantized weights, Tokenizer from the metadata)."""
    gf = read_gguf(path)
    cfg = gguf_model_config(gf)
    tokenizer = tokenizer_from_gguf(gf.metadata, gf.path)
    target = dtype or torch.float32
    state = {}
    for ours, t in gguf_tensors(gf, cfg):
        state[ours] = t if t.dtype == target else t.to(target)
    model = empty_model(cfg)
    load_weights(model, state)
    del state
    model.to(device)
    return model.eval(), tokenizer


def gguf_tensors(gf: GGUFFile, cfg: ModelConfig):
    """Yield (lmstack name, fp32 tensor) for every parameter, converting layouts as needed."""
    arch, path = gf.architecture, gf.path
    expected = dict(_global_names(cfg))
    for i in range(cfg.n_layer):
        expected.update(_layer_names(cfg, arch, i))
    known = set(expected.values())

    def fetch(name: str) -> torch.Tensor:
        t = gf.tensors.get(name)
        if t is None:
            raise LmstackError(f"{path}: tensor {name!r} is missing; the file is incomplete or not a {arch} model")
        return dequantize_tensor(t, path)

    for ours, theirs in expected.items():
        w = fetch(theirs)
        if arch == "llama" and ours.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_qk(w, cfg.n_head)
        elif arch == "llama" and ours.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_qk(w, cfg.n_kv_head)
        yield ours, w
    for i in range(cfg.n_layer):
        if arch == "gpt2":
            qkv_w, qkv_b = fetch(f"blk.{i}.attn_qkv.weight"), fetch(f"blk.{i}.attn_qkv.bias")
            known.update({f"blk.{i}.attn_qkv.weight", f"blk.{i}.attn_qkv.bias"})
            for proj, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
                yield f"layers.{i}.attn.{proj}.weight", w.contiguous()
                yield f"layers.{i}.attn.{proj}.bias", b.contiguous()
        if cfg.is_moe:
            for ffn, g in (
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ):
                name = f"blk.{i}.{g}.weight"
                known.add(name)
                stacked = fetch(name)  # (n_experts, out, in)
                for e in range(cfg.n_experts):
                    yield f"layers.{i}.ffn.experts.{e}.{ffn}.weight", stacked[e].clone()
    ignorable = {"rope_freqs.weight"}
    extra = sorted(set(gf.tensors) - known - ignorable - {"output.weight"})
    if extra:
        raise LmstackError(
            f"{path}: tensors {extra[:3]} are not part of a supported {arch} model; "
            "the architecture variant is not supported"
        )


# --- export ----------------------------------------------------------------------------------------


def export_arch(cfg: ModelConfig, where: str = "GGUF export") -> str:
    """The llama.cpp architecture that runs this config, or a clear error."""
    if cfg.family == "gpt2":
        if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.d_model or cfg.is_moe:
            raise LmstackError(f"{where}: a gpt2-family model needs plain multi-head attention and no MoE")
        if cfg.gelu_approximate != "tanh":
            raise LmstackError(
                f"{where}: llama.cpp's gpt2 runs tanh-approximated GELU; this model uses exact GELU "
                "(model.gelu_approximate=none); export it to Hugging Face format instead"
            )
        return "gpt2"
    if cfg.bias:
        raise LmstackError(f"{where}: llama-family models with biases on every linear layer are not supported")
    if cfg.is_moe and (cfg.moe_shared_expert or not cfg.moe_norm_topk_prob or cfg.moe_capacity_factor):
        raise LmstackError(
            f"{where}: only Mixtral-style MoE (no shared expert, renormalised top-k, no capacity limit) "
            "is supported; llama.cpp cannot run this router"
        )
    if cfg.qkv_bias:
        if cfg.is_moe:
            raise LmstackError(f"{where}: MoE with q/k/v biases is not supported")
        return "qwen2"
    return "llama"


def save_gguf(
    model: Transformer, tokenizer: Tokenizer | None, out: str | Path, dtype: str | None = None, name: str = ""
) -> Path:
    """Write a GGUF that llama.cpp runs: metadata, tokenizer, chat template and F32/F16/Q8_0/Q4_0/Q4_1 tensors.

    Quantized models (lmstack.compress) write their Q8_0/Q4_0/Q4_1-shaped layers as those blocks, unchanged.
    """
    dtype = (dtype or "f16").lower()
    if dtype not in EXPORT_DTYPES:
        raise LmstackError(f"--dtype {dtype!r} is not a GGUF export type; choose one of {', '.join(EXPORT_DTYPES)}")
    if tokenizer is None:
        raise LmstackError(
            "GGUF export needs a tokenizer (llama.cpp reads the vocabulary from the file); "
            "save the model with its tokenizer files"
        )
    cfg = model.cfg
    arch = export_arch(cfg)
    out = Path(out)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
    }[dtype]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    }[dtype]
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or out.stem)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_vocab_size(cfg.vocab_size)
        if arch == "gpt2":
            writer.add_layer_norm_eps(cfg.norm_eps)
        else:
            writer.add_head_count_kv(cfg.n_kv_head)
            writer.add_layer_norm_rms_eps(cfg.norm_eps)
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_rope_dimension_count(cfg.head_dim)
            if cfg.head_dim * cfg.n_head != cfg.d_model:
                writer.add_key_length(cfg.head_dim)
                writer.add_value_length(cfg.head_dim)
        if cfg.is_moe:
            writer.add_expert_count(cfg.n_experts)
            writer.add_expert_used_count(cfg.n_experts_per_tok)
            if cfg.moe_d_ff and cfg.moe_d_ff != cfg.d_ff:
                writer.add_expert_feed_forward_length(cfg.moe_d_ff)
        write_gguf_tokenizer(writer, tokenizer, cfg.vocab_size)
        for gname, tensor, tensor_type in _export_tensors(model, arch, qtype):
            data, raw = _encode(tensor, tensor_type or qtype)
            writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


_BLOCK_TYPES = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)


def _encode(t: torch.Tensor, qtype) -> tuple[np.ndarray, Any]:
    """1-D tensors stay F32 (llama.cpp's rule); rows not a multiple of 32 fall back from blocks to F16.

    A uint8 tensor is already encoded blocks of `qtype` (a quantized model's layer) and is written as is.
    """
    if t.dtype == torch.uint8:
        return t.detach().to("cpu").contiguous().numpy(), qtype
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return arr, gguf.GGMLQuantizationType.F32
    if qtype in _BLOCK_TYPES and arr.shape[-1] % 32 == 0:
        return gguf.quants.quantize(arr, qtype), qtype
    return arr.astype(np.float16), gguf.GGMLQuantizationType.F16


def _export_tensors(model: Transformer, arch: str, qtype):
    """Yield (GGUF name, tensor, its own GGUF type or None for the file's type)."""
    from lmstack.compress.gguf_export import gguf_export_state

    cfg = model.cfg
    state, own_types = gguf_export_state(model, qtype.name)  # plain models: their state dict as it is
    types = {name: gguf.GGMLQuantizationType[t] for name, t in own_types.items()}
    for ours, theirs in _global_names(cfg).items():
        yield theirs, state[ours], types.get(ours)
    if arch == "gpt2" and cfg.tie_embeddings:
        # llama.cpp's gpt2 graph reads its head from here
        yield "output.weight", state["tok_emb.weight"], types.get("tok_emb.weight")
    for i in range(cfg.n_layer):
        names = _layer_names(cfg, arch, i)
        if arch == "gpt2" and not cfg.bias:  # the gpt2 graph expects biases: write zeros
            state.update(
                {
                    k: torch.zeros(state[k.replace(".bias", ".weight")].shape[0])
                    for k in names
                    if k.endswith(".bias") and k not in state
                }
            )
        for ours, theirs in names.items():
            w = state[ours]
            if arch == "llama" and ours.endswith(("q_proj.weight", "q_proj.bias")):
                w = _permute_qk(w, cfg.n_head)
            elif arch == "llama" and ours.endswith(("k_proj.weight", "k_proj.bias")):
                w = _permute_qk(w, cfg.n_kv_head)
            yield theirs, w, types.get(ours)
        p = f"layers.{i}"
        if arch == "gpt2":
            ws = [_float(state[f"{p}.attn.{x}_proj.weight"], types.get(f"{p}.attn.{x}_proj.weight")) for x in "qkv"]
            bs = [state.get(f"{p}.attn.{x}_proj.bias", torch.zeros(w.shape[0])) for x, w in zip("qkv", ws, strict=True)]
            yield f"blk.{i}.attn_qkv.weight", torch.cat(ws), None
            yield f"blk.{i}.attn_qkv.bias", torch.cat(bs), None
        if cfg.is_moe:
            for ffn, g in (
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ):
                names = [f"{p}.ffn.experts.{e}.{ffn}.weight" for e in range(cfg.n_experts)]
                yield f"blk.{i}.{g}.weight", torch.stack([_float(state[n], types.get(n)) for n in names]), None


def _float(t: torch.Tensor, qtype) -> torch.Tensor:
    """A tensor joined with others (gpt2 q/k/v, stacked experts) as float, decoding blocks if it is encoded."""
    if t.dtype != torch.uint8:
        return t
    return torch.from_numpy(gguf.quants.dequantize(t.numpy(), qtype))


def describe(gf: GGUFFile) -> dict[str, Any]:
    """Facts for `lmstack inspect` without dequantizing anything."""
    types = Counter(t.type_name for t in gf.tensors.values())
    n_params = sum(int(np.prod(t.shape)) for t in gf.tensors.values())
    return {"version": gf.version, "tensor_types": dict(types.most_common()), "stored_params": n_params}
