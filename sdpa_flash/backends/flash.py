"""``SDPBackend.FLASH_ATTENTION``: FlashAttention-2 on CUDA, PyTorch's own flash kernel on the CPU."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..capability import Capabilities
from ..spec import AttentionSpec
from ._base import Backend, Requirements, with_plain

__all__ = ["FlashBackend"]


class FlashBackend(Backend):
    name = "flash"
    sdp_backend = "FLASH_ATTENTION"
    TORCH_CHECK = "can_use_flash_attention"
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {
        # PyTorch's CUDA flash kernel is flash-attn 2: causal is aligned bottom-right when Sq != Sk (which is
        # why PyTorch's own check refuses is_causal there), no masks, GQA read in place, q/k/v head dims equal.
        "cuda": Requirements(
            dtypes=frozenset((torch.float16, torch.bfloat16)),
            min_cc=(8, 0),
            max_head_dim=256,
            head_dim_multiple=8,
            same_head_dim_v=True,
            native_gqa=True,
            kernel_causal="bottom_right",
            contiguous_last_dim=True,
            # PyTorch passes deterministic=True to FlashAttention-2's backward under deterministic mode.
            deterministic_backward=True,
        ),
        # The CPU kernel: blocked online softmax; masks yes, dropout no, any head dim, top-left causal. Dropout: torch
        # 2.13's aten._scaled_dot_product_flash_attention_for_cpu raises "Currently do not support dropout > 0"
        # (checked), so CPU dropout calls run on math (a fallback under "auto", with its warning).
        "cpu": Requirements(
            dtypes=frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64)),
            same_head_dim_v=True,
            mask=True,
            dropout=False,
            native_gqa=True,
            kernel_causal="top_left",
            contiguous_last_dim=True,  # it reads the head dim at stride 1 whatever the tensor's stride
            # One thread owns each (batch, head)'s gradients, in a fixed loop order: no atomics, and the same
            # bits whatever the thread count (measured, torch 2.13).
            deterministic_backward=True,
        ),
    }

    def extra_reasons(self, spec: AttentionSpec, caps: Capabilities) -> list[str]:
        cc = caps.compute_capability
        # sm86-sm89 (and sm120/121) lack the shared memory for the large-head-dim backward kernels.
        if cc is not None and spec.needs_grad and ((8, 6) <= cc <= (8, 9) or (12, 0) <= cc <= (12, 1)):
            if (spec.head_dim > 224 and spec.dropout) or 192 < spec.head_dim <= 224:
                return [f"backward with head_dim={spec.head_dim} needs more shared memory than {caps.arch} has"]
        return []

    VARLEN = True

    def varlen_reasons(self, spec: AttentionSpec, caps: Capabilities) -> list[str]:
        if caps.device_type != "cuda":
            return [f"the flash varlen kernel is CUDA only (this is {caps.device_type})"]
        return super().varlen_reasons(spec, caps)  # (equal head dims, multiples of 8: the requirements data)

    def varlen(self):  # type: ignore[no-untyped-def]
        return _flash_varlen

    def kernel(self, device_type: str, *, traced: bool = False):  # type: ignore[no-untyped-def]
        if device_type == "cpu":
            return _CPU_TRACED if traced else _CPU
        return _CUDA_TRACED if traced else _CUDA

    def _call(self, q, k, v, bias, dropout_p, is_causal, scale, needs_lse):  # type: ignore[no-untyped-def]
        return _CUDA(q, k, v, bias, dropout_p, is_causal, scale, needs_lse)


def _cuda_kernel(op):  # type: ignore[no-untyped-def]
    def call(q, k, v, bias, dropout_p, is_causal, scale, needs_lse):  # type: ignore[no-untyped-def]
        return op(q, k, v, dropout_p, is_causal, False, scale=scale)[0]

    def plain(is_causal, needs_lse):  # type: ignore[no-untyped-def]
        def run(q, k, v, attn_mask, dropout_p, scale):  # type: ignore[no-untyped-def]
            return op(q, k, v, dropout_p, is_causal, False, scale=scale)[0]

        return run

    return with_plain(call, plain)


def _cpu_kernel(op):  # type: ignore[no-untyped-def]
    def call(q, k, v, bias, dropout_p, is_causal, scale, needs_lse):  # type: ignore[no-untyped-def]
        if bias is not None and bias.dim() not in (2, 4):  # the kernel takes 2-D or 4-D masks only
            bias = bias[(None,) * (4 - bias.dim())]
        return op(q, k, v, dropout_p, is_causal, attn_mask=bias, scale=scale)[0]

    def plain(is_causal, needs_lse):  # type: ignore[no-untyped-def]
        def run(q, k, v, attn_mask, dropout_p, scale):  # type: ignore[no-untyped-def]
            return op(q, k, v, dropout_p, is_causal, scale=scale)[0]

        return run

    return with_plain(call, plain)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale):  # type: ignore[no-untyped-def]
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, False,
                                                   scale=scale)[0]


_CUDA = _cuda_kernel(torch._scaled_dot_product_flash_attention)
_CUDA_TRACED = _cuda_kernel(torch.ops.aten._scaled_dot_product_flash_attention.default)
_CPU = _cpu_kernel(torch._scaled_dot_product_flash_attention_for_cpu)
_CPU_TRACED = _cpu_kernel(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
