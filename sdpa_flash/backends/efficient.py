"""``SDPBackend.EFFICIENT_ATTENTION``: the memory-efficient (xformers/CUTLASS) kernel; takes additive biases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ._base import Backend, KernelCall, KernelFn, KernelOptions, Requirements, Runner, with_plain

__all__ = ["EfficientBackend"]

_BIAS_ALIGN = 16  # the kernel reads the bias in 16-element rows; PyTorch pads it the same way


class EfficientBackend(Backend):
    name = "efficient"
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
            contiguous_last_dim=True,
            # Under deterministic mode PyTorch runs its backward with num_splits_key=1 (no split-key atomics).
            deterministic_backward=True,
            mask_grad=True,  # its backward returns the attn_bias gradient
        ),
    }

    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        return _TRACED if traced else _EAGER


def _kernel(op: Callable[..., Any]) -> KernelFn:
    def call(c: KernelCall) -> torch.Tensor:
        q, k, bias = c.q, c.k, c.bias
        if bias is not None:
            bias = _aligned_bias(bias, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return op(q, k, c.v, bias, c.needs_lse, c.dropout_p, c.causal, scale=c.scale)[0]

    def plain(options: KernelOptions) -> Runner:
        is_causal, needs_lse = options.causal, options.needs_lse

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                dropout_p: float, scale: float | None) -> torch.Tensor:
            return op(q, k, v, None, needs_lse, dropout_p, is_causal, scale=scale)[0]

        return run

    return with_plain(call, plain)


def _aligned_bias(bias: torch.Tensor, b: int, h: int, sq: int, sk: int) -> torch.Tensor:
    """``bias`` as the kernel reads it: (B, H, Sq, Sk), last dim contiguous, every other stride a multiple of 16
    elements (0 included, so broadcast dims stay broadcast).

    The kernel checks the batch, head and row strides alike (a (B, 1, 1, Sk) key mask has batch stride Sk, which
    it refuses unless Sk is a multiple of 8), so a bias that does not qualify is copied once at its own
    broadcast shape, keys padded to 16, and expanded from there.
    """
    full = bias.expand(b, h, sq, sk)
    if full.stride(-1) == 1 and all(st % _BIAS_ALIGN == 0 for st in full.stride()[:-1]):
        return full
    shape = [1] * (4 - bias.dim()) + list(bias.shape)
    shape[-1] = sk  # the kernel reads keys contiguously: a bias broadcast over keys is materialised along them
    padded = -(-sk // _BIAS_ALIGN) * _BIAS_ALIGN
    out = torch.empty(*shape[:-1], padded, dtype=bias.dtype, device=bias.device)[..., :sk]
    out.copy_(bias.reshape([1] * (4 - bias.dim()) + list(bias.shape)).expand(shape))
    return out.expand(b, h, sq, sk)


_EAGER = _kernel(torch._scaled_dot_product_efficient_attention)
_TRACED = _kernel(torch.ops.aten._scaled_dot_product_efficient_attention.default)
