"""Verifying attention against float64 math: the tolerance rule, random problems, and what actually ran.

Used by sdpa_flash's own tests, the CLI self-check, and by users for their models. Nothing here needs
``hypothesis`` except :func:`attention_problems` (and :func:`register_hypothesis_profiles`), which import it
when called, so ``import sdpa_flash.testing`` works without it.

The tolerance rule
------------------
One rule for every backend, dtype, device, output and gradient::

    |candidate_i - ref64_i| <= K * max_j |math_j - ref64_j|  +  FLOOR_UNITS * (eps * M_i + eps_acc * Ms_i)

for every compared element ``i``, where

* ``ref64`` is PyTorch's math backend in float64 on the same (already rounded) inputs, and ``math`` the math
  backend in the candidate's own dtype: a candidate may be ``K = 2`` times as far from the exact answer as
  PyTorch's own implementation is in that dtype — flash-attn's rule for its own kernels;
* the second term, the *floor*, is what any correct kernel must be allowed however lucky the math backend is:
  ``eps`` is the machine epsilon of the candidate's dtype, ``eps_acc`` that of its accumulation type (float32,
  or float64 for float64); ``M_i`` is element ``i`` evaluated with the absolute value of every factor (``P|V|``
  for the output, ``P^T|dO|`` for dV, ``scale * (P o (|dO||V|^T + rowsum|dO o O|)) |K|`` for dQ, ...: the size
  of what a kernel rounds when it stores P, dS or O in the input dtype), and ``Ms_i`` is how far element ``i``
  moves, to first order, per unit relative error in the attention scores (which kernels accumulate in
  ``eps_acc``). ``FLOOR_UNITS = 2``.

Why this floor and not a larger K (evidence: 30,000 random CPU problems, B <= 2, H <= 4, S <= 160, D <= 16,
every causal kind and mask, torch 2.13; ``tests/test_testing.py`` keeps the pieces of it that are cheap):

* PyTorch's math backend computes float16/bfloat16 in float32 and rounds once at the end (unless
  ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``): 99.98% of its half-precision outputs
  are the correctly rounded float64 result, so its error is the output's own rounding. A FlashAttention-2
  kernel rounds P to the input dtype before ``P @ V`` and computes the backward's ``rowsum(dO o O)`` from the
  rounded output, so the ratio of the two errors is unbounded whenever the math backend happens to be exact
  — e.g. one visible key, where math's dQ is exactly 0 (an all-cancelling row). Measured on PyTorch's CPU
  flash kernel: error / same-dtype math error reached 2.9 (float16 output), 6.7 (float32 dV) and infinity
  (math exact) in 30-50% of half-precision dQ/dK cases. No finite K is the fix.
* The floor it replaces, ``8 * eps * max(1, max|ref64|)``, was unsound both ways: in bfloat16/float16 it
  was above ``2 x`` the math error in every one of 2,400 cases (so K never decided anything there, and the
  rule tolerated 16 half-ulps at unit scale), while float64 gradients still failed it (16 of 286) because
  the magnitude of a result that cancels to ~0 is not the magnitude of what was rounded; and ``max(1, .)``
  made it depend on the inputs being of unit scale.
* The new floor is a first-order error bound of the algorithm class: a kernel with float32 accumulators that
  stores P (forward) or dS and uses the stored O (backward) in the input dtype is off by at most about
  ``eps * M`` (forward) and ``1.5 * eps * M`` (backward); ``FLOOR_UNITS = 2`` covers both. Measured, the
  largest floor actually needed beyond ``K x math`` was 0.4 units (half precision) and 0.2 units (float32,
  float64) on the CPU kernels and the chunked backend. It shrinks with the inputs' scale, never asks for
  less than the rounding of stored intermediates, and in float64 (where ``math`` *is* the reference, so the
  K term is 0) it is the whole tolerance: a few float64 ulps of the terms summed.

Non-finite inputs are compared as what they are: a NaN or infinity of the candidate must sit where the reference
has the same one, and the floor of every other element is computed with the non-finite input elements taken as
0 (an element that does not see them owes them nothing; one that does is NaN or infinite in the reference).

Rows of queries that see no key (``causal="bottom_right"`` with ``Sq > Sk``, a mask row that is all False)
have no defined output yet. :func:`compare_attention` leaves them out of the value comparison, the upstream
gradient of those rows is zero (so they feed nothing into dK/dV), and ``tests/test_properties.py`` checks
separately that every backend and the reference agree on them (on torch 2.13 CPU all give 0, and dQ 0).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .spec import AttentionSpec, dtype_name

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

    from .capability import Capabilities

__all__ = [
    "FLOOR_UNITS",
    "PROPERTY_PROFILES",
    "AttentionProblem",
    "Comparison",
    "K",
    "ProblemParams",
    "PropertyProfile",
    "References",
    "assert_close_to_reference",
    "attention_outputs",
    "attention_problems",
    "attention_references",
    "compare_attention",
    "compare_to_reference",
    "property_profile",
    "ran_backends",
    "reference_attention",
    "register_hypothesis_profiles",
]

from ._tolerance import FLOOR_UNITS, K

_LEGACY_FLOOR_ULPS = 8
_NAMES = ("out", "dq", "dk", "dv")


# ------------------------------------------------------------------------------------------ reference
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
    ``dtype=None`` runs it in the inputs' own dtype (PyTorch then computes float16/bfloat16 in float32).
    """
    from .spec import causal_mask_tensor

    q, k, v = (query, key, value) if layout == "bhsd" else (t.transpose(1, 2) for t in (query, key, value))
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(dtype)
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # a str causal is not a key: it falls through as the default
    kind = {True: "top_left", False: None, None: None}.get(causal, causal)  # type: ignore[arg-type]
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


