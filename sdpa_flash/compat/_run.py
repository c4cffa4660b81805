"""Running one planned call on its path: dense problems, per-row key ranges (kvcache) and packed varlen batches."""

from __future__ import annotations

import itertools
import warnings
from typing import Any, overload

import torch

from .. import _caches
from ..attention import attention
from ..backends import flex as _flex
from ..capability import capabilities
from ..policy import get_policy
from ._common import Features
from ._exact import Geometry, exact_attention, exact_lse
from ._plan import CompatPlan, CompatSpec, forced_path, plan_call

__all__ = ["plan_for", "run_dense", "run_ranges", "run_varlen"]

_warned: set[tuple[str, str]] = set()
_broken_flex: set[tuple[Any, ...]] = set()


def plan_for(spec: CompatSpec, device: torch.device) -> CompatPlan:
    """The path for ``spec`` under the sdpa_flash policy in force (its fallback mode and memory budget)."""
    pol = get_policy()
    caps = capabilities(device)
    forced = forced_path()
    if spec.batch == 0 or spec.seqlen_q == 0 or spec.seqlen_k == 0 or spec.heads_q == 0:
        forced = forced or "exact"
    p = plan_call(spec, caps, forced, pol.fallback, pol.memory_budget, (spec, caps) in _broken_flex, pol)
    if p.fallback and pol.fallback == "warn_once":
        first = p.reasons.get(p.order[0], ("",))[0]
        if (p.path, first) not in _warned:
            _warned.add((p.path, first))
            warnings.warn(f"sdpa_flash.compat ran this flash-attn call on the {p.path} path because {p.order[0]}: "
                          f"{first}. sdpa_flash.compat.explain_flash_attn(...) shows every reason.", UserWarning,
                          stacklevel=4)
    return p


def _flex_failed(spec: CompatSpec, device: torch.device, exc: Exception) -> None:
    _broken_flex.add((spec, capabilities(device)))
    _caches.clear_all()  # (per-call caches may hold a plan for the flex path)
    warnings.warn(f"sdpa_flash.compat: FlexAttention failed for {spec.describe()} ({type(exc).__name__}: "
                  f"{str(exc)[:300]}); this configuration uses the next exact path from now on.", UserWarning,
                  stacklevel=4)


