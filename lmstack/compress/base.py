"""What every quantized linear module shares: the Seam-1 contract of docs/architecture.md.

A quantized module stands in a linear slot (`q_proj`, `down_proj`, `lm_head`, ...) in place of
`nn.Linear`: `in_features`, `out_features`, `bias`, `forward(x (..., in)) -> (..., out)` in x's dtype,
`dequantize() -> (out, in)` float weight, and `concat_out(modules)` (rows of several modules in one,
so the engine can fuse q/k/v and gate/up). Its packed tensors are buffers, so they sit in the state
dict under the slot's name (`q_proj.qweight`, `q_proj.scales`, ...), and they are frozen: gradients
flow to the input (QLoRA trains adapters around a frozen NF4 base), never to the packed weight.

`model.to(torch.bfloat16)` casts the bias but never the packed buffers: a cast would round fp16
scales to bf16 or turn integer codes into floats. Moving devices moves everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import LmstackError

# method name -> class; every subclass with a `method` registers itself (see `QuantizedLinear.from_state`).
QUANTIZED_FORMATS: dict[str, type[QuantizedLinear]] = {}


class QuantizedLinear(nn.Module):
    """Base class: subclasses store packed buffers and implement `dequantize`, `_concat` and `config`."""

    # The name in config.json's "quantization" entry and in `QUANTIZED_FORMATS`.
    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method:
            QUANTIZED_FORMATS[cls.method] = cls

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], config: dict[str, Any]) -> QuantizedLinear:
        """Rebuild from the module's own state-dict tensors and its saved `config()` (+ in/out features).

        The default passes the tensors by name to the constructor (qweight, scales, mins, bias ...);
        formats whose constructor needs more (NF4's block sizes) override it."""
        return cls(**tensors)

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise LmstackError(f"bias of shape {tuple(bias.shape)} does not match out_features={out_features}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- the contract ---------------------------------------------------------------------------
    def dequantize(self) -> Tensor:
        """The float32 weight (out, in) these packed values stand for."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Reference path: dequantize then matmul in x's dtype. Subclasses with a kernel override it."""
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def config(self) -> dict[str, Any]:
        """Constructor settings recorded in config.json (method, bits, group size ...)."""
        return {"method": self.method}

    @classmethod
    def concat_out(cls, modules: Sequence[QuantizedLinear]) -> QuantizedLinear:
        """One module whose output rows are the given modules' rows, in order (fused q/k/v, gate/up)."""
        if not modules:
            raise LmstackError("concat_out needs at least one module")
        first = modules[0]
        for m in modules:
            if type(m) is not type(first) or m.config() != first.config() or m.in_features != first.in_features:
                raise LmstackError(
                    f"concat_out needs modules of one format and input size; got {type(m).__name__} "
                    f"{m.config()} in={m.in_features} beside {type(first).__name__} {first.config()}"
                )
        if any(m.bias is not None for m in modules) and not all(m.bias is not None for m in modules):
            raise LmstackError("concat_out: either all modules have a bias or none has")
        return first._concat(list(modules))

    def _concat(self, modules: list[QuantizedLinear]) -> QuantizedLinear:
        raise NotImplementedError

    @staticmethod
    def _concat_bias(modules: Sequence[QuantizedLinear]) -> Tensor | None:
        return None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])

    # -- helpers ---------------------------------------------------------------------------------
    def packed_bytes(self) -> int:
        """Bytes of packed weight data as stored (the persistent buffers; a kernel-side copy such as NF4's
        fp32 block absmax is not counted)."""
        return sum(
            b.numel() * b.element_size()
            for name, b in self._buffers.items()
            if b is not None and name not in self._non_persistent_buffers_set
        )

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "method")
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bias={self.bias is not None}, {settings}"

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        # Packed buffers follow device moves but never dtype casts (see the module docstring).
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None}
        for name in saved:
            del self._buffers[name]
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in saved.items():
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self


def check_linear(linear: nn.Module, what: str) -> None:
    """A clear error for quantizing something that is not a plain float linear layer."""
    if isinstance(linear, QuantizedLinear):
        raise LmstackError(
            f"{what}: the layer is already quantized ({linear.method}); quantize the original float model instead"
        )
    if not isinstance(linear, nn.Linear):
        raise LmstackError(f"{what}: expected an nn.Linear, got {type(linear).__name__}")
    if not linear.weight.is_floating_point():
        raise LmstackError(f"{what}: the weight is {linear.weight.dtype}, not a float tensor")


def check_group_size(group_size: int, in_features: int, what: str, multiple_of: int = 1) -> None:
    if group_size <= 0 or group_size % multiple_of:
        raise LmstackError(f"{what}: group size {group_size} must be a positive multiple of {multiple_of}")
    if in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise LmstackError(
            f"{what}: group size {group_size} does not divide the layer's {in_features} input features; "
            f"choose one that does ({', '.join(map(str, divisors)) or 'none of 32/64/128/256 do'})"
        )
