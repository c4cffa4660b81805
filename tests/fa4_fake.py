"""A stand-in for FlashAttention-4's interface module (``flash_attn.cute.interface``, 4.0.0b36) on the CPU.

It has FA4's entry points with FA4's argument conventions — (B, S, H, D) layout, bottom-right causal, the
window resolution of 4.0.0b36 (a side is reset to unbounded only when *both* are negative, so ``(-1, 0)`` is an
empty band), float16/bfloat16 only, ``cu_seqlens`` int32 with Python-int ``max_seqlen`` — and computes the
result with plain float32 PyTorch, so the CPU tests can check how sdpa_flash calls FA4: layouts, causal
corners, GQA, windows, softcap and ``learnable_sink`` (dense and packed, each sequence of a packed batch aligned
to its own corner; the sink's gradient comes from autograd through the float32 arithmetic, as FA4's own
``autograd.Function`` gives it), packed batches and the custom ops' autograd. It records every call in ``CALLS``.
The numbers it gives are float32 attention rounded to the input dtype, not FA4's kernel.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

CALLS: list[tuple[str, dict[str, Any]]] = []


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for t in (q, k, v):
        assert t.dtype in (torch.float16, torch.bfloat16), f"FA4 takes float16/bfloat16, got {t.dtype}"
        assert t.stride(-1) == 1, "FA4 needs the head dim contiguous"
    assert q.shape[-2] % k.shape[-2] == 0, "GQA: H must be a multiple of Hkv"


def _resolve(causal: bool, left: int | None, right: int | None) -> tuple[int | None, int | None]:
    """(left, right) visible offsets as FA4 4.0.0b36 resolves them (``None`` = unbounded)."""
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    return left, right


def _visible(sq: int, sk: int, causal: bool, left: int | None, right: int | None) -> torch.Tensor:
    """(Sq, Sk) True where query i sees key j: the window around the bottom-right diagonal, as FA4 resolves it."""
    left, right = _resolve(causal, left, right)
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left is not None:
        visible &= j >= i - left
    if right is not None:
        visible &= j <= i + right
    return visible


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
            left: int | None, right: int | None, softcap: float, sink: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence batch in (B, S, H, D): (out in q's dtype, lse (B, H, Sq) float32)."""
    _b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    if hkv != h:
        kf, vf = kf.repeat_interleave(h // hkv, 1), vf.repeat_interleave(h // hkv, 1)
    s = qf @ kf.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~_visible(sq, sk, causal, left, right), float("-inf"))
    if sink is not None:  # FA4's learnable_sink: one more column of the softmax, per head, with no value
        assert sink.shape == (h,) and sink.dtype == torch.float32, "learnable_sink: (H,) float32 here"
        lse = torch.logsumexp(torch.cat([s, sink.view(1, h, 1, 1).expand(*s.shape[:-1], 1)], -1), -1)
    else:
        lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = (p @ vf).transpose(1, 2).to(q.dtype)
    return out, lse


def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,  # type: ignore[no-untyped-def]
                    window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                    deterministic=False, **unused):
    CALLS.append(("flash_attn_func", {"causal": causal, "window_size": window_size, "deterministic": deterministic,
                                      "q_stride": q.stride(), "shape": tuple(q.shape), "softcap": softcap,
                                      "sink": learnable_sink is not None}))
    _check(q, k, v)
    out, lse = _attend(q, k, v, softmax_scale, causal, *window_size, softcap, learnable_sink)
    return out, lse


def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,  # type: ignore[no-untyped-def]
                           max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None,
                           gather_kv_indices=None, page_table=None, softmax_scale=None, causal=False,
                           window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                           deterministic=False, **unused):
    CALLS.append(("flash_attn_varlen_func", {"causal": causal, "window_size": window_size,
                                             "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k,
                                             "deterministic": deterministic, "softcap": softcap,
                                             "sink": learnable_sink is not None}))
    _check(q, k, v)
    for cu in (cu_seqlens_q, cu_seqlens_k):
        assert cu is not None and cu.dtype == torch.int32 and cu.stride(0) == 1, "cu_seqlens: int32, contiguous"
    for m in (max_seqlen_q, max_seqlen_k):
        assert isinstance(m, int), "pass max_seqlen as a Python int (a tensor recompiles every call)"
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max(b - a for a, b in itertools.pairwise(cq)) <= max_seqlen_q
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi, ki, vi = q[cq[i]:cq[i + 1]][None], k[ck[i]:ck[i + 1]][None], v[ck[i]:ck[i + 1]][None]
        # per sequence, as FA4 aligns causal masking and the window: each sequence's own bottom-right corner
        o, lse = _attend(qi, ki, vi, softmax_scale, causal, *window_size, softcap, learnable_sink)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, -1)


def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,  # type: ignore[no-untyped-def]
                    max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
                    causal=False, softcap=None, window_size_left=None, window_size_right=None, learnable_sink=None,
                    return_lse=False, **unused):
    CALLS.append(("_flash_attn_fwd", {"causal": causal, "window": (window_size_left, window_size_right),
                                      "softcap": softcap, "sink": learnable_sink is not None,
                                      "q_stride": q.stride(), "shape": tuple(q.shape), "return_lse": return_lse}))
    _check(q, k, v)
    assert cu_seqlens_q is None and page_table is None, "the fake covers the dense forward only"
    out, lse = _attend(q, k, v, softmax_scale, causal, window_size_left, window_size_right, softcap or 0.0,
                       learnable_sink)
    return out, lse if return_lse else None, None, None, None  # b36 returns five values


def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,  # type: ignore[no-untyped-def]
                    window_size_left=None, window_size_right=None, deterministic=False, learnable_sink=None,
                    **unused):
    """The attention backward written out (a custom op's kernel runs below autograd, so no autograd here)."""
    CALLS.append(("_flash_attn_bwd", {"causal": causal, "window": (window_size_left, window_size_right),
                                      "deterministic": deterministic, "dout_stride": dout.stride()}))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    rep = h // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qf, kf, vf, of, gf = (t.float().transpose(1, 2) for t in (q, k, v, out, dout))
    kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
    raw = qf @ kf.transpose(-1, -2) * scale
    s = torch.tanh(raw / softcap) * softcap if softcap else raw
    s = s.masked_fill(~_visible(sq, sk, causal, window_size_left, window_size_right), float("-inf"))
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # lse has the sink's column in it, when there is one
    dv = p.transpose(-1, -2) @ gf
    dp = gf @ vf.transpose(-1, -2)
    delta = (gf * of).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if softcap:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    dk = dk.view(b, hkv, rep, sk, d).sum(2)
    dv = dv.view(b, hkv, rep, sk, v.shape[-1]).sum(2)
    grads = tuple(g.transpose(1, 2).to(q.dtype) for g in (dq, dk, dv))
    if learnable_sink is None:
        return grads
    dsink = -(torch.exp(learnable_sink.view(1, h, 1, 1) - lse[..., None]) * delta).sum((0, 2, 3))
    return (*grads, dsink)
