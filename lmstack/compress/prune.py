"""Pruning: `lmstack prune --model REF --method M --sparsity S --out DIR`.

Unstructured (weights set to zero, shapes unchanged; the output is a plain lmstack model directory):
  magnitude  smallest |W| removed, per layer (each linear loses S of its weights) or globally
             (one threshold over all block linears, `scope="global"`);
  wanda      Wanda (Sun et al., 2023): score |W_ij| * ||x_j||_2 from calibration inputs, removed per
             output row (each row loses S of its weights), no weight update;
  2:4        semi-structured: in every run of 4 consecutive input weights the 2 lowest-scoring are
             removed (Wanda's score with calibration, |W| without); sparsity is 0.5 by definition.
Structured (the model gets smaller shapes; a short recovery fine-tune follows):
  heads      whole key/value head groups (a KV head and the query heads sharing it) removed uniformly
             per layer, lowest weight norm first (so grouped-query attention stays consistent);
  channels   FFN hidden channels removed uniformly per layer, lowest |gate|*|up|*|down| norm first;
  layers     whole blocks removed, those that change their input least on calibration text
             (ShortGPT's block influence 1 - cos(x_in, x_out)).
Sparsity is verified after pruning and reported per layer (`PruneReport`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmstack.compress.calib import BlockRunner, capture_inputs, linears_of, short_finetune
from lmstack.config import ModelConfig
from lmstack.errors import require
from lmstack.model.transformer import Transformer

UNSTRUCTURED = ("magnitude", "wanda", "2:4")
STRUCTURED = ("heads", "channels", "layers")
METHODS = UNSTRUCTURED + STRUCTURED
NEEDS_CALIBRATION = ("wanda", "layers")


@dataclass
class PruneReport:
    method: str
    requested: float
    layers: dict[str, float] = field(default_factory=dict)  # linear name -> fraction of zero weights
    shape: dict[str, int] = field(default_factory=dict)  # structured: the pruned model's sizes
    overall: float = 0.0  # zero fraction over all block linears (unstructured) or parameter reduction
    params_before: int = 0
    params_after: int = 0
    recovery_losses: list[float] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'layer':<32} sparsity"] + [f"{name:<32} {value:.4f}" for name, value in self.layers.items()]
        lines += [f"{name:<32} {value}" for name, value in self.shape.items()]
        lines.append(
            f"overall {self.overall:.4f} (requested {self.requested}); parameters {self.params_before:,} -> "
            f"{self.params_after:,}"
        )
        return "\n".join(lines)


def check_sparsity(method: str, sparsity: float) -> None:
    require(method in METHODS, f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    require(0 <= sparsity < 1, f"--sparsity must be in [0, 1), got {sparsity}")
    require(
        method != "2:4" or sparsity in (0.0, 0.5),
        f"2:4 pruning removes exactly half the weights; got --sparsity {sparsity}, pass 0.5",
    )


def named_block_linears(model: Transformer) -> dict[str, nn.Linear]:
    return {
        f"layers.{i}.{name}": lin for i, block in enumerate(model.layers) for name, lin in linears_of(block).items()
    }


def _add_squares(sums: dict[str, Tensor], name: str, x: Tensor) -> None:
    squares = (x.detach().float() ** 2).sum(0)
    sums[name] = squares if name not in sums else sums[name] + squares


def input_norms(model: Transformer, tokens: Tensor) -> dict[str, Tensor]:
    """||x_j||_2 over all calibration rows, per input channel of every block linear (Wanda's statistic)."""
    sums: dict[str, Tensor] = {}
    runner = BlockRunner(model, tokens)
    for index, block in runner:
        linears = {f"layers.{index}.{n}": lin for n, lin in linears_of(block).items()}
        with capture_inputs(linears, lambda name, x: _add_squares(sums, name, x)):
            runner.run_block()
    return {name: s.sqrt() for name, s in sums.items()}


# -- unstructured ---------------------------------------------------------------------------------------


def unstructured_masks(
    model: Transformer, method: str, sparsity: float, norms: dict[str, Tensor] | None, scope: str = "layer"
) -> dict[str, Tensor]:
    """Boolean keep-masks (True = keep) per block linear."""
    require(scope in ("layer", "global"), f"scope must be 'layer' or 'global', got {scope!r}")
    linears = named_block_linears(model)
    scores = {
        name: lin.weight.detach().abs().float() * (norms[name][None, :] if norms is not None else 1)
        for name, lin in linears.items()
    }
    if method == "2:4":
        return {name: _keep_n_of_m(score, 2, 4) for name, score in scores.items()}
    if method == "magnitude" and scope == "global":
        everything = torch.cat([s.flatten() for s in scores.values()])
        k = int(sparsity * everything.numel())
        threshold = everything.kthvalue(k).values if k > 0 else everything.min() - 1
        return {name: score > threshold for name, score in scores.items()}
    per_row = method == "wanda"  # Wanda compares weights within each output row
    return {name: _keep_top(score, sparsity, per_row) for name, score in scores.items()}


def _keep_top(score: Tensor, sparsity: float, per_row: bool) -> Tensor:
    """Mask removing exactly floor(sparsity * n) lowest scores (per row, or over the whole matrix)."""
    flat = score if per_row else score.reshape(1, -1)
    k = int(sparsity * flat.shape[1])
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, flat.argsort(dim=1)[:, :k], False)
    return mask.reshape(score.shape)


