"""A CPU model of PyTorch's packed flash ops (``aten._flash_attention_forward`` / ``_backward`` with ``cu_seqlens``,
FlashAttention-2), for the CPU tests of how sdpa_flash calls them: the flash backend's packed kernel looks the ops
up in ``sdpa_flash.backends.flash._PACKED_FWD`` / ``_PACKED_BWD``, which a test replaces with these.

The conventions are the kernel's as far as the calls depend on them: packed ``(T, H, D)`` tensors, int32
``cu_seqlens``, causal masking and ``window_size_left/right`` aligned to each sequence's bottom-right corner, ``-1``
an unbounded side, GQA read in place, the log-sum-exp returned as ``(H, T)`` float32 (``+inf`` on a row that sees no
key, whose output is 0), and a backward that recomputes the probabilities from the ``out`` and ``logsumexp`` it is
given (FlashAttention-2's equations: ``dS = P * (dP - rowsum(dO * O))``). The arithmetic is float32 PyTorch, not the
kernel's. Every call is recorded in ``CALLS``.

Dense calls (``cu_seqlens`` ``None``: ``(B, S, H, D)`` tensors, the log-sum-exp ``(B, H, S)``, as the op gives them)
are modelled as a packed batch of ``B`` equal sequences.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

CALLS: list[tuple[str, dict[str, Any]]] = []


def _visible(lq: int, lk: int, causal: bool, left: int, right: int) -> torch.Tensor:
    rel = torch.arange(lk)[None, :] - (torch.arange(lq)[:, None] + lk - lq)
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        keep &= rel <= 0
    if left >= 0:
        keep &= rel >= -left
    if right >= 0:
        keep &= rel <= right
    return keep


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """(H, Lq, Lk) float32 scaled scores, -inf where hidden; GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(rep, 1)) * scale
    return s.masked_fill(~keep, float("-inf"))


def _spans(cu: torch.Tensor) -> list[tuple[int, int]]:
    host = cu.tolist()
    return list(itertools.pairwise(host))


def _dense_as_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, H, D) tensors as B packed sequences: the flattened tensors and their int32 cu_seqlens."""
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    cu_q, cu_k = (torch.arange(0, b * s + 1, max(s, 1), dtype=torch.int32)[: b + 1] for s in (sq, sk))
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor | None,
            cu_k: torch.Tensor | None, max_q: int, max_k: int, dropout_p: float, is_causal: bool,
            return_debug_mask: bool, *, scale: float | None = None, window_size_left: int | None = None,
            window_size_right: int | None = None, **unused: Any) -> tuple[torch.Tensor, ...]:
    if cu_q is None:
        b, sq = q.shape[:2]
        out, lse, *rest = forward(*_dense_as_packed(q, k, v), max_q, max_k, dropout_p, is_causal, return_debug_mask,
                                  scale=scale, window_size_left=window_size_left,
                                  window_size_right=window_size_right)
        CALLS[-1][1]["dense"] = True
        return (out.unflatten(0, (b, sq)), lse.unflatten(1, (b, sq)).transpose(0, 1).contiguous(), *rest)
    CALLS.append(("forward", {"causal": is_causal, "window": (window_size_left, window_size_right),
                              "dropout_p": dropout_p}))
    assert q.dtype in (torch.float16, torch.bfloat16) and cu_q.dtype == cu_k.dtype == torch.int32
    assert dropout_p == 0.0, "the model has no dropout"
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
    for (a, b), (c, d) in zip(_spans(cu_q), _spans(cu_k), strict=True):
        if b == a or d == c:
            continue
        s = _scores(q[a:b], k[c:d], sc, _visible(b - a, d - c, is_causal, left, right))
        m = torch.logsumexp(s, -1)  # (H, Lq)
        p = torch.exp(s - m[..., None]).nan_to_num(0.0)
        rep = q.shape[1] // k.shape[1]
        out[a:b] = torch.einsum("hqk,khd->qhd", p, v[c:d].float().repeat_interleave(rep, 1)).to(q.dtype)
        lse[:, a:b] = torch.where(torch.isneginf(m), float("inf"), m)  # FlashAttention-2: +inf where no key
    return out, lse, torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64), torch.empty(0)


def backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int, max_k: int,
             dropout_p: float, is_causal: bool, rng: torch.Tensor, unused: torch.Tensor, *, scale: float | None = None,
             window_size_left: int | None = None, window_size_right: int | None = None, **rest: Any
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if cu_q is None:
        assert tuple(lse.shape) == (q.shape[0], q.shape[2], q.shape[1]), "dense: the log-sum-exp is (B, H, S)"
        qf, kf, vf, cq, ck = _dense_as_packed(q, k, v)
        dq, dk, dv = backward(grad.flatten(0, 1), qf, kf, vf, out.flatten(0, 1), lse.transpose(0, 1).flatten(1), cq,
                              ck, max_q, max_k, dropout_p, is_causal, rng, unused, scale=scale,
                              window_size_left=window_size_left, window_size_right=window_size_right)
        return dq.unflatten(0, q.shape[:2]), dk.unflatten(0, k.shape[:2]), dv.unflatten(0, v.shape[:2])
    CALLS.append(("backward", {"causal": is_causal, "window": (window_size_left, window_size_right)}))
    assert tuple(lse.shape) == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    rep = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    for (a, b), (c, d) in zip(_spans(cu_q), _spans(cu_k), strict=True):
        if b == a or d == c:
            continue
        s = _scores(q[a:b], k[c:d], sc, _visible(b - a, d - c, is_causal, left, right))
        p = torch.exp(s - lse[:, a:b, None]).nan_to_num(0.0)  # from the logsumexp given, as the kernel does
        do, o = grad[a:b].float(), out[a:b].float()
        kk, vv = (t[c:d].float().repeat_interleave(rep, 1) for t in (k, v))
        dp = torch.einsum("qhd,khd->hqk", do, vv)
        ds = p * (dp - torch.einsum("qhd,qhd->hq", do, o)[..., None])
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, kk) * sc
        dk[c:d] = (torch.einsum("hqk,qhd->khd", ds, q[a:b].float()) * sc).unflatten(1, (-1, rep)).sum(2)
        dv[c:d] = torch.einsum("hqk,qhd->khd", p, do).unflatten(1, (-1, rep)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
