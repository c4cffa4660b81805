"""Attention problems (:class:`ProblemParams` → :class:`AttentionProblem`), their references and outputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ..spec import AttentionSpec, dtype_name
from ._reference import reference_attention

__all__ = ["AttentionProblem", "ProblemParams", "References", "attention_outputs", "attention_references"]

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
    """``M`` and ``Ms`` for out (and dq, dk, dv): the floor of :mod:`sdpa_flash.testing`, computed in float64."""
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
        from ..attention import attention as fn
    backward = problem.params.backward if backward is None else backward
    leaves = problem.leaves(requires_grad=backward)
    out = fn(*leaves, **problem.kwargs(), **options)  # type: ignore[misc]  # not None: imported above if it was
    if not backward:
        return [out.detach()]
    if problem.grad_out is None:
        raise ValueError("Expected a problem with grad_out for a backward, but it has none.")
    grads = torch.autograd.grad(out, leaves, problem.grad_out)
    return [out.detach(), *grads]