def _keep_n_of_m(score: Tensor, n: int, m: int) -> Tensor:
    require(score.shape[1] % m == 0, f"{n}:{m} pruning needs input sizes divisible by {m}, got {score.shape[1]}")
    groups = score.reshape(score.shape[0], -1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2).indices, True)
    return mask.reshape(score.shape)


def apply_masks(model: Transformer, masks: dict[str, Tensor]) -> None:
    linears = named_block_linears(model)
    with torch.no_grad():
        for name, mask in masks.items():
            linears[name].weight.mul_(mask.to(linears[name].weight.dtype))


def layer_sparsity(model: Transformer) -> dict[str, float]:
    """Measured fraction of exactly-zero weights per block linear."""
    return {name: float((lin.weight == 0).float().mean()) for name, lin in named_block_linears(model).items()}


def is_two_four(weight: Tensor) -> bool:
    """Every run of 4 consecutive input weights has at most 2 non-zeros."""
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


# -- structured -----------------------------------------------------------------------------------------


def _rebuild(model: Transformer, cfg: ModelConfig, state: dict[str, Tensor]) -> Transformer:
    smaller = Transformer(cfg)
    smaller.load_state_dict(state, strict=True)
    return smaller.to(model.tok_emb.weight.device).eval()


def prune_heads(model: Transformer, sparsity: float) -> Transformer:
    """Remove the same number of KV head groups from every layer, lowest weight norm first."""
    cfg = model.cfg
    group = cfg.n_head // cfg.n_kv_head
    keep_kv = max(1, round(cfg.n_kv_head * (1 - sparsity)))
    hd = cfg.head_dim
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.layers):
        a = block.attn
        q = a.q_proj.weight.detach().view(cfg.n_kv_head, group * hd, -1)
        k = a.k_proj.weight.detach().view(cfg.n_kv_head, hd, -1)
        v = a.v_proj.weight.detach().view(cfg.n_kv_head, hd, -1)
        o = a.o_proj.weight.detach().view(-1, cfg.n_kv_head, group * hd)
        importance = q.norm(dim=(1, 2)) * k.norm(dim=(1, 2)) + v.norm(dim=(1, 2)) * o.norm(dim=(0, 2))
        kept = importance.topk(keep_kv).indices.sort().values
        kv_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept.tolist()])
        q_rows = torch.cat([torch.arange(h * group * hd, (h + 1) * group * hd) for h in kept.tolist()])
        prefix = f"layers.{i}.attn."
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            state[prefix + f"{name}.weight"] = state[prefix + f"{name}.weight"][rows]
            if prefix + f"{name}.bias" in state:
                state[prefix + f"{name}.bias"] = state[prefix + f"{name}.bias"][rows]
        state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, q_rows]
    new_cfg = dataclasses.replace(cfg, n_head=keep_kv * group, n_kv_head=keep_kv, head_dim=hd)
    return _rebuild(model, new_cfg, state)


def prune_channels(model: Transformer, sparsity: float) -> Transformer:
    """Remove the same number of FFN hidden channels from every layer, lowest importance first."""
    cfg = model.cfg
    require(not cfg.is_moe, "channel pruning of mixture-of-experts FFNs is not supported; prune heads or layers")
    keep = max(1, round(cfg.d_ff * (1 - sparsity)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.layers):
        f = block.ffn
        importance = f.up_proj.weight.detach().norm(dim=1) * f.down_proj.weight.detach().norm(dim=0)
        if f.swiglu:
            importance = importance * f.gate_proj.weight.detach().norm(dim=1)
        kept = importance.topk(keep).indices.sort().values
        prefix = f"layers.{i}.ffn."
        for name in ("gate_proj", "up_proj"):
            if prefix + f"{name}.weight" in state:
                state[prefix + f"{name}.weight"] = state[prefix + f"{name}.weight"][kept]
                if prefix + f"{name}.bias" in state:
                    state[prefix + f"{name}.bias"] = state[prefix + f"{name}.bias"][kept]
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, kept]
    return _rebuild(model, dataclasses.replace(cfg, d_ff=keep), state)


