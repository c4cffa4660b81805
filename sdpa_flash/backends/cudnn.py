"""``SDPBackend.CUDNN_ATTENTION``: cuDNN's fused attention (the fastest kernel on Hopper and Blackwell)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..spec import AttentionSpec
from ._base import Backend, Device, KernelCall, KernelFn, KernelOptions, Requirements, Runner, with_plain

__all__ = ["CudnnBackend"]


class CudnnBackend(Backend):
    name = "cudnn"
    TORCH_CHECK = "can_use_cudnn_attention"
    # PyTorch turns a boolean mask into -65504 rather than -inf for cuDNN (a cuDNN -inf workaround).
    MASKED_VALUE = -65504.0
    ZERO_MASKED_ROWS = True  # with a finite MASKED_VALUE a row that sees no key would average V
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {
        "cuda": Requirements(
            dtypes=frozenset((torch.float16, torch.bfloat16)),
            min_cc=(8, 0),
            max_head_dim=256,
            head_dim_multiple=8,
            mask=True,
            native_gqa=True,
            # cuDNN's corner for non-square causal is not established: such calls are made square or masked.
            kernel_causal=None,
            min_cudnn=90000,
            contiguous_last_dim=True,
            # PyTorch: "cuDNN SDPA is not deterministic" (can_use_cudnn_attention declines it in that mode).
            deterministic_backward=False,
        ),
    }

    def extra_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        reasons = []
        cc = caps.compute_capability
        big = max(spec.head_dim, spec.head_dim_v)
        if big > 128 and cc is not None and cc[0] not in (9, 10):
            reasons.append(f"head_dim={big} (supported: <= 128 on {caps.arch}; up to 256 on sm90/sm100)")
        if spec.seqlen_k == 1:
            reasons.append("seqlen_k=1 is not supported by cuDNN attention")
        elif spec.seqlen_q == 1 and spec.effective_causal == "top_left":  # the call runs on its first key alone
            reasons.append("seqlen_q=1 with top-left causal sees one key, and seqlen_k=1 is not supported by cuDNN "
                           "attention (the call would run on the first key only)")
        if spec.seqlen_q == 1 and spec.dropout:
            reasons.append("seqlen_q=1 with dropout is not supported by cuDNN attention")
        if spec.batch > 65535 or spec.heads_q > 65535:
            reasons.append(f"batch={spec.batch}, heads={spec.heads_q} (supported: <= 65535 each)")
        return reasons

    def missing_reason(self, device: torch.device) -> str | None:
        # A CUDA build with cuDNN; ROCm builds report a cuDNN version (MIOpen) but have no cuDNN attention.
        if device.type == "cuda" and (not torch.backends.cudnn.is_available() or torch.backends.cudnn.version() is None
                                      or getattr(torch.version, "hip", None)):
            return f"this PyTorch ({torch.__version__}) has no cuDNN attention"
        return super().missing_reason(device)

    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        return _TRACED if traced else _EAGER

    def autograd_ops(self, device_type: str) -> tuple[Callable[..., object], Callable[..., object]] | None:
        return (_forward, _backward) if device_type == "cuda" else None


def _kernel(op: Callable[..., Any]) -> KernelFn:
    def call(c: KernelCall) -> torch.Tensor:
        q, k, bias = c.q, c.k, c.bias
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return op(q, k, c.v, bias, c.needs_lse, c.dropout_p, c.causal, False, scale=c.scale)[0]

    def plain(options: KernelOptions) -> Runner:
        is_causal, needs_lse = options.causal, options.needs_lse

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                dropout_p: float, scale: float | None) -> torch.Tensor:
            return op(q, k, v, None, needs_lse, dropout_p, is_causal, False, scale=scale)[0]

        return run

    return with_plain(call, plain)


_EAGER = _kernel(torch._scaled_dot_product_cudnn_attention)
_TRACED = _kernel(torch.ops.aten._scaled_dot_product_cudnn_attention.default)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
             lse: bool) -> tuple[torch.Tensor, tuple[Any, ...]]:
    r = torch._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, is_causal, False, scale=scale)
    return r[0], (r[1], r[6], r[7], r[4], r[5])


def _backward(go: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              saved: tuple[Any, ...], is_causal: bool, scale: float | None) -> tuple[torch.Tensor, ...]:
    lse, seed, offset, max_q, max_k = saved
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        go, q, k, v, out, lse, seed, offset, None, None, None, max_q, max_k, 0.0, is_causal, scale=scale)
