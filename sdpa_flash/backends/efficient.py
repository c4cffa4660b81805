"""``SDPBackend.EFFICIENT_ATTENTION``: the memory-efficient (xformers/CUTLASS) kernel; takes additive biases."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import Backend, Requirements, with_plain

__all__ = ["EfficientBackend"]

_BIAS_ALIGN = 16  # the kernel reads the bias in 16-element rows; PyTorch pads it the same way


class EfficientBackend(Backend):
    name = "efficient"
    sdp_backend = "EFFICIENT_ATTENTION"
    TORCH_CHECK = "can_use_efficient_attention"
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {
        "cuda": Requirements(
            dtypes=frozenset((torch.float16, torch.bfloat16, torch.float32)),
            min_cc=(5, 0),
            bf16_min_cc=(8, 0),
            head_dim_multiple=8,
            mask=True,
            native_gqa=False,
            kernel_causal="top_left",
        ),
    }

    def kernel(self, device_type: str, *, traced: bool = False):  # type: ignore[no-untyped-def]
        return _TRACED if traced else _EAGER

    def _call(self, q, k, v, bias, dropout_p, is_causal, scale, needs_lse):  # type: ignore[no-untyped-def]
        return _EAGER(q, k, v, bias, dropout_p, is_causal, scale, needs_lse)


def _kernel(op):  # type: ignore[no-untyped-def]
    def call(q, k, v, bias, dropout_p, is_causal, scale, needs_lse):  # type: ignore[no-untyped-def]
        if bias is not None:
            bias = _aligned_bias(bias, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return op(q, k, v, bias, needs_lse, dropout_p, is_causal, scale=scale)[0]

    def plain(is_causal, needs_lse):  # type: ignore[no-untyped-def]
        def run(q, k, v, attn_mask, dropout_p, scale):  # type: ignore[no-untyped-def]
            return op(q, k, v, None, needs_lse, dropout_p, is_causal, scale=scale)[0]

        return run

    return with_plain(call, plain)


def _aligned_bias(bias: torch.Tensor, b: int, h: int, sq: int, sk: int) -> torch.Tensor:
    """Expand ``bias`` to (B, H, Sq, Sk) with a row stride that is a multiple of 16 elements."""
    bias = bias.expand(b, h, sq, sk)
    if (bias.stride(-2) % _BIAS_ALIGN == 0 and bias.stride(-1) == 1) or bias.stride(-2) == 0:
        return bias
    padded = -(-sk // _BIAS_ALIGN) * _BIAS_ALIGN
    out = torch.empty(b, h, sq, padded, dtype=bias.dtype, device=bias.device)[..., :sk]
    return out.copy_(bias)


_EAGER = _kernel(torch._scaled_dot_product_efficient_attention)
_TRACED = _kernel(torch.ops.aten._scaled_dot_product_efficient_attention.default)
