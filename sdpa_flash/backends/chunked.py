"""``chunked``: an exact, memory-bounded attention in pure PyTorch (the FlashAttention tiling, not a kernel).

The forward walks key/value blocks with an online softmax (running row maximum ``m``, normaliser ``l``,
accumulator), per block of queries, and keeps only the output and the row log-sum-exp; the backward recomputes
each block's probabilities from that log-sum-exp (FlashAttention-2's backward equations):

    P = exp(S - lse),  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ += dS K * scale,
    dK += dS^T Q * scale.

So no (Sq, Sk) matrix is ever materialised: the peak extra memory is one (B, H, block_q, block_k) block. It is
what ``"auto"`` runs when no fused kernel can take a call and the math backend would materialise more than the
policy's memory budget; it accepts what math accepts except dropout. Dropout is declined, not approximated: it
would need its own mask stream, regenerated tile by tile in the backward (the same distribution as math's, other
bits), which is not implemented; under "auto" math (ranked above chunked on every device) runs dropout calls
anyway. Fully masked query rows give zeros, like PyTorch's math backend.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import SdpaFlashError
from ._base import Backend, KernelCall, KernelFn, Requirements

__all__ = ["ChunkedBackend", "chunked_attention"]

_ANY_FLOAT = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_BLOCK_BYTES = 64 * 2**20  # one (B, H, block_q, block_k) score block in the accumulation dtype


class ChunkedBackend(Backend):
    name = "chunked"
    fused = False
    memory = "O(N)"
    _REQ = Requirements(dtypes=_ANY_FLOAT, mask=True, dropout=False, native_gqa=False, kernel_causal="any",
                        mask_with_causal=True, deterministic_backward=True,  # plain ops, fixed order
                        window=True, softcap=True, sinks=True)  # exact: skipped tiles, tanh, one more column
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {"cuda": _REQ, "cpu": _REQ, "mps": _REQ, "xpu": _REQ}
    DIRECT_LABEL = "pure-PyTorch tiles"
    ROUTE_REASON = ("the tiled online softmax runs as ordinary PyTorch ops in this process (no fused kernel, no "
                    "dispatcher, no global flags change)")

    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        return _call


def _call(c: KernelCall) -> torch.Tensor:
    if c.dropout_p:
        raise SdpaFlashError("the chunked backend does not implement dropout")
    corner = c.causal if isinstance(c.causal, str) else ("top_left" if c.causal else None)
    return chunked_attention(c.q, c.k, c.v, c.bias, corner, c.scale, window=c.window, softcap=c.softcap,
                             sinks=c.sinks)


def _block_sizes(b: int, h: int, sq: int, sk: int, itemsize: int) -> tuple[int, int]:
    """Square-ish power-of-two blocks whose score tile stays under ``_BLOCK_BYTES``."""
    bq = bk = 1024
    while bq * bk * b * h * itemsize > _BLOCK_BYTES and bq * bk > 16 * 16:
        if bk >= bq:
            bk //= 2
        else:
            bq //= 2
    return min(bq, max(sq, 1)), min(bk, max(sk, 1))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Shape:
    """What hides keys besides the user's mask: the causal corner (``offset``: 0 top-left, Sk - Sq bottom-right)
    and the sliding window (bottom-right aligned: ``diag`` = Sk - Sq)."""

    def __init__(self, corner: str | None, offset: int, window: tuple[int | None, int | None] | None,
                 diag: int) -> None:
        self.corner, self.offset, self.diag = corner, offset, diag
        self.left, self.right = window if window is not None else (None, None)

    def past(self, q1: int, k0: int) -> bool:
        """No key from k0 on is visible from queries before q1 (the tiles to the right are hidden too)."""
        if self.corner is not None and k0 > q1 - 1 + self.offset:
            return True
        return self.right is not None and k0 > q1 - 1 + self.diag + self.right

    def before(self, q0: int, k1: int) -> bool:
        """No key before k1 is visible from queries from q0 on (the window's left edge is past the tile)."""
        return self.left is not None and k1 - 1 < q0 + self.diag - self.left

    def hidden(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor | None:
        """(q1 - q0, k1 - k0) boolean, True where a key is hidden from a query (``None``: nothing is)."""
        if self.corner is None and self.left is None and self.right is None:
            return None
        rel = (torch.arange(k0, k1, device=device).unsqueeze(0)
               - torch.arange(q0, q1, device=device).unsqueeze(1))  # j - i
        out = torch.zeros(rel.shape, dtype=torch.bool, device=device)
        if self.corner is not None:
            out |= rel > self.offset
        if self.left is not None:
            out |= rel < self.diag - self.left
        if self.right is not None:
            out |= rel > self.diag + self.right
        return out


def _block_bias(
    bias: torch.Tensor | None, shape: _Shape, q0: int, q1: int, k0: int, k1: int,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor | None:
    """The additive bias of one (q0:q1, k0:k1) tile: the user's mask slice plus the causal and window parts."""
    out = None
    if bias is not None:
        out = bias[..., q0:q1, k0:k1] if bias.shape[-2] != 1 else bias[..., :, k0:k1]
        if out.shape[-1] == 1 and k1 - k0 != 1:
            out = out.expand(*out.shape[:-1], k1 - k0)
        out = out.to(dtype)
    hidden = shape.hidden(q0, q1, k0, k1, device)
    if hidden is not None:
        part = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
        out = part if out is None else out + part
    return out


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                corner: str | None, scale: float, window: tuple[int | None, int | None] | None,
                softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        b, h, sq, _ = q.shape
        sk, dv = k.shape[-2], v.shape[-1]
        acc = _acc_dtype(q.dtype)
        shape = _Shape(corner, 0 if corner in (None, "top_left") else sk - sq, window, sk - sq)
        bq, bk = _block_sizes(b, h, sq, sk, torch.finfo(acc).bits // 8)
        out = torch.empty((b, h, sq, dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, sq), dtype=acc, device=q.device)
        sink = None if sinks is None else sinks.detach().to(acc).view(1, h, 1, 1)
        for q0 in range(0, sq, bq):
            q1 = min(q0 + bq, sq)
            qb = q[:, :, q0:q1].to(acc) * scale
            if sink is None:
                m = torch.full((b, h, q1 - q0, 1), float("-inf"), dtype=acc, device=q.device)
                l_ = torch.zeros((b, h, q1 - q0, 1), dtype=acc, device=q.device)
            else:  # the sink is one more column of the softmax, with no value: start the running sums from it
                m = sink.expand(b, h, q1 - q0, 1).clone()
                l_ = torch.ones((b, h, q1 - q0, 1), dtype=acc, device=q.device)
            o = torch.zeros((b, h, q1 - q0, dv), dtype=acc, device=q.device)
            for k0 in range(0, sk, bk):
                if shape.past(q1, k0):
                    break
                k1 = min(k0 + bk, sk)
                if shape.before(q0, k1):
                    continue
                s = qb @ k[:, :, k0:k1].to(acc).transpose(-1, -2)
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                tb = _block_bias(bias, shape, q0, q1, k0, k1, q.device, acc)
                if tb is not None:  # a hidden key stays hidden even when its score is NaN (as fused kernels)
                    s = torch.where(tb == float("-inf"), tb, s + tb)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                m_safe = m_new.masked_fill(torch.isinf(m_new) & (m_new < 0), 0.0)  # rows with nothing visible yet
                p = torch.exp(s - m_safe)
                corr = torch.exp(m - m_safe)
                l_ = l_ * corr + p.sum(-1, keepdim=True)
                o = o * corr + p @ v[:, :, k0:k1].to(acc)
                m = m_new
            empty = l_ == 0  # fully masked rows: output 0 (PyTorch's math backend gives 0 there too)
            out[:, :, q0:q1] = (o / l_.masked_fill(empty, 1.0)).to(q.dtype)
            lse[:, :, q0:q1] = (m + torch.log(l_)).masked_fill(empty, float("-inf")).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.bias, ctx.shape, ctx.scale, ctx.blocks, ctx.softcap = bias, shape, scale, (bq, bk), softcap
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, sinks = ctx.saved_tensors
        bias, shape, scale, (bq, bk), softcap = ctx.bias, ctx.shape, ctx.scale, ctx.blocks, ctx.softcap
        acc = lse.dtype
        sq, sk = q.shape[-2], k.shape[-2]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dvv = torch.zeros(v.shape, dtype=acc, device=q.device)
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O)
        lse_safe = lse.masked_fill(torch.isinf(lse), float("inf")).unsqueeze(-1)  # masked rows: P = 0
        for q0 in range(0, sq, bq):
            q1 = min(q0 + bq, sq)
            qb = q[:, :, q0:q1].to(acc)
            gb = grad_out[:, :, q0:q1].to(acc)
            for k0 in range(0, sk, bk):
                if shape.past(q1, k0):
                    break
                k1 = min(k0 + bk, sk)
                if shape.before(q0, k1):
                    continue
                kb, vb = k[:, :, k0:k1].to(acc), v[:, :, k0:k1].to(acc)
                s = (qb * scale) @ kb.transpose(-1, -2)
                if softcap is not None:
                    t = torch.tanh(s / softcap)
                    s = softcap * t
                tb = _block_bias(bias, shape, q0, q1, k0, k1, q.device, acc)
                if tb is not None:  # a hidden key stays hidden even when its score is NaN (as fused kernels)
                    s = torch.where(tb == float("-inf"), tb, s + tb)
                p = torch.exp(s - lse_safe[:, :, q0:q1])
                dvv[:, :, k0:k1] += p.transpose(-1, -2) @ gb
                ds = p * (gb @ vb.transpose(-1, -2) - delta[:, :, q0:q1])
                if softcap is not None:
                    ds = ds * (1.0 - t * t)  # d/ds of c * tanh(s / c)
                dq[:, :, q0:q1] += (ds @ kb) * scale
                dk[:, :, k0:k1] += (ds.transpose(-1, -2) @ qb) * scale
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[8]:
            # d lse / d sink = P(sink); the sink has no value, so dL/dsink = -sum over rows of P(sink) * rowsum(dO * O)
            p_sink = torch.exp(sinks.detach().to(acc).view(1, -1, 1, 1) - lse_safe)
            dsinks = -(p_sink * delta).sum((0, 2, 3)).to(sinks.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), None, None, None, None, None, dsinks


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    causal: str | None = None,
    scale: float | None = None,
    *,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention in blocks, O(S) extra memory. q ``(B, H, Sq, D)``, k ``(B, H, Sk, D)``, v ``(B, H, Sk, Dv)``.

    Args:
        bias: an additive float mask broadcastable to (B, H, Sq, Sk) (``-inf`` = masked), or ``None``.
        causal: ``None``, ``"top_left"`` or ``"bottom_right"``.
        scale: softmax scale; ``None`` is ``1/sqrt(D)``.
        window: ``(left, right)``, bottom-right aligned, ``None`` per side unbounded (see
            :data:`sdpa_flash.spec.Window`); tiles outside it are skipped.
        softcap: scores become ``softcap * tanh(score / softcap)`` (after the scale, before the mask).
        sinks: ``(H,)`` sink logits, one more softmax column per head with no value; differentiable.
    """
    if bias is not None and bias.requires_grad:
        raise SdpaFlashError("the chunked backend does not propagate gradients to attn_mask; detach it or use "
                             "policy='math'")
    if bias is not None:
        bias = bias.detach()
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _Chunked.apply(q, k, v, bias, causal, s, window, softcap, sinks)
