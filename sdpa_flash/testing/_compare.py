"""The tolerance rule applied: one tensor (:func:`compare_to_reference`), a problem's outputs
(:func:`compare_attention`), and the assertion built on both (see :mod:`sdpa_flash.testing` for the rule)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from .._tolerance import FLOOR_UNITS, K
from ..spec import dtype_name
from ._problems import AttentionProblem, References, attention_references

__all__ = ["Comparison", "assert_close_to_reference", "compare_attention", "compare_to_reference"]

_LEGACY_FLOOR_ULPS = 8
_NAMES = ("out", "dq", "dk", "dv")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The outcome of one comparison against the float64 reference.

    Attributes:
        name: what was compared (``"out"``, ``"dq"``, ...).
        error: the candidate's largest absolute error against the float64 reference.
        reference_error: the same-dtype math backend's largest absolute error.
        bound: the bound at ``worst_index`` (``K * reference_error`` plus that element's floor).
        worst_index: the element whose error uses the largest share of its bound.
        share_over: the share of compared elements whose error exceeds their bound.
        nan_mismatch: positions where exactly one of candidate and reference is NaN.
        usage: the largest ``error_i / bound_i``; the comparison passes when it is <= 1.
        compared: how many elements were compared (rows that see no key are left out).
    """

    name: str
    error: float
    reference_error: float
    bound: float
    worst_index: tuple[int, ...]
    share_over: float
    nan_mismatch: int
    usage: float = float("nan")
    compared: int = -1

    @property
    def passed(self) -> bool:
        """No NaN mismatch, and every compared element within its bound."""
        if self.nan_mismatch:
            return False
        if math.isnan(self.usage):  # built by hand with the scalar fields only
            return self.error <= self.bound
        return self.usage <= 1.0

    @property
    def ratio(self) -> float:
        """error / reference_error (how many times the same-dtype math error; inf if that was 0)."""
        if self.reference_error == 0:
            return 0.0 if self.error == 0 else float("inf")
        return self.error / self.reference_error

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        s = (f"{verdict} {self.name}: max err {self.error:.3g} (same-dtype math err {self.reference_error:.3g}, "
             f"ratio {self.ratio:.2f}); worst at {self.worst_index}: bound {self.bound:.3g}, "
             f"{self.usage:.2f} of it used")
        if not self.passed:
            s += f"; {self.share_over:.2%} of {self.compared} elements over their bound"
            if self.nan_mismatch:
                s += f", {self.nan_mismatch} NaN mismatches"
        return s


