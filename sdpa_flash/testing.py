"""Reference comparison for attention outputs and gradients, used by our tests, the CLI self-check, and users.

The tolerance rule (one rule for every backend, dtype and device)::

    error(candidate, ref64) <= K * error(math_same_dtype, ref64) + floor

``ref64`` is PyTorch's math backend run in float64 on the same inputs; ``math_same_dtype`` is the math backend
run in the candidate's own dtype; ``error`` is the largest absolute difference. So a backend passes when it is
at most ``K = 2`` times as far from the exact answer as PyTorch's own reference implementation is when it works
in the same precision — the rule flash-attn's test-suite uses. ``floor`` (a few units in the last place of the
dtype at the output's magnitude) only matters where the same-dtype math error is ~0 (float64, or rows whose
result cancels exactly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

__all__ = [
    "Comparison",
    "K",
    "assert_close_to_reference",
    "compare_to_reference",
    "reference_attention",
]

K = 2.0
"""How many times the same-dtype math backend's error a candidate may have (see the module docstring)."""

_FLOOR_ULPS = 8


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool | str = False,
    scale: float | None = None,
    layout: str = "bhsd",
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """PyTorch's math backend, optionally upcast (default float64), on the same arguments as ``attention()``.

    GQA inputs are expanded explicitly; ``causal="bottom_right"`` uses the bottom-right aligned mask.
    """
    from .backends._base import causal_mask_tensor

    q, k, v = (query, key, value) if layout == "bhsd" else (t.transpose(1, 2) for t in (query, key, value))
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(dtype)
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kind = {True: "top_left", False: None, None: None}.get(causal, causal)  # type: ignore[call-overload]
    if kind is not None:
        cm = causal_mask_tensor(str(kind), q.shape[-2], k.shape[-2], q.device)
        if attn_mask is None:
            attn_mask = cm
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & cm
        else:
            attn_mask = attn_mask.masked_fill(~cm, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the private math op would add it as 0/1
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float("-inf"))
    out = torch._scaled_dot_product_attention_math(q, k, v, attn_mask, 0.0, False, scale=scale)[0]
    return out if layout == "bhsd" else out.transpose(1, 2)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The outcome of one comparison against the float64 reference.

    Attributes:
        name: what was compared (``"out"``, ``"dq"``, ...).
        error: the candidate's largest absolute error against the float64 reference.
        reference_error: the same-dtype math backend's largest absolute error.
        bound: ``K * reference_error + floor``.
        worst_index: where the candidate's error is largest.
        share_over: the share of elements whose error exceeds the bound.
        nan_mismatch: positions where exactly one of candidate and reference is NaN.
    """

    name: str
    error: float
    reference_error: float
    bound: float
    worst_index: tuple[int, ...]
    share_over: float
    nan_mismatch: int

    @property
    def passed(self) -> bool:
        return self.nan_mismatch == 0 and self.error <= self.bound

    @property
    def ratio(self) -> float:
        """error / reference_error (how many times the same-dtype math error; inf if that was 0)."""
        if self.reference_error == 0:
            return 0.0 if self.error == 0 else float("inf")
        return self.error / self.reference_error

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        s = (f"{verdict} {self.name}: max err {self.error:.3g} vs bound {self.bound:.3g} "
             f"(same-dtype math err {self.reference_error:.3g}, ratio {self.ratio:.2f})")
        if not self.passed:
            s += f"; worst at {self.worst_index}, {self.share_over:.2%} of elements over"
            if self.nan_mismatch:
                s += f", {self.nan_mismatch} NaN mismatches"
        return s


def compare_to_reference(
    candidate: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor, *, name: str = "out", k: float = K
) -> Comparison:
    """Apply the tolerance rule to ``candidate`` given the same-dtype math result and the float64 reference."""
    ref = ref64.detach().to(torch.float64)
    cand = candidate.detach().to(device=ref.device, dtype=torch.float64)
    math_err = (same_dtype.detach().to(device=ref.device, dtype=torch.float64) - ref).abs()
    err = (cand - ref).abs()
    nan_c, nan_r = torch.isnan(cand), torch.isnan(ref)
    mismatch = int((nan_c ^ nan_r).sum())
    both = nan_c & nan_r
    err = err.masked_fill(both, 0.0)
    math_err = math_err.nan_to_num(0.0)
    finite_ref = ref.masked_fill(~torch.isfinite(ref), 0.0)
    scale_mag = max(1.0, float(finite_ref.abs().max())) if ref.numel() else 1.0
    floor = _FLOOR_ULPS * torch.finfo(candidate.dtype).eps * scale_mag
    ref_err = float(math_err.max()) if math_err.numel() else 0.0
    bound = k * ref_err + floor
    if err.numel():
        err_nonan = err.nan_to_num(float("inf"))
        worst = int(err_nonan.argmax())
        worst_index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        error = float(err_nonan.max())
        share = float((err_nonan > bound).double().mean())
    else:
        worst_index, error, share = (), 0.0, 0.0
    return Comparison(name, error, ref_err, bound, worst_index, share, mismatch)


def assert_close_to_reference(
    candidate: torch.Tensor | Sequence[torch.Tensor],
    same_dtype: torch.Tensor | Sequence[torch.Tensor],
    ref64: torch.Tensor | Sequence[torch.Tensor],
    *,
    names: Sequence[str] = ("out", "dq", "dk", "dv"),
    k: float = K,
) -> list[Comparison]:
    """Raise ``AssertionError`` (listing every failing tensor) unless each candidate passes the rule."""
    if isinstance(candidate, torch.Tensor):
        candidate, same_dtype, ref64 = [candidate], [same_dtype], [ref64]  # type: ignore[list-item]
    results = [
        compare_to_reference(c, s, r, name=n, k=k)
        for c, s, r, n in zip(candidate, same_dtype, ref64, names, strict=False)  # type: ignore[arg-type]
    ]
    failed = [str(c) for c in results if not c.passed]
    if failed:
        raise AssertionError("attention differs from the float64 reference beyond tolerance:\n  " + "\n  ".join(failed))
    return results
