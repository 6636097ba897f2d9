"""LoRA and its relatives around whatever module sits in a linear slot (docs/architecture.md, Seam 1).

    y = base(x) + scale * B(A(dropout(x)))                          LoRA (Hu et al. 2021)
    scale = alpha / r, or alpha / sqrt(r) with rsLoRA               (Kalajdzievski 2023)
    y = m / ||W + scale*B@A||_row * (W + scale*B@A) x + bias        DoRA (Liu et al. 2024): magnitude m
                                                                    times the direction; the norm is
                                                                    treated as a constant in backward
    y = base(x) + alpha / r0 * B diag(E) A x                        AdaLoRA (Zhang et al. 2023): SVD form,
                                                                    E's entries pruned by importance
                                                                    (lmstack.peft.adalora)
    y = base(x) + scale_b * B[:, :b] A[:b] x, b ~ U{1..r}           DyLoRA (Valipour et al. 2023): every
                                                                    prefix rank b is trained, any b <= r
                                                                    can be served

`base_layer` is `nn.Linear` or any module with the linear contract (NF4, int8 ...): QLoRA is this
class around an NF4 module. Several adapters can live side by side (`lora_A["default"]`,
`lora_A["chat"]` ...) and `active_adapter` selects which one runs, so one base serves many adapters.
Parameter names are the PEFT library's (`lora_A`, `lora_B`, `lora_magnitude_vector`, `lora_E`),
which is what makes the adapter files interchangeable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def base_weight(layer: nn.Module) -> Tensor:
    """The slot's float weight (out, in): `weight` of nn.Linear, `dequantize()` of quantized modules."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    return layer.dequantize()


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m (out,)
        self.lora_E = nn.ParameterDict()  # AdaLoRA's singular values (r, 1)
        self.lora_dropout = nn.ModuleDict()
        self.kind: dict[str, str] = {}  # adapter -> "lora" | "dora" | "dylora" | "adalora"
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self.serve_rank: int | None = None  # DyLoRA: the rank used at inference (None: all)

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, kind: str = "lora", use_rslora: bool = False
    ) -> None:
        """A fresh adapter: A random (Kaiming uniform, as PEFT), B zero, so the model starts unchanged."""
        weight = base_weight(self.base_layer)
        device, dtype = weight.device, (weight.dtype if weight.is_floating_point() else torch.float32)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        if kind == "adalora":  # PEFT's AdaLoRA init: E zero (the model starts unchanged), P and Q small normal
            nn.init.normal_(self.lora_A[name].weight, std=0.02)
            nn.init.normal_(self.lora_B[name].weight, std=0.02)
            self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        if kind == "dora":
            with torch.no_grad():
                norm = torch.linalg.vector_norm(weight.float(), dim=1).to(dtype)
            self.lora_magnitude_vector[name] = nn.Parameter(norm)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kind[name], self.lora_alpha[name], self.use_rslora[name] = kind, float(alpha), use_rslora
        self.active_adapter = name

    def rank(self, name: str) -> int:
        return self.lora_A[name].out_features

    def scaling(self, name: str, rank: int | None = None) -> float:
        r = rank or self.rank(name)
        return self.lora_alpha[name] / (math.sqrt(r) if self.use_rslora[name] else r)

    def _dylora_rank(self, name: str) -> int:
        r = self.rank(name)
        if self.training:
            return int(torch.randint(1, r + 1, ()))  # torch's RNG: checkpointed, so resume is exact
        return min(self.serve_rank or r, r)

    def delta_weight(self, name: str) -> Tensor:
        """scale * B @ A (out, in) in fp32: what merging adds to the base weight (before DoRA's rescale)."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        kind = self.kind[name]
        if kind == "dylora":
            b = min(self.serve_rank or self.rank(name), self.rank(name))
            return B[:, :b] @ A[:b] * self.scaling(name, b)
        if kind == "adalora":
            return B @ (A * self.lora_E[name].float()) * self.scaling(name)
        return B @ A * self.scaling(name)

    def forward(self, x: Tensor) -> Tensor:
        name = self.active_adapter
        if name is None or name not in self.lora_A:
            return self.base_layer(x)
        kind = self.kind[name]
        if kind == "lora" and torch.is_autocast_enabled(x.device.type):
            return self._lora_autocast(x, name)
        out = self.base_layer(x)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        h = self.lora_dropout[name](x).to(A.dtype)
        if kind == "dora":
            return self._dora(out, x, h, name)
        if kind == "dylora":
            b = self._dylora_rank(name)
            delta = F.linear(F.linear(h, A[:b]), B[:, :b]) * self.scaling(name, b)
        elif kind == "adalora":
            delta = F.linear(F.linear(h, A * self.lora_E[name]), B) * self.scaling(name)
        else:
            delta = F.linear(F.linear(h, A), B) * self.scaling(name)
        return out + delta.to(out.dtype)

    def _lora_autocast(self, x: Tensor, name: str) -> Tensor:
        """base(x) + scale * B(A(x)) under autocast (mixed-precision training), in the autocast dtype.

        x is cast once and both branches read that copy (the fp32 path casts it for the base and again for
        the adapter); the scale and the sum ride in one addmm, so beyond the base GEMM nothing runs over
        the (tokens, out_features) output: no scaling pass and no separate add, forward or backward.
        """
        xb = x.to(torch.get_autocast_dtype(x.device.type))
        out = self.base_layer(xb)
        t = F.linear(self.lora_dropout[name](xb), self.lora_A[name].weight)  # (..., r); autocast casts A
        B = self.lora_B[name].weight
        y = torch.addmm(out.reshape(-1, out.shape[-1]), t.reshape(-1, t.shape[-1]), B.t(), alpha=self.scaling(name))
        return y.view(out.shape)

    def _dora(self, out: Tensor, x: Tensor, h: Tensor, name: str) -> Tensor:
        """out = base(x); returns m/||W'|| * (W' h) + bias with W' = W + scale*B@A, as PEFT computes it."""
        weight = base_weight(self.base_layer)
        A, B, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling(name)
        merged = weight.float() + scale * (B.float() @ A.float())
        norm = torch.linalg.vector_norm(merged, dim=1).detach()  # a constant in backward (DoRA sec. 4.3)
        factor = (self.lora_magnitude_vector[name].float() / norm).to(out.dtype)  # (out,)
        base_no_bias = out if self.bias is None else out - self.bias
        if not isinstance(self.lora_dropout[name], nn.Identity):
            base_no_bias = F.linear(h.to(weight.dtype), weight)
        lora = F.linear(F.linear(h, A), B) * scale
        return out + (factor - 1) * base_no_bias + factor * lora.to(out.dtype)

    @torch.no_grad()
    def merged_weight(self, name: str) -> Tensor:
        """The base weight with adapter `name` folded in, in the base weight's float dtype."""
        weight = base_weight(self.base_layer)
        merged = weight.float() + self.delta_weight(name)
        if self.kind[name] == "dora":
            merged = (
                merged * (self.lora_magnitude_vector[name].float() / torch.linalg.vector_norm(merged, dim=1))[:, None]
            )
        return merged.to(weight.dtype if weight.is_floating_point() else torch.float32)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: {self.kind[n]} r={self.rank(n)}" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={self.active_adapter}"