def compare_to_reference(
    candidate: torch.Tensor,
    same_dtype: torch.Tensor,
    ref64: torch.Tensor,
    *,
    name: str = "out",
    k: float = K,
    magnitude: torch.Tensor | None = None,
    score_magnitude: torch.Tensor | None = None,
    reduction: int = 1,
    include: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Comparison:
    """Apply the tolerance rule to one tensor.

    Args:
        candidate: what the backend under test produced.
        same_dtype: the math backend's result in the candidate's dtype.
        ref64: the float64 math result.
        name: a label for messages.
        k: the multiple of the same-dtype math error allowed (default :data:`K`).
        magnitude: ``M`` of the floor, broadcastable to ``candidate`` (see :mod:`sdpa_flash.testing`;
            :func:`attention_references` computes it). Without it the floor falls back to the old
            ``8 * eps * max(1, max|ref64|)``, kept only for callers that have nothing but the three tensors.
        score_magnitude: ``Ms`` of the floor (default 0).
        reduction: ``n`` of the floor: the longest sum in the problem.
        include: boolean, broadcastable to ``candidate``: the elements to compare (default all).
        dtype: the candidate's dtype for ``eps`` (default ``candidate.dtype``).

    Returns:
        The :class:`Comparison`.

    Raises:
        ValueError: ``candidate`` or ``same_dtype`` is not shaped like ``ref64``.
    """
    if candidate.shape != ref64.shape or same_dtype.shape != ref64.shape:
        # compared element-wise, a broadcastable shape (a missing batch or head) would pass unnoticed
        raise ValueError(f"Expected {name} of shape {tuple(ref64.shape)} like the reference, but got candidate "
                         f"{tuple(candidate.shape)} and same-dtype {tuple(same_dtype.shape)} instead.")
    ref = ref64.detach().to(torch.float64)
    cand = candidate.detach().to(device=ref.device, dtype=torch.float64)
    same = same_dtype.detach().to(device=ref.device, dtype=torch.float64)
    dt = dtype or candidate.dtype
    keep = torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    if include is not None:
        keep = keep & include.to(ref.device)
    nan_c, nan_r = torch.isnan(cand), torch.isnan(ref)
    inf = float("inf")
    # equal values (also equal infinities) and NaN where the reference is NaN are no error; a NaN or an infinity
    # the reference does not have is an infinite one
    err = torch.where(cand == ref, 0.0, (cand - ref).abs()).masked_fill(nan_c & nan_r, 0.0)
    err = err.nan_to_num(inf, posinf=inf).masked_fill(~keep, 0.0)
    math_err = torch.where(same == ref, 0.0, (same - ref).abs()).nan_to_num(0.0, posinf=0.0).masked_fill(~keep, 0.0)
    mismatch_t = ((nan_c ^ nan_r) & keep).sum()
    eps = torch.finfo(dt).eps
    if magnitude is None:
        finite_ref = ref.masked_fill(~torch.isfinite(ref) | ~keep, 0.0)
        scale_mag = max(1.0, float(finite_ref.abs().max())) if ref.numel() else 1.0
        floor = torch.full_like(ref, _LEGACY_FLOOR_ULPS * eps * scale_mag)
    else:
        eps_acc = torch.finfo(torch.float64 if dt == torch.float64 else torch.float32).eps
        m = magnitude.to(device=ref.device, dtype=torch.float64).expand_as(ref)
        ms = m if score_magnitude is None else m + score_magnitude.to(device=ref.device, dtype=torch.float64)
        floor = FLOOR_UNITS * (eps * m + eps_acc * math.sqrt(max(reduction, 1)) * ms)
    if not ref.numel():
        return Comparison(name, 0.0, 0.0, 0.0, (), 0.0, 0, 0.0, 0)
    ref_err_t = math_err.max()
    bound = (k * ref_err_t + floor).masked_fill(~keep, inf)
    use = torch.where(err == 0, 0.0, err / bound).reshape(-1)
    worst = use.argmax()
    # one host sync for every statistic (this runs once per tensor per example, on GPUs too)
    stats = torch.stack([keep.sum().double(), use[worst], (err > bound).sum().double(), err.max(),
                         bound.reshape(-1)[worst], worst.double(), ref_err_t, mismatch_t.double()]).tolist()
    compared, usage, over, error, worst_bound, flat, ref_err, mismatch_f = stats
    mismatch = int(mismatch_f)
    worst_index = tuple(int(i) for i in torch.unravel_index(torch.tensor(int(flat)), err.shape))
    share = over / compared if compared else 0.0
    return Comparison(name, error, ref_err, worst_bound, worst_index, share, mismatch, usage, int(compared))


def assert_close_to_reference(
    candidate: torch.Tensor | Sequence[torch.Tensor],
    same_dtype: torch.Tensor | Sequence[torch.Tensor] | AttentionProblem,
    ref64: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    names: Sequence[str] = _NAMES,
    k: float = K,
    references: References | None = None,
) -> list[Comparison]:
    """Raise ``AssertionError`` (listing every failing tensor) unless each candidate passes the rule.

    Two forms:

    * ``assert_close_to_reference(out_or_[out, dq, dk, dv], problem)`` with an :class:`AttentionProblem`:
      the references, floors and excluded rows are worked out here (``references=`` reuses ones already
      computed with :func:`attention_references`). This is the form to use.
    * ``assert_close_to_reference(candidates, same_dtype, ref64)`` with the three sets of tensors: the floor
      is then the old ``8 * eps * max(1, max|ref64|)`` (see :func:`compare_to_reference`).

    Returns:
        One :class:`Comparison` per tensor.

    Raises:
        ValueError: lists of different lengths (or fewer ``names`` than tensors): every tensor given is compared.
    """
    if isinstance(same_dtype, AttentionProblem):
        results = compare_attention(same_dtype, candidate, references=references, k=k)
        context = f" for {same_dtype.describe()}"
    else:
        if ref64 is None:
            raise TypeError("assert_close_to_reference needs ref64 when not given an AttentionProblem")
        cands, sames, refs = ([t] if isinstance(t, torch.Tensor) else list(t)
                              for t in (candidate, same_dtype, ref64))
        if not len(cands) == len(sames) == len(refs):  # a tensor left out of the comparison must not pass
            raise ValueError(f"Expected as many candidates as references, but got {len(cands)} candidates, "
                             f"{len(sames)} same-dtype and {len(refs)} float64 references instead.")
        if len(names) < len(cands):
            raise ValueError(f"Expected a name for each of the {len(cands)} tensors, but got {len(names)} names "
                             f"({', '.join(names)}) instead.")
        results = [
            compare_to_reference(c, s, r, name=n, k=k)
            for c, s, r, n in zip(cands, sames, refs, names[: len(cands)], strict=True)
        ]
        context = ""
    failed = [str(c) for c in results if not c.passed]
    if failed:
        raise AssertionError(f"attention differs from the float64 reference beyond tolerance{context}:\n  "
                             + "\n  ".join(failed))
    return results


def compare_attention(
    problem: AttentionProblem,
    outputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    references: References | None = None,
    k: float = K,
) -> list[Comparison]:
    """Compare ``out`` (or ``[out, dq, dk, dv]``) of a candidate with the references of ``problem``.

    Rows of queries that see no key are left out of ``out`` and ``dq`` (see :mod:`sdpa_flash.testing`).

    Raises:
        ValueError: more outputs than references, an output not in the problem's dtype, or one not shaped like
            its reference.
    """
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    refs = references or attention_references(problem, backward=len(outs) > 1)
    if len(outs) > len(refs.ref64):
        raise ValueError(f"Expected at most {len(refs.ref64)} outputs for these references, got {len(outs)}.")
    wrong = [f"{n}: {dtype_name(c.dtype)}" for n, c in zip(_NAMES, outs, strict=False) if c.dtype != problem.dtype]
    if wrong:  # an attention must answer in its inputs' dtype, as SDPA does
        raise ValueError(f"Expected outputs of dtype {dtype_name(problem.dtype)} like the inputs, but got "
                         f"{', '.join(wrong)} instead.")
    return [
        compare_to_reference(c, refs.same_dtype[i], refs.ref64[i], name=_NAMES[i], k=k, magnitude=refs.magnitude[i],
                             score_magnitude=refs.score_magnitude[i], reduction=refs.reduction,
                             include=refs.include[i], dtype=problem.dtype)
        for i, c in enumerate(outs)
    ]
