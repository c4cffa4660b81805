"""Correctness before timing: each path's output (and gradients) against a float64 reference.

Attention rows are independent, so the reference need not be the whole problem: for the first and last batch
element and head, a set of query rows (the first few, where causal masking matters most, and rows spread over
the sequence) is recomputed in float64 against all keys, forward and for ``dq`` (whose rows depend only on
their own query row). Small problems are checked whole, ``dk`` and ``dv`` included.

The rule is the project's (:mod:`sdpa_flash.testing`): a candidate may be at most ``K`` times as far from the
float64 reference as PyTorch's math backend in the same dtype, plus a floor of 8 ulps — here of the largest
reference element rather than of ``max(1, ·)``, because at long sequence lengths attention outputs are small and
a wrong answer (a missing causal mask, a wrong scale) could otherwise hide under a floor of fixed size.
"""

from __future__ import annotations

import dataclasses

import torch

from ..testing import K, reference_attention
from ._cases import Case

__all__ = ["Reference", "compare", "make_reference"]

_FULL_LIMIT = 2**22  # B·H·S² up to which the whole problem is checked (dk, dv included)


def compare(cand: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, *, name: str = "out") -> tuple[float, str]:
    """The rule (see the module docstring) for one tensor.

    Returns:
        ``error / bound`` and a failure message (``""`` when it passes).
    """
    cand64 = cand.detach().to(device=ref.device, dtype=torch.float64)
    if cand64.shape != ref.shape:
        return float("inf"), f"{name} has shape {tuple(cand64.shape)}, expected {tuple(ref.shape)}"
    if not ref.numel():
        return 0.0, ""
    bad = int((torch.isnan(cand64) ^ torch.isnan(ref)).sum())
    err = float((cand64 - ref).abs().nan_to_num(0.0).max())
    math_err = float((same.detach().to(device=ref.device, dtype=torch.float64) - ref).abs().nan_to_num(0.0).max())
    floor = 8 * torch.finfo(cand.dtype).eps * float(ref.masked_fill(~torch.isfinite(ref), 0.0).abs().max())
    bound = K * math_err + floor
    ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
    if bad or err > bound:
        return ratio, (f"{name} max error {err:.3g} > bound {bound:.3g} ({K:g}x same-dtype math error {math_err:.3g}"
                       " + 8 ulps)" + (f", {bad} NaN mismatches" if bad else ""))
    return ratio, ""


@dataclasses.dataclass
class Reference:
    """The float64 reference (and the same-dtype math result) for one case's first copy of the inputs."""

    full: bool
    picks: list[tuple[int, int]]  # (batch, head) pairs checked when not full
    rows: torch.Tensor  # query rows checked when not full
    ref: dict[str, torch.Tensor]
    same: dict[str, torch.Tensor]

    def check(self, out: torch.Tensor, grads: tuple[torch.Tensor, ...] | None = None) -> tuple[dict[str, float], str]:
        """Compare a path's output (and ``(dq, dk, dv)``) with the reference.

        Returns:
            ``{tensor: error / bound}`` and a failure message (``""`` when every ratio is at most 1).
        """
        got = {"out": self._take(out)}
        if grads is not None:
            got["dq"] = self._take(grads[0])
            if self.full:
                got["dk"], got["dv"] = grads[1], grads[2]
        ratios: dict[str, float] = {}
        failures = []
        for name, cand in got.items():
            ratio, fail = compare(cand, self.same[name], self.ref[name], name=name)
            ratios[name] = ratio
            if fail:
                failures.append(fail)
        return ratios, ("wrong result: " + "; ".join(failures)) if failures else ""

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        if self.full:
            return t
        return torch.stack([t[b, h].index_select(0, self.rows) for b, h in self.picks])


def make_reference(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, *,
                   grads: bool) -> Reference:
    """The float64 reference for ``case`` on these inputs (``grads``: also ``dq``, and ``dk``/``dv`` if small)."""
    b, h, s = case.batch, case.heads, case.seqlen
    if b * h * s * s <= _FULL_LIMIT:
        full_ref, full_same = _full(case, q, k, v, do, grads)  # (other types than ref/same below)
        return Reference(True, [], torch.empty(0, dtype=torch.long), full_ref, full_same)
    picks = sorted({(0, 0), (0, h - 1), (b - 1, 0), (b - 1, h - 1)})
    n = min(s, 60)
    spread = torch.linspace(0, s - 1, n).round().long().tolist()
    rows = torch.tensor(sorted(set(range(min(s, 4))) | set(spread)), device=q.device)
    rep = h // case.hkv
    keys = torch.arange(s, device=q.device)
    mask = (keys[None, :] <= rows[:, None]) if case.causal else None
    ref: dict[str, list[torch.Tensor]] = {"out": [], "dq": []}
    same: dict[str, list[torch.Tensor]] = {"out": [], "dq": []}
    for bi, hi in picks:
        qs = q[bi, hi].detach().index_select(0, rows)[None, None]
        ks = k[bi, hi // rep].detach()[None, None]
        vs = v[bi, hi // rep].detach()[None, None]
        dos = do[bi, hi].index_select(0, rows)[None, None]
        for store, dtype in ((ref, torch.float64), (same, None)):
            leaf = (qs.to(dtype) if dtype else qs).clone().requires_grad_(grads)
            with torch.enable_grad():
                o = reference_attention(leaf, ks, vs, attn_mask=mask, dtype=dtype)
                store["out"].append(o[0, 0].detach())
                if grads:
                    (gq,) = torch.autograd.grad(o, leaf, dos.to(o.dtype))
                    store["dq"].append(gq[0, 0])
    keep = ("out", "dq") if grads else ("out",)
    return Reference(False, picks, rows, {n_: torch.stack(ref[n_]) for n_ in keep},
                     {n_: torch.stack(same[n_]) for n_ in keep})


def _full(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
          grads: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    out: list[dict[str, torch.Tensor]] = []
    for dtype in (torch.float64, None):
        leaves = [(t.detach().to(dtype) if dtype else t.detach()).clone().requires_grad_(grads) for t in (q, k, v)]
        with torch.enable_grad():
            o = reference_attention(*leaves, causal=case.causal, dtype=dtype)
            res = {"out": o.detach()}
            if grads:
                dq, dk, dv = torch.autograd.grad(o, leaves, do.to(o.dtype))
                res.update(dq=dq, dk=dk, dv=dv)
        out.append(res)
    return out[0], out[1]
