"""A reference for flash-attn's documented semantics and the tolerance rule applied to it.

:func:`flash_reference` is written from flash-attn 2.8's docstrings, not from this layer's code: an explicit
``(B, H, Sq, Sk)`` score matrix, ``softmax_scale * q k^T``, then ``softcap * tanh(. / softcap)``, then
``- slope * |i + Sk - Sq - j|``, then the causal / window masks from their definitions, a softmax whose fully
masked rows are 0, and the log-sum-exp (``+inf`` on those rows). In float64 it is the truth; with ``dtype=None``
it is the "same-dtype" reference of :mod:`sdpa_flash.testing`'s rule (computed in float32 from the low-precision
inputs and rounded once, as PyTorch's math backend does).

:func:`compare_flash` applies that rule (``|candidate - ref64| <= 2 x |same - ref64|`` + the floor from the
algorithm's error bound, :func:`sdpa_flash.testing.compare_to_reference`) to an output, its gradients and the
log-sum-exp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..testing import Comparison, compare_to_reference

__all__ = ["assert_flash_close", "compare_flash", "flash_reference", "flash_varlen_reference"]


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None, causal: bool,
              window_size: tuple[int, int], softcap: float, alibi_slopes: torch.Tensor | None,
              window_limit: int | None, key_range: tuple[torch.Tensor, torch.Tensor] | None,
              dropout_mask: torch.Tensor | None, acc: torch.dtype) -> dict[str, torch.Tensor]:
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qh = q.to(acc).transpose(1, 2)
    kh = k.to(acc).transpose(1, 2).repeat_interleave(h // hk, 1)
    vh = v.to(acc).transpose(1, 2).repeat_interleave(h // hk, 1)
    raw = scale * qh @ kh.transpose(-1, -2)
    s = softcap * torch.tanh(raw / softcap) if softcap > 0 else raw
    i = torch.arange(sq, device=q.device).view(1, 1, sq, 1)
    j = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
    if key_range is None:
        start = torch.zeros(b, dtype=torch.long, device=q.device)
        end = torch.full((b,), sk, dtype=torch.long, device=q.device)
    else:
        start, end = (t.long() for t in key_range)
    start, end = start.view(b, 1, 1, 1), end.view(b, 1, 1, 1)
    n_keys = end - start                 # this row's Sk
    jr = j - start                       # key index within the row's valid keys
    diag = i + n_keys - sq               # the key aligned with query i (bottom-right)
    allowed = (j >= start) & (j < end)
    bias = torch.zeros((), dtype=acc, device=q.device)
    if alibi_slopes is not None:
        sl = alibi_slopes.to(acc)
        sl = sl.view(1, h, 1, 1) if sl.dim() == 1 else sl.view(b, h, 1, 1)
        bias = -sl * (diag - jr).abs().to(acc)
        s = s + bias
    left, right = window_size
    limit = sk if window_limit is None else window_limit
    left = -1 if left < 0 or left >= limit else left
    right = -1 if right < 0 or right >= limit else right
    if causal:
        allowed = allowed & (jr <= diag)
    if left >= 0:
        allowed = allowed & (jr >= diag - left)
    if right >= 0:
        allowed = allowed & (jr <= diag + right)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    rows = torch.isfinite(lse)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    pv = p if dropout_mask is None else p * dropout_mask.to(acc)
    out = pv @ vh
    s_abs = (abs(scale) * qh.abs() @ kh.abs().transpose(-1, -2) + bias.abs()).masked_fill(~allowed, 0.0)
    return {"out": out.transpose(1, 2), "lse": lse.masked_fill(~rows, float("inf")), "p": p, "s_abs": s_abs,
            "rows": rows, "scale": torch.tensor(scale)}


def flash_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    window_limit: int | None = None,
    key_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    dropout_mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's dense attention, from its documentation, with autograd.

    Args:
        q, k, v: ``(B, Sq, Hq, D)``, ``(B, Sk, Hkv, D)``, ``(B, Sk, Hkv, Dv)``.
        softmax_scale, causal, window_size, softcap, alibi_slopes: flash-attn's arguments.
        window_limit: window sides ``>=`` this are unbounded (flash-attn: ``Sk``; ``max_seqlen_k`` for varlen;
            the cache capacity for kvcache). Default ``Sk``.
        key_range: ``(start (B,), end (B,))``: row ``b`` sees keys ``start[b] <= j < end[b]`` only, and its
            ``Sk`` is ``end - start`` (a KV cache with lengths and left padding).
        dropout_mask: ``(B, Hq, Sq, Sk)``: multiplies the probabilities (keep / (1 - p)) before ``@ v``.
        dtype: compute and return in this dtype (default float64); ``None``: compute in float32 (float64 for
            float64 inputs) and round the output to the inputs' dtype.

    Returns:
        ``out (B, Sq, Hq, Dv)`` and ``lse (B, Hq, Sq)`` (``+inf`` where a row sees no key).
    """
    acc = dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    r = _explicit(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                  alibi_slopes=alibi_slopes, window_limit=window_limit, key_range=key_range,
                  dropout_mask=dropout_mask, acc=acc)
    out = r["out"] if dtype is not None else r["out"].to(q.dtype)
    return out, r["lse"]