# ------------------------------------------------------------------------------------------ comparison
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
        magnitude: ``M`` of the floor, broadcastable to ``candidate`` (see the module docstring;
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


# ---------------------------------------------------------------------------------------------- problems
_MASKS = ("none", "bool", "float", "key_padding")
_MASK_SHAPES = ("full", "batch", "heads", "2d", "keys")
_DATA = ("normal", "large_logits", "zero_query", "equal_keys", "constant_values")


@dataclasses.dataclass(frozen=True)
class ProblemParams:
    """Everything that defines one attention problem; ``build(device)`` makes its tensors (deterministically).

    Shapes are in (B, H, S, D) terms whatever the layout: B batch, Hq query heads, Hkv key/value heads
    (``Hq % Hkv == 0``), Sq / Sk query / key length, D query/key head dim, Dv value head dim.

    Attributes:
        dtype: of query, key, value (and of a float mask).
        batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v: the sizes above.
        layout: ``"bhsd"`` or ``"bshd"``: how the tensors are laid out and passed.
        causal: ``False``, ``True`` (top-left) or ``"bottom_right"``.
        mask: ``"none"``, ``"bool"`` (True = attend), ``"float"`` (additive, some ``-inf``) or
            ``"key_padding"`` (boolean ``(B, 1, 1, Sk)``: each batch row sees a prefix of the keys).
        mask_shape: for bool/float masks: ``"full"`` (B, Hq, Sq, Sk), ``"batch"`` (B, 1, Sq, Sk), ``"heads"``
            (1, Hq, Sq, Sk), ``"2d"`` (Sq, Sk) or ``"keys"`` (B, 1, 1, Sk).
        mask_density: share of attended entries (bool / key padding), or of finite entries (float).
        scale: the softmax scale, ``None`` for ``1/sqrt(D)``.
        data: ``"normal"`` (standard normal), ``"large_logits"`` (query x 4: peaked softmax), ``"zero_query"``
            (uniform attention), ``"equal_keys"`` (ties) or ``"constant_values"`` (every value row equal:
            the output does not depend on the scores, so dQ and dK cancel to 0).
        seed: seeds the CPU generator that draws every value.
        backward: whether the problem includes an upstream gradient (for dQ, dK, dV).
    """

    dtype: torch.dtype
    batch: int = 1
    heads_q: int = 1
    heads_kv: int = 1
    seqlen_q: int = 1
    seqlen_k: int = 1
    head_dim: int = 8
    head_dim_v: int = 8
    layout: str = "bhsd"
    causal: bool | str = False
    mask: str = "none"
    mask_shape: str = "full"
    mask_density: float = 0.7
    scale: float | None = None
    data: str = "normal"
    seed: int = 0
    backward: bool = False

    def spec(self, device_type: str) -> AttentionSpec:
        """The :class:`AttentionSpec` of this problem, as the planner sees it (no dropout)."""
        # a str causal is not a key: it falls through as the default
        causal = {True: "top_left", False: None}.get(self.causal, self.causal)  # type: ignore[arg-type]
        mask = {"none": None, "key_padding": "bool"}.get(self.mask, self.mask)
        return AttentionSpec(device_type, self.dtype, self.batch, self.heads_q, self.heads_kv, self.seqlen_q,
                             self.seqlen_k, self.head_dim, self.head_dim_v, causal, mask, False, self.backward)

    def build(self, device: torch.device | str = "cpu") -> AttentionProblem:
        """Draw the tensors (on the CPU from ``seed``, then moved to ``device``)."""
        gen = torch.Generator().manual_seed(self.seed)
        b, hq, hk, sq, sk = self.batch, self.heads_q, self.heads_kv, self.seqlen_q, self.seqlen_k
        q = torch.randn(b, hq, sq, self.head_dim, generator=gen)
        k = torch.randn(b, hk, sk, self.head_dim, generator=gen)
        v = torch.randn(b, hk, sk, self.head_dim_v, generator=gen)
        if self.data == "large_logits":
            q = q * 4
        elif self.data == "zero_query":
            q = torch.zeros_like(q)
        elif self.data == "equal_keys":
            k = k[:, :, :1].expand_as(k).clone()
        elif self.data == "constant_values":
            v = v[:, :, :1].expand_as(v).clone()
        mask = self._mask(gen)
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(self.dtype)
        grad = torch.randn(b, hq, sq, self.head_dim_v, generator=gen).to(self.dtype) if self.backward else None
        dev = torch.device(device)
        # q, k, v: mypy cannot count a starred generator
        problem = AttentionProblem(self, dev, *(self._lay(t).to(dev) for t in (q, k, v)),  # type: ignore[call-arg]
                                   None if mask is None else mask.to(dev), None)
        if grad is not None:
            visible = problem.visible_rows(layout="bhsd").to("cpu")
            grad = grad * visible.unsqueeze(-1).to(grad.dtype)  # rows that see no key pass no gradient
            problem = dataclasses.replace(problem, grad_out=self._lay(grad).to(dev))
        return problem

    def _lay(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.layout == "bhsd" else t.transpose(1, 2).contiguous()

    def _mask(self, gen: torch.Generator) -> torch.Tensor | None:
        b, hq, sq, sk = self.batch, self.heads_q, self.seqlen_q, self.seqlen_k
        if self.mask == "none":
            return None
        if self.mask == "key_padding":
            lengths = (torch.rand(b, generator=gen) * (sk + 1) * self.mask_density * 1.4).long().clamp(0, sk)
            return (torch.arange(sk).unsqueeze(0) < lengths.unsqueeze(1)).view(b, 1, 1, sk)
        shape = {"full": (b, hq, sq, sk), "batch": (b, 1, sq, sk), "heads": (1, hq, sq, sk), "2d": (sq, sk),
                 "keys": (b, 1, 1, sk)}[self.mask_shape]
        keep = torch.rand(shape, generator=gen) < self.mask_density
        if self.mask == "bool":
            return keep
        bias = torch.randn(shape, generator=gen) * 2.0
        return bias.masked_fill(~keep, float("-inf"))


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
    """One attention problem with its tensors, in the layout it is passed in (see :class:`ProblemParams`).

    Attributes:
        params: what defines it.
        device: where the tensors live.
        query, key, value: ``(B, Hq, Sq, D)``, ``(B, Hkv, Sk, D)``, ``(B, Hkv, Sk, Dv)`` for layout
            ``"bhsd"``; ``(B, S, H, D)`` for ``"bshd"``.
        attn_mask: the mask, broadcastable to ``(B, Hq, Sq, Sk)``, or ``None``.
        grad_out: the upstream gradient, shaped like the output (zero on rows that see no key), or ``None``.
    """

    params: ProblemParams
    device: torch.device
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    grad_out: torch.Tensor | None

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example: code that rebuilds it
        return f"{self.params!r}.build({str(self.device)!r})"

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    def kwargs(self) -> dict[str, Any]:
        """``attn_mask``, ``causal``, ``scale`` and ``layout``, as :func:`sdpa_flash.attention` takes them."""
        p = self.params
        return {"attn_mask": self.attn_mask, "causal": p.causal, "scale": p.scale, "layout": p.layout}

    def leaves(self, dtype: torch.dtype | None = None, *, requires_grad: bool | None = None) -> list[torch.Tensor]:
        """Fresh leaf copies of query, key and value (in ``dtype`` if given) for one forward/backward."""
        grad = self.params.backward if requires_grad is None else requires_grad
        return [t.detach().to(dtype or t.dtype).requires_grad_(grad) for t in (self.query, self.key, self.value)]

    def spec(self) -> AttentionSpec:
        return self.params.spec(self.device.type)

    def allowed(self) -> torch.Tensor:
        """``(B, Hq, Sq, Sk)`` boolean: which keys each query may see, worked out from first principles."""
        p = self.params
        allowed = torch.ones(p.batch, p.heads_q, p.seqlen_q, p.seqlen_k, dtype=torch.bool, device=self.device)
        if self.attn_mask is not None:
            m = self.attn_mask if self.attn_mask.dtype == torch.bool else self.attn_mask != float("-inf")
            allowed = allowed & m
        i = torch.arange(p.seqlen_q, device=self.device).unsqueeze(1)
        j = torch.arange(p.seqlen_k, device=self.device).unsqueeze(0)
        if p.causal is True or p.causal == "top_left":
            allowed = allowed & (j <= i)
        elif p.causal == "bottom_right":
            allowed = allowed & (j <= i + p.seqlen_k - p.seqlen_q)
        return allowed

    def visible_rows(self, *, layout: str | None = None) -> torch.Tensor:
        """Boolean, True for query rows that see at least one key: ``(B, Hq, Sq)``, or ``(B, Sq, Hq)`` for
        layout ``"bshd"`` (default: the problem's layout)."""
        rows = self.allowed().any(-1)
        return rows.transpose(1, 2) if (layout or self.params.layout) == "bshd" else rows

    def describe(self) -> str:
        """One line: ``float16 cpu: q (2, 4, 17, 8) k/v (2, 2, 9, 8/8) bshd causal=bottom_right ...``."""
        p = self.params
        # a mask other than "none" / "key_padding" is built as attn_mask
        mask = p.mask if p.mask in ("none", "key_padding") else f"{p.mask}{tuple(self.attn_mask.shape)}"  # type: ignore[union-attr]
        return (f"{dtype_name(p.dtype)} {self.device}: q ({p.batch}, {p.heads_q}, {p.seqlen_q}, {p.head_dim}) "
                f"k/v ({p.batch}, {p.heads_kv}, {p.seqlen_k}, {p.head_dim}/{p.head_dim_v}) {p.layout} "
                f"causal={p.causal} mask={mask} scale={p.scale} data={p.data} seed={p.seed}"
                + (" +backward" if p.backward else ""))


@dataclasses.dataclass(frozen=True)
class References:
    """What a candidate is compared with, per tensor ``out`` (and ``dq``, ``dk``, ``dv`` with a backward).

    Attributes:
        ref64: float64 math results, in the problem's layout.
        same_dtype: math results in the problem's dtype.
        magnitude: ``M`` of the floor, float64, same shapes.
        score_magnitude: ``Ms`` of the floor, float64, same shapes.
        include: per tensor, the elements compared (rows that see no key are left out of out and dq).
        reduction: ``n`` of the floor: the longest sum, ``max(Sk, Sq * Hq / Hkv, D, Dv)``.
    """

    ref64: list[torch.Tensor]
    same_dtype: list[torch.Tensor]
    magnitude: list[torch.Tensor]
    score_magnitude: list[torch.Tensor]
    include: list[torch.Tensor]
    reduction: int


def attention_references(problem: AttentionProblem, *, backward: bool | None = None) -> References:
    """The float64 and same-dtype math results, and the floor's magnitudes, for ``problem``."""
    backward = problem.params.backward if backward is None else backward
    kw = problem.kwargs()
    mask64 = kw["attn_mask"]
    if mask64 is not None and mask64.dtype != torch.bool:
        mask64 = mask64.double()
    leaves64 = problem.leaves(torch.float64, requires_grad=backward)
    ref = reference_attention(*leaves64, **{**kw, "attn_mask": mask64})
    leaves = problem.leaves(requires_grad=backward)
    same = reference_attention(*leaves, dtype=None, **kw)
    ref64, same_dtype = [ref.detach()], [same.detach()]
    if backward:
        if problem.grad_out is None:
            raise ValueError("Expected a problem with grad_out for backward references, but it has none.")
        ref64 += [g.detach() for g in torch.autograd.grad(ref, leaves64, problem.grad_out.double())]
        same_dtype += [g.detach() for g in torch.autograd.grad(same, leaves, problem.grad_out)]
    mags, smags = _magnitudes(problem, ref.detach(), backward)
    rows = problem.visible_rows().unsqueeze(-1)
    everything = torch.ones((), dtype=torch.bool, device=problem.device)
    include = [rows, rows, everything, everything][: len(ref64)]
    p = problem.params
    reduction = max(p.seqlen_k, p.seqlen_q * p.heads_q // p.heads_kv, p.head_dim, p.head_dim_v)
    return References(ref64, same_dtype, mags, smags, include, reduction)


def _magnitudes(problem: AttentionProblem, out64: torch.Tensor, backward: bool) -> tuple[list[torch.Tensor], ...]:
    """``M`` and ``Ms`` for out (and dq, dk, dv): the module docstring's floor, computed in float64."""
    p = problem.params
    bhsd = (lambda t: t) if p.layout == "bhsd" else (lambda t: t.transpose(1, 2))

    def finite(t: torch.Tensor) -> torch.Tensor:
        # A NaN or infinite input element is compared as what it is (the reference carries it to the rows that
        # see it); the floor of the finite rows must not become NaN through 0 * inf in the products below.
        return t.nan_to_num(0.0, posinf=0.0, neginf=0.0)

    q_raw, k_raw, v_raw = (bhsd(t).double() for t in (problem.query, problem.key, problem.value))
    q, k, v = finite(q_raw), finite(k_raw), finite(v_raw)
    rep = p.heads_q // p.heads_kv
    kx, vx = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = p.scale if p.scale is not None else 1.0 / math.sqrt(p.head_dim)
    allowed = problem.allowed()
    bias = torch.zeros((), dtype=torch.float64, device=problem.device)
    if problem.attn_mask is not None and problem.attn_mask.dtype != torch.bool:
        bias = problem.attn_mask.double().masked_fill(problem.attn_mask == float("-inf"), 0.0)
    scores = (scale * q_raw @ k_raw.repeat_interleave(rep, 1).transpose(-1, -2) + bias).masked_fill(
        ~allowed, float("-inf"))
    prob = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # 0 on rows that see no key (or see a NaN score)
    s_abs = (abs(scale) * q.abs() @ kx.abs().transpose(-1, -2) + bias.abs()).masked_fill(~allowed, 0.0)
    r = (prob * s_abs).sum(-1, keepdim=True)
    prob_s = prob * (s_abs + r)  # |dP| per unit relative error in the scores
    o = finite(bhsd(out64).abs())
    m_out, ms_out = prob @ vx.abs(), prob_s @ vx.abs()
    mags, smags = [m_out], [ms_out]
    if backward:
        assert problem.grad_out is not None
        do = finite(bhsd(problem.grad_out).double().abs())
        g = do @ vx.abs().transpose(-1, -2) + (do * o).sum(-1, keepdim=True)  # |dP| + |rowsum(dO o O)|
        t, ts = prob * g, prob_s * g + prob * (do * ms_out).sum(-1, keepdim=True)

        def fold(x: torch.Tensor) -> torch.Tensor:  # GQA: sum the query heads of each key/value head
            return x.unflatten(1, (p.heads_kv, rep)).sum(2)

        mags += [abs(scale) * t @ kx.abs(), fold(abs(scale) * t.transpose(-1, -2) @ q.abs()),
                 fold(prob.transpose(-1, -2) @ do)]
        smags += [abs(scale) * ts @ kx.abs(), fold(abs(scale) * ts.transpose(-1, -2) @ q.abs()),
                  fold(prob_s.transpose(-1, -2) @ do)]
    back = (lambda t: t) if p.layout == "bhsd" else (lambda t: t.transpose(1, 2))
    return [back(m) for m in mags], [back(m) for m in smags]


def compare_attention(
    problem: AttentionProblem,
    outputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    references: References | None = None,
    k: float = K,
) -> list[Comparison]:
    """Compare ``out`` (or ``[out, dq, dk, dv]``) of a candidate with the references of ``problem``.

    Rows of queries that see no key are left out of ``out`` and ``dq`` (see the module docstring).

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


def attention_outputs(
    problem: AttentionProblem,
    fn: Callable[..., torch.Tensor] | None = None,
    *,
    backward: bool | None = None,
    **options: Any,
) -> list[torch.Tensor]:
    """Run ``fn(query, key, value, **problem.kwargs(), **options)`` on fresh leaves: ``[out]``, or
    ``[out, dq, dk, dv]`` with a backward through ``problem.grad_out``.

    ``fn`` defaults to :func:`sdpa_flash.attention`; pass your own attention with the same signature to test
    it (``options`` such as ``policy="flash"`` are passed through).

    Example:
        >>> problem = ProblemParams(torch.float32, seqlen_q=5, seqlen_k=7, causal=True, backward=True).build()
        >>> _ = assert_close_to_reference(attention_outputs(problem, policy="flash"), problem)
    """
    if fn is None:
        from .attention import attention as fn
    backward = problem.params.backward if backward is None else backward
    leaves = problem.leaves(requires_grad=backward)
    out = fn(*leaves, **problem.kwargs(), **options)  # type: ignore[misc]  # not None: imported above if it was
    if not backward:
        return [out.detach()]
    if problem.grad_out is None:
        raise ValueError("Expected a problem with grad_out for a backward, but it has none.")
    grads = torch.autograd.grad(out, leaves, problem.grad_out)
    return [out.detach(), *grads]


# ---------------------------------------------------------------------------------------------- strategies
def attention_problems(
    backend: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtypes: Sequence[torch.dtype] | None = None,
    min_batch: int = 1,
    max_batch: int = 2,
    max_heads: int = 4,
    min_seqlen: int = 1,
    max_seqlen: int = 24,
    seqlens: Sequence[int] | None = None,
    head_dims: Sequence[int] | None = None,
    max_head_dim: int = 16,
    shapes: Sequence[tuple[int, int, int, int, int, int, int]] | None = None,
    layouts: Sequence[str] = ("bhsd", "bshd"),
    causal: Sequence[bool | str] = (False, True, "bottom_right"),
    masks: Sequence[str] = _MASKS,
    data: Sequence[str] = _DATA,
    gqa: bool = True,
    min_group: int = 1,
    backward: bool = False,
    capabilities: Capabilities | None = None,
) -> SearchStrategy[AttentionProblem]:
    """A hypothesis strategy of :class:`AttentionProblem` that ``backend`` claims to handle on ``device``.

    Sizes, dtypes, masks and head dims are drawn within what the backend's requirements allow, and every
    drawn problem is then filtered through :func:`sdpa_flash.plan` with that backend as a strict policy (the
    backend's own ``not_supported_reasons``, the denylist and, on a real GPU, PyTorch's check), so the
    backend must run each one. Without ``backend``, any valid problem is drawn. Dropout is always off.

    Args:
        backend: ``"flash"``, ``"cudnn"``, ``"efficient"``, ``"math"``, ``"chunked"`` or ``None``.
        device: where the tensors go.
        dtypes: dtypes to draw from (default: every dtype the backend takes there).
        min_batch, max_batch, max_heads, min_seqlen, max_seqlen, max_head_dim: size limits (B, Hq, Sq and Sk,
            D and Dv).
        seqlens: lengths drawn as often as the whole ``min_seqlen..max_seqlen`` range (e.g. a kernel's tile
            edges ``63, 64, 65``), for Sq and Sk each.
        head_dims: head dims to draw from instead of ``1..max_head_dim``.
        shapes: ``(B, Hq, Hkv, Sq, Sk, D, Dv)`` tuples to draw the sizes from instead, a pool of shapes that
            repeat, for kernels that build a plan per distinct shape (cuDNN); of the limits above only
            ``min_batch``, ``min_seqlen``, ``min_group``, ``gqa`` and the backend's own apply.
        layouts, causal, masks, data: the kinds to draw from (see :class:`ProblemParams`).
        gqa: draw fewer key/value heads than query heads too.
        min_group: the fewest query heads per key/value head (2 draws only GQA/MQA problems).
        backward: include an upstream gradient (and ask the backend for a backward).
        capabilities: the device's :class:`~sdpa_flash.Capabilities` (default: probed).

    Example:
        >>> from hypothesis import given
        >>> @given(attention_problems("flash", backward=True))
        ... def test_flash(problem):
        ...     assert_close_to_reference(attention_outputs(problem, policy="flash"), problem)
    """
    from hypothesis import assume
    from hypothesis import strategies as st

    from .backends import BACKENDS
    from .capability import capabilities as probe
    from .errors import BackendUnavailableError
    from .planner import plan
    from .policy import resolve_policy

    dev = torch.device(device)
    caps = capabilities or probe(dev)
    req = BACKENDS[backend].requirements(dev.type) if backend else None
    if backend and req is None:
        raise ValueError(f"Expected a backend with kernels for {dev.type}, but {backend!r} has none there.")
    all_dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    dtype_pool = [d for d in (dtypes or all_dtypes) if req is None or d in req.dtypes]
    if not dtype_pool:
        raise ValueError(f"Expected dtypes that {backend} takes, but got {list(dtypes or ())} instead.")
    mask_kinds = [m for m in masks if m == "none" or req is None or req.mask]
    if not mask_kinds:
        raise ValueError(f"Expected mask kinds that {backend} takes on {dev.type} ('none'), but got {list(masks)}.")
    policy = resolve_policy(backend) if backend else None
    dims = sorted(set(head_dims)) if head_dims else list(range(1, max_head_dim + 1))
    pool = None
    if shapes is not None:
        limit = req.max_head_dim if req is not None and req.max_head_dim is not None else None
        pool = [t for t in shapes if (limit is None or max(t[5], t[6]) <= limit) and t[0] >= min_batch
                and min(t[3], t[4]) >= min_seqlen and t[1] // max(t[2], 1) >= min_group and (gqa or t[1] == t[2])
                and (req is None or not req.same_head_dim_v or t[5] == t[6])]
        if not pool or any(len(t) != 7 or t[1] % t[2] for t in pool):
            raise ValueError(f"Expected (B, Hq, Hkv, Sq, Sk, D, Dv) shapes with Hq % Hkv == 0 that {backend} takes, "
                             f"but got {list(shapes)} instead.")
    lengths = st.integers(min_seqlen, max_seqlen)
    if seqlens:
        lengths = st.one_of(lengths, st.sampled_from(sorted(set(seqlens))))
    if req is not None and req.max_head_dim is not None:
        dims = [d for d in dims if d <= req.max_head_dim]
    if not dims:
        raise ValueError(f"Expected head dims that {backend} takes on {dev.type}, but none of those asked for fit.")

    @st.composite
    def draw(draw_: Callable[..., Any]) -> AttentionProblem:
        dtype = draw_(st.sampled_from(dtype_pool))
        if pool is not None:
            batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v = draw_(st.sampled_from(pool))
        else:
            heads_kv = draw_(st.integers(1, max(1, max_heads // min_group)))
            heads_q = heads_kv * (draw_(st.integers(min_group, max(min_group, max_heads // heads_kv))) if gqa else 1)
            head_dim = draw_(st.sampled_from(dims))
            same_v = req is not None and req.same_head_dim_v
            head_dim_v = head_dim if same_v or draw_(st.booleans()) else draw_(st.sampled_from(dims))
            batch = draw_(st.integers(min_batch, max(min_batch, max_batch)))
            seqlen_q, seqlen_k = draw_(lengths), draw_(lengths)
        mask = draw_(st.sampled_from(mask_kinds))
        params = ProblemParams(
            dtype=dtype,
            batch=batch,
            heads_q=heads_q,
            heads_kv=heads_kv,
            seqlen_q=seqlen_q,
            seqlen_k=seqlen_k,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            layout=draw_(st.sampled_from(list(layouts))),
            causal=draw_(st.sampled_from(list(causal))),
            mask=mask,
            mask_shape=draw_(st.sampled_from(_MASK_SHAPES)) if mask in ("bool", "float") else "full",
            mask_density=draw_(st.sampled_from((0.3, 0.7, 0.95))) if mask != "none" else 0.7,
            scale=draw_(st.one_of(st.none(), st.floats(0.05, 2.0))),
            data=draw_(st.sampled_from(list(data))),
            seed=draw_(st.integers(0, 2**31 - 1)),
            backward=backward,
        )
        if policy is not None:
            try:
                plan(params.spec(dev.type), caps, policy)
            except BackendUnavailableError:
                assume(False)
        return params.build(dev)

    return draw()


# -------------------------------------------------------------------------------------------- what ran
_KERNEL_EVENTS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_backward": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "flash",
    "aten::_flash_attention_forward": "flash",
    "aten::_flash_attention_backward": "flash",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_cudnn_attention_backward": "cudnn",
    "aten::_cudnn_attention_forward": "cudnn",
    "aten::_cudnn_attention_backward": "cudnn",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_efficient_attention_backward": "efficient",
    "aten::_efficient_attention_forward": "efficient",
    "aten::_efficient_attention_backward": "efficient",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_fused_attention_overrideable_backward": "overrideable",
    "_Chunked": "chunked",  # the chunked backend's autograd.Function, recorded under its class name
    "_ChunkedBackward": "chunked",
}


def ran_backends(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> set[str]:
    """Which attention kernels ``fn(*args, **kwargs)`` actually ran, observed with ``torch.profiler``.

    Every PyTorch op call is recorded (CPU-side, so CUDA kernels are seen at their launch), including
    composite ones such as the math backend's, and the chunked backend's ``autograd.Function``. Nothing about
    the call changes: no torch function mode is pushed (which would make ``attention()`` take the
    ``F.scaled_dot_product_attention`` route). Cannot nest inside another active profiler.

    Returns:
        A subset of ``{"flash", "cudnn", "efficient", "math", "chunked", "overrideable"}``; empty when no
        attention kernel ran (e.g. ``fn`` raised before running one, which propagates).

    Example:
        >>> q = torch.randn(1, 2, 8, 16)
        >>> ran_backends(lambda: sdpa_flash.attention(q, q, q, policy="math"))  # doctest: +SKIP
        {'math'}
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    return {_KERNEL_EVENTS[e.name] for e in prof.events() if e.name in _KERNEL_EVENTS}


# -------------------------------------------------------------------------------------------- profiles
@dataclasses.dataclass(frozen=True)
class PropertyProfile:
    """A named budget for property-based tests (the hypothesis profile of the same name, plus a device).

    Attributes:
        name: ``"ci"``, ``"gpu"`` or ``"dev"``.
        device: ``"cpu"`` or ``"cuda"``: where the properties run.
        max_examples: examples per headline test and parameter (the accuracy of one backend in one dtype:
            every backend and dtype on the CPU, the fused backends in float16/bfloat16 on CUDA).
        derandomize: a fixed seed per test (reproducible runs, no example database).
        description: one line.
        secondary: the share of ``max_examples`` every other property gets per parameter (see
            :meth:`examples`).
    """

    name: str
    device: str
    max_examples: int
    derandomize: bool
    description: str
    secondary: float = 0.4

    def examples(self, share: float = 1.0) -> int:
        """``max_examples * share``, rounded, at least 1: the one place a test's example count comes from.

        Example:
            >>> PROPERTY_PROFILES["ci"].examples(PROPERTY_PROFILES["ci"].secondary)
            120
        """
        return max(1, round(self.max_examples * share))


PROPERTY_PROFILES: dict[str, PropertyProfile] = {
    p.name: p for p in (
        PropertyProfile("ci", "cpu", 300, True,
                        "CPU, derandomized: >= 10,000 cases in a few minutes on 2 cores (the default)", 0.4),
        PropertyProfile("gpu", "cuda", 1000, True,
                        "CUDA: >= 1,000 cases per fused backend and half-precision dtype, forward and backward",
                        0.05),
        PropertyProfile("gpu-quick", "cuda", 400, True,
                        "CUDA: 400 cases per fused backend and half-precision dtype, for kernels that compile per "
                        "configuration (FlashAttention-4) or a short GPU session", 0.05),
        PropertyProfile("dev", "cpu", 40, False,
                        "CPU, random seeds and a local example database: quick runs while developing", 0.5),
    )
}
"""The profiles, by name; select one with ``SDPA_FLASH_HYPOTHESIS_PROFILE`` (default ``"ci"``)."""

_PROFILE_ENV = "SDPA_FLASH_HYPOTHESIS_PROFILE"


def property_profile() -> PropertyProfile:
    """The profile named by ``SDPA_FLASH_HYPOTHESIS_PROFILE`` (``"ci"`` when unset); an unknown name raises."""
    name = os.environ.get(_PROFILE_ENV, "") or "ci"
    try:
        return PROPERTY_PROFILES[name]
    except KeyError:
        from .errors import AttentionInputError

        raise AttentionInputError(f"Expected {_PROFILE_ENV} to be one of {', '.join(PROPERTY_PROFILES)}, but got "
                                  f"{name!r} instead.") from None


def register_hypothesis_profiles() -> PropertyProfile:
    """Register every :data:`PROPERTY_PROFILES` entry with hypothesis and load the selected one.

    All profiles: no deadline (first calls plan and compile kernels), ``print_blob=True`` (a failure prints
    ``@reproduce_failure``), and the falsifying problem is printed as code that rebuilds it.

    Returns:
        The loaded :class:`PropertyProfile`.
    """
    from hypothesis import HealthCheck, settings

    for p in PROPERTY_PROFILES.values():
        extra: dict[str, Any] = {"database": None} if p.derandomize else {}
        settings.register_profile(p.name, max_examples=p.max_examples, derandomize=p.derandomize, deadline=None,
                                  print_blob=True, suppress_health_check=[HealthCheck.too_slow], **extra)
    chosen = property_profile()
    settings.load_profile(chosen.name)
    return chosen
