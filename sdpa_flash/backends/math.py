"""``SDPBackend.MATH``: PyTorch's composite reference. Any device, dtype, mask; O(S^2) memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ._base import Backend, KernelCall, KernelFn, Requirements

__all__ = ["MathBackend"]

_ANY_FLOAT = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_MATH = Requirements(dtypes=_ANY_FLOAT, mask=True, native_gqa=False, kernel_causal="top_left",
                     mask_with_causal=False, deterministic_backward=True, mask_grad=True)  # composite ops, any strides


class MathBackend(Backend):
    name = "math"
    fused = False
    memory = "O(N^2)"
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {"cuda": _MATH, "cpu": _MATH, "mps": _MATH, "xpu": _MATH}

    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        return _TRACED if traced else _EAGER


def _kernel(op: Callable[..., Any]) -> KernelFn:
    def call(c: KernelCall) -> torch.Tensor:
        return op(c.q, c.k, c.v, c.bias, c.dropout_p, c.causal, scale=c.scale)[0]

    return call


_EAGER = _kernel(torch._scaled_dot_product_attention_math)
_TRACED = _kernel(torch.ops.aten._scaled_dot_product_attention_math.default)