def flash_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Sequence[int],
    cu_seqlens_k: Sequence[int],
    *,
    max_seqlen_k: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's varlen attention: :func:`flash_reference` per sequence.

    Args:
        q, k, v: ``(total_q, Hq, D)``, ``(total_k, Hkv, D)``, ``(total_k, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: the cumulative lengths (Python ints).
        max_seqlen_k: the window limit (flash-attn's ``max_seqlen_k``); default the longest key sequence.
        alibi_slopes: ``(Hq,)`` or ``(batch, Hq)`` (one row per sequence).
        options: as :func:`flash_reference`.

    Returns:
        ``out (total_q, Hq, Dv)`` (0 on rows past the last sequence) and ``lse (Hq, total_q)``.
    """
    nseq = len(cu_seqlens_q) - 1
    lens_k = [cu_seqlens_k[i + 1] - cu_seqlens_k[i] for i in range(nseq)]
    limit = max_seqlen_k if max_seqlen_k is not None else max(lens_k, default=0)
    acc = dtype or q.dtype
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float64 if dtype else torch.float32,
                     device=q.device)
    pieces = []
    for b in range(nseq):
        q0, q1, k0, k1 = cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]
        if q1 == q0:
            continue
        sl = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        o, ls = flash_reference(q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], window_limit=limit,
                                alibi_slopes=sl, dtype=dtype, **options)
        pieces.append(o[0])
        lse[:, q0:q1] = ls[0].to(lse.dtype)
    tail = q.shape[0] - cu_seqlens_q[-1]
    pieces.append(torch.zeros((tail, q.shape[1], v.shape[-1]), dtype=acc, device=q.device))
    return torch.cat(pieces, 0), lse


# --------------------------------------------------------------------------------------------------- rule
def _magnitudes(r: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out64: torch.Tensor, grad_out: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``M`` and ``Ms`` of the floor (sdpa_flash.testing's definitions) for out, and dq, dk, dv."""
    h, hk = q.shape[2], k.shape[2]
    rep = h // hk
    qh = q.double().transpose(1, 2).abs()
    kx = k.double().transpose(1, 2).repeat_interleave(rep, 1).abs()
    vx = v.double().transpose(1, 2).repeat_interleave(rep, 1).abs()
    prob, s_abs, scale = r["p"].double(), r["s_abs"].double(), abs(float(r["scale"]))
    prob_s = prob * (s_abs + (prob * s_abs).sum(-1, keepdim=True))
    m_out, ms_out = prob @ vx, prob_s @ vx
    mags, smags = [m_out], [ms_out]
    if grad_out is not None:
        do = grad_out.double().transpose(1, 2).abs()
        o = out64.double().transpose(1, 2).abs()
        g = do @ vx.transpose(-1, -2) + (do * o).sum(-1, keepdim=True)
        t, ts = prob * g, prob_s * g + prob * (do * ms_out).sum(-1, keepdim=True)

        def fold(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(1, (hk, rep)).sum(2)

        mags += [scale * t @ kx, fold(scale * t.transpose(-1, -2) @ qh), fold(prob.transpose(-1, -2) @ do)]
        smags += [scale * ts @ kx, fold(scale * ts.transpose(-1, -2) @ qh), fold(prob_s.transpose(-1, -2) @ do)]
    return [m.transpose(1, 2) for m in mags], [m.transpose(1, 2) for m in smags]


def compare_flash(
    candidate: Sequence[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad_out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    **options: Any,
) -> list[Comparison]:
    """Compare ``[out]`` or ``[out, dq, dk, dv]`` (and ``lse``) of a dense candidate with :func:`flash_reference`.

    Args:
        candidate: the candidate's output (and gradients through ``grad_out``), in q's layout ``(B, S, H, D)``.
        q, k, v: the inputs, in the candidate's dtype.
        grad_out: the upstream gradient used for the candidate's gradients.
        lse: the candidate's ``(B, Hq, Sq)`` log-sum-exp, compared too (``+inf`` rows must match exactly).
        options: :func:`flash_reference`'s keyword arguments.

    Returns:
        One :class:`~sdpa_flash.testing.Comparison` per tensor (``out``, ``dq``, ``dk``, ``dv``, ``lse``).
    """
    if len(candidate) > 4:  # a tensor beyond dv would be left out of the comparison
        raise ValueError(f"Expected [out] or [out, dq, dk, dv], but got {len(candidate)} tensors instead.")
    backward = grad_out is not None and len(candidate) > 1
    leaves64 = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    opts64 = {**options}
    if opts64.get("alibi_slopes") is not None:
        opts64["alibi_slopes"] = opts64["alibi_slopes"].double()
    r64 = _explicit(*leaves64, acc=torch.float64, **_defaults(opts64))
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    same, same_lse = flash_reference(*leaves, dtype=None, **options)
    refs, sames = [r64["out"].detach()], [same.detach()]
    if backward:
        assert grad_out is not None
        refs += [g.detach() for g in torch.autograd.grad(r64["out"], leaves64, grad_out.double())]
        sames += [g.detach() for g in torch.autograd.grad(same, leaves, grad_out)]
    mags, smags = _magnitudes(r64, q, k, v, r64["out"].detach(), grad_out if backward else None)
    rows = r64["rows"].transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1)
    every = torch.ones((), dtype=torch.bool, device=q.device)
    include = [rows, rows, every, every]
    _, sq, h, d = q.shape
    n = max(k.shape[1], sq * h // k.shape[2], d, v.shape[-1])
    names = ("out", "dq", "dk", "dv")
    result = [compare_to_reference(c_, s_, r_, name=names[i], magnitude=mags[i], score_magnitude=smags[i],
                                   reduction=n, include=include[i], dtype=q.dtype)
              for i, (c_, s_, r_) in enumerate(zip(candidate, sames, refs, strict=False))]
    if lse is not None:
        ref_rows = r64["rows"]
        cand = lse.detach().to(torch.float64)
        inf_ok = bool(torch.equal(torch.isposinf(cand), ~ref_rows))
        mag = (r64["p"] * r64["s_abs"]).sum(-1) + 1.0
        cmp = compare_to_reference(lse, same_lse.detach(), r64["lse"].detach(), name="lse", magnitude=mag,
                                   reduction=n, include=ref_rows, dtype=lse.dtype)
        if not inf_ok:
            cmp = Comparison("lse (+inf rows differ)", math.inf, cmp.reference_error, cmp.bound, cmp.worst_index,
                             1.0, 1, math.inf, cmp.compared)
        result.append(cmp)
    return result


def _defaults(opts: dict[str, Any]) -> dict[str, Any]:
    base = {"softmax_scale": None, "causal": False, "window_size": (-1, -1), "softcap": 0.0, "alibi_slopes": None,
            "window_limit": None, "key_range": None, "dropout_mask": None}
    base.update(opts)
    return base


def assert_flash_close(candidate: Sequence[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       **kwargs: Any) -> list[Comparison]:
    """:func:`compare_flash`, raising ``AssertionError`` listing every tensor that fails the rule."""
    results = compare_flash(candidate, q, k, v, **kwargs)
    failed = [str(c) for c in results if not c.passed]
    if failed:
        raise AssertionError("flash-attn call differs from the float64 reference beyond tolerance:\n  "
                             + "\n  ".join(failed))
    return results