# ------------------------------------------------------------------------------------------------- masks
def feature_mask(geo: Geometry, feats: Features, slopes: torch.Tensor | None, dtype: torch.dtype
                 ) -> torch.Tensor | None:
    """The masked path's ``attn_mask``: boolean ``(G, 1, Sq, Sk)`` (True = attend), or with ALiBi an additive
    float ``(G, H, Sq, Sk)`` of ``dtype`` holding ``-slope * |d|`` and ``-inf`` where masked; ``None`` if neither."""
    d = geo.q_eff[:, :, None] - geo.k_pos[:, None, :]
    vis = None
    if feats.right >= 0:
        vis = d >= -feats.right
    if feats.left >= 0:
        vis = d <= feats.left if vis is None else vis & (d <= feats.left)
    if geo.k_valid is not None:
        vis = geo.k_valid[:, None, :].expand_as(d) if vis is None else vis & geo.k_valid[:, None, :]
    if slopes is None:
        return None if vis is None else vis.unsqueeze(1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bias = -(slopes.to(acc)[:, :, None, None] * d.abs().unsqueeze(1).to(acc))
    if vis is not None:
        bias = bias.masked_fill(~vis.unsqueeze(1), float("-inf"))
    return bias.to(dtype)


@overload
def _bhsd(a: torch.Tensor, b: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def _bhsd(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def _bhsd(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in ts)


# ------------------------------------------------------------------------------------------------- dense
def run_dense(plan: CompatPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feats: Features, scale: float,
              softmax_scale: float | None, slopes: torch.Tensor | None, dropout_p: float, want_lse: bool,
              want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One dense problem on ``plan.path``.

    Args:
        q, k, v: ``(B, Sq, Hq, D)``, ``(B, Sk, Hkv, D)``, ``(B, Sk, Hkv, Dv)``.
        slopes: ``(1, Hq)`` / ``(B, Hq)`` float32 or ``None``.

    Returns:
        ``out (B, Sq, Hq, Dv)`` laid out like ``q`` (see :func:`like_query`), ``lse (B, Hq, Sq)`` or ``None``,
        probabilities ``(B, Hq, Sq, Sk)``
        (with dropout and ``want_probs``) or ``None``.
    """
    sq, sk = q.shape[1], k.shape[1]
    path = plan.path
    lse = probs = None
    if path == "flex":
        try:
            o, lse = _flex.flex_run(*_bhsd(q, k, v), feats, scale, slopes, want_lse=want_lse)
            out = o.transpose(1, 2)
        except Exception as exc:
            if forced_path() == "flex":
                raise
            _flex_failed(plan.spec, q.device, exc)
            return run_dense(plan_for(plan.spec, q.device), q, k, v, feats, scale, softmax_scale, slopes, dropout_p,
                             want_lse, want_probs)
    elif path == "sdpa":
        out = attention(q, k, v, causal="bottom_right" if feats.causal else False, dropout_p=dropout_p,
                        scale=softmax_scale, layout="bshd", **_variants(feats))
    elif path == "masked":
        mask = feature_mask(Geometry.dense(sq, sk, q.device), feats, slopes, q.dtype)
        out = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale, layout="bshd")
    else:
        o, lse, pr = exact_attention(*_bhsd(q, k, v), Geometry.dense(sq, sk, q.device), feats, scale, slopes,
                                     dropout_p, want_probs and dropout_p > 0)
        out = o.transpose(1, 2)
        probs = pr if pr.numel() or pr.dim() == 4 else None
    if want_lse and lse is None:
        qb, kb = _bhsd(q, k)
        lse = exact_lse(qb, kb, Geometry.dense(sq, sk, q.device), feats, scale, slopes)
    return like_query(out, q), _lse32(lse), probs


def like_query(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` as flash-attn lays it out: contiguous, or with the memory order of ``q`` (flash-attn 2 allocates
    its output with ``torch.empty_like(q)``), copied only when it is neither.

    A (B, S, H, D) view of a (B, H, S, D) tensor gives an output of that same order from every kernel here;
    making it contiguous would cost a copy of the output that flash-attn does not make.
    """
    if out.is_contiguous():
        return out
    if out.dim() == q.dim() and out.shape[:-1] == q.shape[:-1] and out.stride(-1) == 1:
        # the lambda's i is Any to mypy, which then picks stride()'s no-argument overload (a tuple)
        order = sorted(range(q.dim() - 1), key=lambda i: (-q.stride(i), i))  # type: ignore[operator]
        expect = out.shape[-1]
        for i in reversed(order):
            if out.size(i) > 1 and out.stride(i) != expect:
                break
            expect *= out.size(i)
        else:
            return out
    return out.contiguous()


def _lse32(lse: torch.Tensor | None) -> torch.Tensor | None:
    if lse is None or lse.dtype in (torch.float32, torch.float64):
        return lse
    return lse.float()


# ------------------------------------------------------------------------------------------------- kvcache
def run_ranges(plan: CompatPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_start: torch.Tensor,
               k_end: torch.Tensor, feats: Features, scale: float, softmax_scale: float | None,
               slopes: torch.Tensor | None, want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries ``(B, Sq, Hq, D)`` against keys ``(B, Sk, Hkv, D)`` of which row ``b`` sees ``k_start[b]:k_end[b]``."""
    sq, sk = q.shape[1], k.shape[1]
    geo = Geometry.ranges(sq, k_start, k_end, sk)
    lse = None
    if plan.path == "flex":
        try:
            # Geometry.ranges() sets k_valid
            o, lse = _flex.flex_run(*_bhsd(q, k, v), feats, scale, slopes, want_lse=want_lse,
                                    ranges=(geo.q_eff, geo.k_pos, geo.k_valid))  # type: ignore[arg-type]
            out = o.transpose(1, 2)
        except Exception as exc:
            if forced_path() == "flex":
                raise
            _flex_failed(plan.spec, q.device, exc)
            return run_ranges(plan_for(plan.spec, q.device), q, k, v, k_start, k_end, feats, scale, softmax_scale,
                              slopes, want_lse)
    elif plan.path in ("sdpa", "masked"):
        mask = feature_mask(geo, feats, slopes, q.dtype)
        out = attention(q, k, v, attn_mask=mask, scale=softmax_scale, layout="bshd")
    else:
        o, lse, _ = exact_attention(*_bhsd(q, k, v), geo, feats, scale, slopes)
        out = o.transpose(1, 2)
    if want_lse and lse is None:
        qb, kb = _bhsd(q, k)
        lse = exact_lse(qb, kb, geo, feats, scale, slopes)
    return out.contiguous(), _lse32(lse)


# ------------------------------------------------------------------------------------------------- varlen
def _lead_varlen() -> Any:
    """``sdpa_flash.varlen.varlen_attention_packed`` when that module provides it, else ``None``."""
    try:
        from .. import varlen as _varlen
    except ImportError:
        return None
    return getattr(_varlen, "varlen_attention_packed", None)


def run_varlen(plan: CompatPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
               cu_k: torch.Tensor, lq: list[int], lk: list[int], max_q: int, max_k: int, feats: Features,
               scale: float, softmax_scale: float | None, slopes: torch.Tensor | None, dropout_p: float,
               want_lse: bool, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Packed sequences: q ``(Tq, Hq, D)``, k/v ``(Tk, Hkv, D/Dv)``; ``lq``/``lk`` the host copies of cu_seqlens.

    Returns ``out (Tq, Hq, Dv)``, ``lse (Hq, Tq)`` or ``None``, probabilities ``(B, Hq, max_q, max_k)`` or ``None``.
    """
    nseq = len(lq) - 1
    tq, hq = q.shape[0], q.shape[1]
    dv = v.shape[-1]
    path = plan.path
    if path == "flex":
        try:
            return _varlen_flex(q, k, v, lq, lk, feats, scale, slopes, want_lse)
        except Exception as exc:
            if forced_path() == "flex":
                raise
            _flex_failed(plan.spec, q.device, exc)
            return run_varlen(plan_for(plan.spec, q.device), q, k, v, cu_q, cu_k, lq, lk, max_q, max_k, feats,
                              scale, softmax_scale, slopes, dropout_p, want_lse, want_probs)
    if path == "sdpa":
        packed = _lead_varlen()
        if packed is not None:
            sizes_q = [b - a for a, b in itertools.pairwise(lq)]
            sizes_k = [b - a for a, b in itertools.pairwise(lk)]
            out = packed(q[: lq[-1]], k[: lk[-1]], v[: lk[-1]], cu_q, cu_k, max_q, max_k,
                         causal="bottom_right" if feats.causal else False, scale=softmax_scale, dropout_p=dropout_p,
                         seqlens_q=sizes_q, seqlens_k=sizes_k, **_variants(feats))
            if lq[-1] < tq:  # rows past the last sequence give 0
                out = torch.cat([out, out.new_zeros((tq - lq[-1], hq, dv))], 0)
            lse = _varlen_lse(q, k, lq, lk, feats, scale, slopes) if want_lse else None
            return out.contiguous(), lse, None
    pieces: list[torch.Tensor] = []
    lse = torch.full((hq, tq), float("inf"), dtype=torch.float32, device=q.device) if want_lse else None
    probs = None
    if want_probs and dropout_p > 0:
        probs = torch.zeros((nseq, hq, max_q, max_k), dtype=q.dtype, device=q.device)
    for b in range(nseq):
        q0, q1, k0, k1 = lq[b], lq[b + 1], lk[b], lk[b + 1]
        if q1 == q0:
            continue
        sl = None if slopes is None else (slopes[b:b + 1] if slopes.shape[0] > 1 else slopes)
        qs, ks, vs = q[q0:q1].unsqueeze(0), k[k0:k1].unsqueeze(0), v[k0:k1].unsqueeze(0)
        sub = plan if k1 > k0 else _exact_plan(plan)
        o, ls, pr = run_dense(sub, qs, ks, vs, feats, scale, softmax_scale, sl, dropout_p, want_lse,
                              want_probs)
        pieces.append(o[0])
        if lse is not None and ls is not None:
            lse[:, q0:q1] = ls[0].float()
        if probs is not None and pr is not None:
            probs[b, :, : q1 - q0, : k1 - k0] = pr[0]
    if lq[-1] < tq:
        pieces.append(q.new_zeros((tq - lq[-1], hq, dv)))
    out = torch.cat(pieces, 0) if pieces else q.new_zeros((tq, hq, dv))
    return out, lse, probs


def _variants(feats: Features) -> dict[str, Any]:
    """The window and softcap as :func:`sdpa_flash.attention` takes them (flash-attn's ``-1``: unbounded)."""
    out: dict[str, Any] = {}
    if feats.window:
        out["window"] = (feats.left, feats.right)
    if feats.softcap > 0:
        out["softcap"] = float(feats.softcap)
    return out


def _exact_plan(plan: CompatPlan) -> CompatPlan:
    return CompatPlan("exact", plan.spec, ("exact",), {}, ())


def _varlen_lse(q: torch.Tensor, k: torch.Tensor, lq: list[int], lk: list[int], feats: Features, scale: float,
                slopes: torch.Tensor | None) -> torch.Tensor:
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    for b in range(len(lq) - 1):
        q0, q1, k0, k1 = lq[b], lq[b + 1], lk[b], lk[b + 1]
        if q1 == q0:
            continue
        sl = None if slopes is None else (slopes[b:b + 1] if slopes.shape[0] > 1 else slopes)
        qs, ks = q[q0:q1].unsqueeze(0).transpose(1, 2), k[k0:k1].unsqueeze(0).transpose(1, 2)
        lse[:, q0:q1] = exact_lse(qs, ks, Geometry.dense(q1 - q0, k1 - k0, q.device), feats, scale, sl)[0].float()
    return lse


def _varlen_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: list[int], lk: list[int], feats: Features,
                 scale: float, slopes: torch.Tensor | None, want_lse: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """All sequences in one FlexAttention call over the packed tokens, with a document mask."""
    dev = q.device
    nseq = len(lq) - 1
    tq, tk = q.shape[0], k.shape[0]
    cq = torch.tensor(lq, device=dev, dtype=torch.int64)
    ck = torch.tensor(lk, device=dev, dtype=torch.int64)
    len_q, len_k = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    # Tokens past the last sequence get documents nseq (queries) and nseq + 1 (keys): they never match.
    q_doc = torch.full((tq,), nseq, dtype=torch.int64, device=dev)
    k_doc = torch.full((tk,), nseq + 1, dtype=torch.int64, device=dev)
    q_doc[: lq[-1]] = torch.repeat_interleave(torch.arange(nseq, device=dev), len_q)
    k_doc[: lk[-1]] = torch.repeat_interleave(torch.arange(nseq, device=dev), len_k)
    tq_idx = torch.arange(tq, device=dev)
    tk_idx = torch.arange(tk, device=dev)
    qd, kd = q_doc.clamp(max=nseq - 1), k_doc.clamp(max=nseq - 1)
    q_eff = tq_idx - cq[qd] + (len_k[qd] - len_q[qd])
    k_pos = tk_idx - ck[kd]
    sl = None
    if slopes is not None:  # one row per document, plus a sentinel row for the tokens past the last sequence
        per_doc = slopes.expand(nseq, -1) if slopes.shape[0] == 1 else slopes
        sl = torch.cat([per_doc, per_doc[:1]], 0)
    o, lse = _flex.flex_run(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                            v.transpose(0, 1).unsqueeze(0), feats, scale, sl, want_lse=want_lse,
                            docs=(q_doc, q_eff, k_doc, k_pos))
    out = o[0].transpose(0, 1).contiguous()
    return out, (None if lse is None else lse[0]), None