def block_influence(model: Transformer, tokens: Tensor) -> list[float]:
    """ShortGPT's 1 - cos(input, output) per block, averaged over calibration tokens."""
    runner = BlockRunner(model, tokens)
    influence = []
    for _, _block in runner:
        outputs = runner.run_block()
        cos = [
            torch.nn.functional.cosine_similarity(h, o, dim=-1).mean()
            for h, o in zip(runner.hidden, outputs, strict=True)
        ]
        influence.append(float(1 - torch.stack(cos).mean()))
    return influence


def prune_layers(model: Transformer, sparsity: float, tokens: Tensor) -> Transformer:
    cfg = model.cfg
    keep = max(1, round(cfg.n_layer * (1 - sparsity)))
    influence = block_influence(model, tokens)
    kept = sorted(sorted(range(cfg.n_layer), key=lambda i: influence[i], reverse=True)[:keep])
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            if int(index) in kept:
                state[f"layers.{kept.index(int(index))}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    return _rebuild(model, dataclasses.replace(cfg, n_layer=keep), state)


def prune_model(
    model: Transformer,
    method: str,
    sparsity: float,
    tokens: Tensor | None = None,
    scope: str = "layer",
    recovery_steps: int = 0,
    recovery_lr: float = 1e-4,
) -> tuple[Transformer, PruneReport]:
    """Prune `model` (in place for unstructured methods; a new, smaller model for structured ones)."""
    check_sparsity(method, sparsity)
    require(tokens is not None or method not in NEEDS_CALIBRATION, f"{method} pruning needs calibration tokens")
    params_before = sum(p.numel() for p in model.parameters())
    report = PruneReport(method, sparsity, params_before=params_before)
    if method in UNSTRUCTURED:
        norms = input_norms(model, tokens) if (method == "wanda" or (method == "2:4" and tokens is not None)) else None
        apply_masks(model, unstructured_masks(model, method, sparsity if method != "2:4" else 0.5, norms, scope))
        report.layers = layer_sparsity(model)
        total = sum(lin.weight.numel() for lin in named_block_linears(model).values())
        report.overall = (
            sum(report.layers[n] * lin.weight.numel() for n, lin in named_block_linears(model).items()) / total
        )
    else:
        if method == "heads":
            model = prune_heads(model, sparsity)
        elif method == "channels":
            model = prune_channels(model, sparsity)
        else:
            model = prune_layers(model, sparsity, tokens)
        if recovery_steps and tokens is not None:
            report.recovery_losses = short_finetune(model, tokens, recovery_steps, recovery_lr, batch_size=8)
        after = sum(p.numel() for p in model.parameters())
        report.overall = 1 - after / params_before
        report.shape = {f: getattr(model.cfg, f) for f in ("n_layer", "n_head", "n_kv_head", "d_ff")}
        report.layers = layer_sparsity(model)
    report.params_after = sum(p.numel() for p in model.parameters())
    return model, report


def prune_cli(args) -> None:
    """`lmstack prune`: validate, load, prune (+ recovery fine-tune), save a model directory, print the report."""
    from lmstack.compress.calib import calibration_texts, calibration_tokens
    from lmstack.hub import load_model
    from lmstack.model.io import save_model_dir

    method = args.method
    sparsity = 0.5 if args.sparsity is None and method == "2:4" else args.sparsity
    require(sparsity is not None, f"--sparsity is required for {method} pruning (a fraction in [0, 1))")
    check_sparsity(method, sparsity)
    require(args.recovery_steps >= 0, f"--recovery-steps must be >= 0, got {args.recovery_steps}")
    texts = calibration_texts(args.calib)  # read (and checked) before the model loads
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    require(tokenizer is not None, f"{args.model} has no tokenizer; calibration and the output need one")
    uses_tokens = method in NEEDS_CALIBRATION or method in STRUCTURED or (method == "2:4" and args.calib)
    tokens = None
    if uses_tokens:
        seq_len = min(args.calib_seq_len, model.cfg.max_seq_len)
        tokens = calibration_tokens(
            tokenizer, texts, args.calib_samples, seq_len, source=args.calib or "the built-in text"
        )
    model, report = prune_model(model, method, sparsity, tokens, args.scope, args.recovery_steps, args.recovery_lr)
    pruning = {
        "method": method,
        "sparsity": sparsity,
        "overall": report.overall,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "source": str(args.model),
    }
    save_model_dir(model, args.out, tokenizer, extra={"pruning": pruning})
    print(report.table())
    print(f"pruned model -> {args.out}", file=sys.stderr)
