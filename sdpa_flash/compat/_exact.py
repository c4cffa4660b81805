"""The ``exact`` path: flash-attn's semantics in blocks of plain PyTorch, with its own FlashAttention-2 backward.

Everything a flash-attn call can ask for — bottom-right causal, sliding windows, softcap, ALiBi, GQA/MQA, dropout,
per-row key ranges (kvcache) — is computed tile by tile with an online softmax in float32 (float64 for float64
inputs), so no ``(Sq, Sk)`` matrix is materialised: the extra memory is a few ``(B, H, block_q, block_k)`` tiles.
The backward recomputes each tile from the saved log-sum-exp::

    P = exp(S - lse),  dV += (P o Z)^T dO,  dP = (dO V^T) o Z,  dS = P o (dP - rowsum(dO o O)),
    dS_raw = dS o (1 - tanh^2(S_raw / softcap))   (softcap only),  dQ += scale dS_raw K,  dK += scale dS_raw^T Q

where ``Z`` is the dropout keep mask divided by ``1 - p``. Dropout masks are drawn per tile from a generator
seeded from PyTorch's default generator (so ``torch.manual_seed`` reproduces them) and redrawn in the backward.
No atomics and a fixed summation order: the backward is deterministic.

It is the path for what neither SDPA nor FlexAttention can run here (softcap on the CPU, dropout with a
softcap, ``return_attn_probs`` with dropout, deterministic backward on CUDA), and the source of the
log-sum-exp when the output comes from a fused SDPA kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._common import Features

__all__ = ["Geometry", "exact_attention", "exact_lse"]

_TILE_BYTES = 64 * 2**20  # one (B, H, block_q, block_k) tile in the accumulation dtype
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """Where each query row sits relative to the keys, bottom-right aligned, per batch row.

    ``d[b, i, j] = q_eff[b, i] - k_pos[b, j]`` is flash-attn's ``i + Sk - Sq - j`` for that row's ``Sk``: causal
    masking keeps ``d >= 0``, a window keeps ``-right <= d <= left``, ALiBi adds ``-slope * |d|``.

    Attributes:
        q_eff: ``(G, Sq)`` int64, ``G`` 1 or the batch size: ``i + Sk_b - Sq``.
        k_pos: ``(G, Sk)`` int64: the key's index relative to the first valid key of its row.
        k_valid: ``(G, Sk)`` bool (keys outside a row's valid range), or ``None`` when all keys are valid.
        offset: for the dense form (``q_eff = i + offset``, ``k_pos = j``, every key valid) the int
            ``Sk - Sq``, which lets whole tiles be skipped; ``None`` otherwise.
    """

    q_eff: torch.Tensor
    k_pos: torch.Tensor
    k_valid: torch.Tensor | None = None
    offset: int | None = None

    @classmethod
    def dense(cls, sq: int, sk: int, device: torch.device) -> Geometry:
        """The geometry of ``Sq`` queries against ``Sk`` keys."""
        off = sk - sq
        return cls(torch.arange(sq, device=device).unsqueeze(0) + off, torch.arange(sk, device=device).unsqueeze(0),
                   None, off)

    @classmethod
    def ranges(cls, sq: int, k_start: torch.Tensor, k_end: torch.Tensor, sk: int) -> Geometry:
        """Row ``b`` sees the keys ``k_start[b] <= j < k_end[b]`` of ``Sk`` (a KV cache with left padding)."""
        start, end = k_start.long().unsqueeze(1), k_end.long().unsqueeze(1)
        j = torch.arange(sk, device=start.device).unsqueeze(0)
        q_eff = torch.arange(sq, device=start.device).unsqueeze(0) + (end - start - sq)
        return cls(q_eff, j - start, (j >= start) & (j < end), None)

    def distance(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """``(G, 1, 1, bq, bk)`` int64 ``d`` of one tile."""
        d = self.q_eff[:, q0:q1, None] - self.k_pos[:, None, k0:k1]
        return d[:, None, None]

    def visible(self, feats: Features, d: torch.Tensor, k0: int, k1: int) -> torch.Tensor | None:
        """``(G, 1, 1, bq, bk)`` bool of one tile, or ``None`` when nothing is masked."""
        vis = None
        if feats.right >= 0:
            vis = d >= -feats.right
        if feats.left >= 0:
            vis = d <= feats.left if vis is None else vis & (d <= feats.left)
        if self.k_valid is not None:
            kv = self.k_valid[:, None, None, None, k0:k1]
            vis = kv if vis is None else vis & kv
        return vis

    def tile_kind(self, feats: Features, q0: int, q1: int, k0: int, k1: int) -> str:
        """``"empty"`` (no visible key), ``"full"`` (no masking needed) or ``"partial"``."""
        if self.offset is None:
            return "partial"
        d_min, d_max = q0 + self.offset - (k1 - 1), q1 - 1 + self.offset - k0
        if (feats.right >= 0 and d_max < -feats.right) or (feats.left >= 0 and d_min > feats.left):
            return "empty"
        if (feats.right < 0 or d_min >= -feats.right) and (feats.left < 0 or d_max <= feats.left):
            return "full"
        return "partial"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(b: int, h: int, sq: int, sk: int, itemsize: int) -> tuple[int, int]:
    bq = min(max(sq, 1), 1024)
    per_row = b * h * itemsize
    bk = max(16, min(max(sk, 1), _TILE_BYTES // max(per_row * bq, 1)))
    while bq > 16 and per_row * bq * bk > _TILE_BYTES:
        bq //= 2
    return bq, min(bk, max(sk, 1))


@dataclasses.dataclass(frozen=True, eq=False)
class _Params:
    geo: Geometry
    feats: Features
    scale: float
    slopes: torch.Tensor | None  # (Gs, Hkv, G, 1, 1) float32/64
    dropout_p: float
    seed: int
    groups: int


def _tile_scores(qb: torch.Tensor, k: torch.Tensor, p: _Params, q0: int, q1: int, k0: int, k1: int,
                 acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked scores ``(B, Hkv, G, bq, bk)`` of one tile, and ``tanh`` of the softcap (for the backward)."""
    kb = k[:, :, k0:k1].to(acc).unsqueeze(2)
    s = torch.matmul(qb, kb.transpose(-1, -2)) * p.scale
    t = None
    if p.feats.softcap > 0:
        t = torch.tanh(s / p.feats.softcap)
        s = t * p.feats.softcap
    kind = p.geo.tile_kind(p.feats, q0, q1, k0, k1)
    need_mask = kind != "full"
    if p.slopes is not None or need_mask:
        d = p.geo.distance(q0, q1, k0, k1)
        if p.slopes is not None:
            s = s - p.slopes * d.abs().to(acc)
        vis = p.geo.visible(p.feats, d, k0, k1) if need_mask else None
        if vis is not None:
            s = s.masked_fill(~vis, _NEG_INF)
    return s, t


def _keep(p: _Params, tile: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(p.seed + tile)
    return torch.rand(shape, generator=gen, device=device) >= p.dropout_p


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, p: _Params, want_probs: bool
             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    g = p.groups
    acc = _acc_dtype(q.dtype)
    bq, bk = _blocks(b, hq, sq, sk, torch.finfo(acc).bits // 8)
    nk = -(-sk // bk) if sk else 0
    dv = v.shape[-1] if v is not None else 0
    out = torch.zeros((b, hk, g, sq, dv), dtype=q.dtype, device=q.device) if v is not None else None
    lse = torch.empty((b, hk, g, sq), dtype=acc, device=q.device)
    probs = torch.zeros((b, hk, g, sq, sk), dtype=q.dtype, device=q.device) if want_probs else None
    qg = q.view(b, hk, g, sq, d)
    scale_keep = 1.0 / (1.0 - p.dropout_p) if p.dropout_p > 0 else 1.0
    for qi, q0 in enumerate(range(0, sq, bq)):
        q1 = min(q0 + bq, sq)
        qb = qg[:, :, :, q0:q1].to(acc)
        m = torch.full((b, hk, g, q1 - q0, 1), _NEG_INF, dtype=acc, device=q.device)
        l_ = torch.zeros_like(m)
        o = torch.zeros((b, hk, g, q1 - q0, dv), dtype=acc, device=q.device) if v is not None else None
        tiles = [k0 for k0 in range(0, sk, bk) if p.geo.tile_kind(p.feats, q0, q1, k0, min(k0 + bk, sk)) != "empty"]
        for k0 in tiles:
            k1 = min(k0 + bk, sk)
            s, _ = _tile_scores(qb, k, p, q0, q1, k0, k1, acc)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            e = torch.exp(s - m_safe)
            corr = torch.exp(m - m_safe)
            l_ = l_ * corr + e.sum(-1, keepdim=True)
            if o is not None and v is not None:
                if p.dropout_p > 0:
                    e = e * _keep(p, qi * nk + k0 // bk, e.shape, q.device) * scale_keep
                o = o * corr + torch.matmul(e, v[:, :, k0:k1].to(acc).unsqueeze(2))
            m = m_new
        empty = l_ == 0
        row_lse = (m + torch.log(l_)).masked_fill(empty, float("inf"))
        lse[:, :, :, q0:q1] = row_lse.squeeze(-1)
        if out is not None and o is not None:
            out[:, :, :, q0:q1] = (o / l_.masked_fill(empty, 1.0)).to(q.dtype)
        if probs is not None:
            for k0 in tiles:
                k1 = min(k0 + bk, sk)
                s, _ = _tile_scores(qb, k, p, q0, q1, k0, k1, acc)
                pr = torch.exp(s - row_lse)
                if p.dropout_p > 0:
                    pr = torch.where(_keep(p, qi * nk + k0 // bk, pr.shape, q.device), pr, -pr)
                probs[:, :, :, q0:q1, k0:k1] = pr.to(q.dtype)
    flat = (b, hq, sq)
    return (None if out is None else out.view(b, hq, sq, dv)), lse.view(flat), (
        None if probs is None else probs.view(b, hq, sq, sk))


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              grad_out: torch.Tensor, p: _Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = p.groups
    acc = lse.dtype
    bq, bk = _blocks(b, hq, sq, sk, torch.finfo(acc).bits // 8)
    nk = -(-sk // bk) if sk else 0
    dq = torch.zeros((b, hk, g, sq, d), dtype=acc, device=q.device)
    dk = torch.zeros((b, hk, sk, d), dtype=acc, device=q.device)
    dvv = torch.zeros((b, hk, sk, dv), dtype=acc, device=q.device)
    qg = q.view(b, hk, g, sq, d)
    go = grad_out.reshape(b, hk, g, sq, dv)
    delta = (go.to(acc) * out.reshape(b, hk, g, sq, dv).to(acc)).sum(-1, keepdim=True)
    lse_g = lse.view(b, hk, g, sq, 1)
    scale_keep = 1.0 / (1.0 - p.dropout_p) if p.dropout_p > 0 else 1.0
    for qi, q0 in enumerate(range(0, sq, bq)):
        q1 = min(q0 + bq, sq)
        qb = qg[:, :, :, q0:q1].to(acc)
        gb = go[:, :, :, q0:q1].to(acc)
        for k0 in range(0, sk, bk):
            k1 = min(k0 + bk, sk)
            if p.geo.tile_kind(p.feats, q0, q1, k0, k1) == "empty":
                continue
            s, t = _tile_scores(qb, k, p, q0, q1, k0, k1, acc)
            pr = torch.exp(s - lse_g[:, :, :, q0:q1])
            vb = v[:, :, k0:k1].to(acc).unsqueeze(2)
            kb = k[:, :, k0:k1].to(acc).unsqueeze(2)
            dp = torch.matmul(gb, vb.transpose(-1, -2))
            if p.dropout_p > 0:
                z = _keep(p, qi * nk + k0 // bk, pr.shape, q.device).to(acc) * scale_keep
                dvv[:, :, k0:k1] += torch.matmul((pr * z).transpose(-1, -2), gb).sum(2)
                dp = dp * z
            else:
                dvv[:, :, k0:k1] += torch.matmul(pr.transpose(-1, -2), gb).sum(2)
            ds = pr * (dp - delta[:, :, :, q0:q1])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = ds * p.scale
            dq[:, :, :, q0:q1] += torch.matmul(ds, kb)
            dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb).sum(2)
    return dq.view(b, hq, sq, d).to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)


class _Exact(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: _Params,
                want_probs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse, probs = _forward(q, k, v, params, want_probs)
        assert out is not None
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = params
        if probs is None:
            probs = torch.empty((0,), dtype=q.dtype, device=q.device)
        ctx.mark_non_differentiable(lse, probs)
        return out, lse, probs

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out, ctx.params)
        return dq, dk, dv, None, None


def _params(q: torch.Tensor, k: torch.Tensor, geo: Geometry, feats: Features, scale: float,
            slopes: torch.Tensor | None, dropout_p: float) -> _Params:
    hq, hk = q.shape[1], k.shape[1]
    g = hq // hk
    sl = None
    if slopes is not None:  # (Gs, Hq) -> (Gs, Hkv, G, 1, 1)
        sl = slopes.to(_acc_dtype(q.dtype)).reshape(slopes.shape[0], hk, g, 1, 1)
    seed = int(torch.empty((), dtype=torch.int64).random_(0, 2**62).item()) if dropout_p > 0 else 0
    return _Params(geo, feats, scale, sl, dropout_p, seed, g)


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geo: Geometry,
    feats: Features,
    scale: float,
    slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact flash-attn attention in tiles, with autograd.

    Args:
        q: ``(B, Hq, Sq, D)``; k: ``(B, Hkv, Sk, D)``; v: ``(B, Hkv, Sk, Dv)``.
        geo: where the queries sit relative to the keys (:class:`Geometry`).
        feats: causal / window / softcap / ALiBi (the window already holds the causal right side 0).
        scale: the softmax scale.
        slopes: ALiBi slopes ``(1, Hq)`` or ``(B, Hq)`` float32, or ``None``.
        dropout_p: dropout on the attention probabilities.
        want_probs: also return the probabilities ``(B, Hq, Sq, Sk)`` in q's dtype, dropped entries negated.

    Returns:
        ``out (B, Hq, Sq, Dv)`` in q's dtype, ``lse (B, Hq, Sq)`` (float32; float64 for float64 inputs; ``+inf``
        where a row sees no key), and the probabilities (an empty tensor unless ``want_probs``).
    """
    params = _params(q, k, geo, feats, scale, slopes, dropout_p)
    out, lse, probs = _Exact.apply(q, k, v, params, want_probs)
    return out, lse, probs


@torch.no_grad()
def exact_lse(q: torch.Tensor, k: torch.Tensor, geo: Geometry, feats: Features, scale: float,
              slopes: torch.Tensor | None = None) -> torch.Tensor:
    """The log-sum-exp alone, ``(B, Hq, Sq)`` (for outputs computed by a fused kernel); no gradient."""
    _, lse, _ = _forward(q, k, None, _params(q, k, geo, feats, scale, slopes, 0.0), False)
    return lse

