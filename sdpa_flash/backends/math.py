"""``SDPBackend.MATH``: PyTorch's composite reference. Any device, dtype, mask; O(S^2) memory."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import Backend, Requirements

__all__ = ["MathBackend"]

_ANY_FLOAT = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_MATH = Requirements(dtypes=_ANY_FLOAT, mask=True, native_gqa=False, kernel_causal="top_left",
                     mask_with_causal=False, deterministic_backward=True, mask_grad=True)  # composite ops, any strides


class MathBackend(Backend):
    name = "math"
    fused = False
    memory = "O(N^2)"
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {"cuda": _MATH, "cpu": _MATH, "mps": _MATH, "xpu": _MATH}

    def kernel(self, device_type: str, *, traced: bool = False):  # type: ignore[no-untyped-def]
        return _TRACED if traced else _EAGER


def _kernel(op):  # type: ignore[no-untyped-def]
    def call(q, k, v, bias, dropout_p, is_causal, scale, needs_lse):  # type: ignore[no-untyped-def]
        return op(q, k, v, bias, dropout_p, is_causal, scale=scale)[0]

    return call


_EAGER = _kernel(torch._scaled_dot_product_attention_math)
_TRACED = _kernel(torch.ops.aten._scaled_dot_product_attention_math.default)
