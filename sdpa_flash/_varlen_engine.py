"""The varlen engine: plan (pure, cached) and run exact attention over a ragged batch.

Candidate paths, each exact — no sequence ever sees another's tokens or padding:

``grouped``
    Sequences are sorted by length and cut into *groups*; each group is one dense ``attention()`` call on
    ``(b, L_q, H, D)`` gathered from the packed tensor, so the policy's dense kernel (cuDNN on Hopper) does the
    work, and on CUDA the groups run on a few side streams at once so small calls fill the GPU together. A
    group whose members are shorter than its padded length is made exact one of three ways:

    * causal self-attention (every member has ``L_q == L_k``), right-padded: real queries never see the
      padding keys (they come after them), so nothing is masked;
    * ``"coordinate"``: one extra head-dim coordinate, 1 on every query and ``-2^100`` on padding keys (0 on
      real keys), so a padding key's score is ``-2^100 * scale`` and its softmax weight exactly 0, with no
      mask for the kernel to read (the head dim grows by 8: ``D + 1`` rounded up to a multiple of 8);
    * ``"mask"``: a ``(b, 1, 1, L_k)`` boolean key mask.

    Padding rows are gathered from real rows (never uninitialised memory), and their outputs are dropped, so
    their gradients are exactly 0. Where every group needs no mask and its dense plan is a kernel's direct
    route with nothing to adapt, the groups' forward and backward aten ops are called directly under one
    autograd node (:class:`_Direct`): the same kernels on the same inputs, without a few autograd nodes per
    group, which is most of a small group's host time.

``flash_varlen``
    One call of a packed (``cu_seqlens``) kernel: no padding at all, one launch. The kernel is the first of the
    policy's backends that has such an entry point and can run the batch: FlashAttention-4's
    ``flash_attn_varlen_func`` (backend ``fa4``, optional; ~0.9-1.0x dense cuDNN speed on the H200) or
    PyTorch's own flash varlen op (backend ``flash``, FlashAttention-2 speed).

``hybrid``
    The shortest sequences in one such varlen call, the rest in groups.

Not a path: cuDNN's ragged (THD) layout, ``aten._cudnn_attention_forward`` with ``cu_seqlens``. Its kernel is
what the target needs (H200, device time alone: 0.85-0.99x dense cuDNN forward, 1.05-1.08x forward+backward on
the BASELINE batches over two runs of ``benchmarks/varlen_probe.py``), but on torch 2.11 the op rebuilds its cuDNN
graph on every call (45-83 ms of host time per forward; pytorch/pytorch#191576), the backward returns wrong
dq/dk (its dQ accumulator is sized from the head dim; pytorch/pytorch#186142), and neither can be captured in a
CUDA graph to hide the host cost (capture is invalidated, or crashes in relaxed mode).
``tests/test_varlen.py::test_cudnn_ragged_layout_backward_is_exact`` is a strict xfail that says when a torch
has the fixes.

The grouping and the choice between paths come from a cost model (:class:`CostModel`, data per device type):
a group costs a fixed per-call time plus its padded FLOPs at the kernel's rate for that length; dynamic
programming over the sorted lengths finds the cheapest cut, and the cheapest path wins. ``explain()`` shows
each path's estimate and why the others lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _caches, _shadow
from .backends import BACKENDS, ranked
from .capability import Capabilities, capabilities
from .errors import AttentionInputError, BackendUnavailableError
from .planner import denylist_reasons, ranking
from .planner import plan as dense_plan
from .policy import Policy, get_policy, resolve_policy
from .spec import CAUSAL_KINDS, FLOAT_DTYPES, AttentionSpec, dtype_name
from .stats import plan_counter as _plan_counter

__all__ = [
    "COST_MODELS",
    "CostModel",
    "Group",
    "VarlenPlan",
    "VarlenSpec",
    "clear_caches",
    "explain",
    "plan_varlen",
    "run",
]



# --------------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class VarlenSpec:
    """What a varlen call's plan depends on (lengths as host tuples; shapes in (T, H, D) terms)."""

    device_type: str
    dtype: torch.dtype
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    causal: str | None = None
    dropout: bool = False
    needs_grad: bool = False

    def describe(self) -> str:
        n = len(self.seqlens_q)
        same = self.seqlens_q == self.seqlens_k
        lens = f"{sum(self.seqlens_q)} tokens, longest {max(self.seqlens_q, default=0)}"
        if not same:
            lens += f"; keys {sum(self.seqlens_k)} tokens, longest {max(self.seqlens_k, default=0)}"
        parts = [f"{n} sequences ({lens})", f"Hq={self.heads_q} Hkv={self.heads_kv} D={self.head_dim}"
                 + (f" Dv={self.head_dim_v}" if self.head_dim_v != self.head_dim else ""),
                 f"{dtype_name(self.dtype)} on {self.device_type}"]
        if self.causal:
            parts.append(f"causal={self.causal}")
        if self.dropout:
            parts.append("dropout")
        if self.needs_grad:
            parts.append("requires grad")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """How long a path takes, roughly: data per device type, calibrated by ``benchmarks/varlen_probe.py``.

    Times are microseconds; rates TFLOP/s. A dense call of padded lengths ``(Lq, Lk)`` runs at
    ``rate * L / (L + half_len)`` with ``L = min(Lq, Lk)``; forward+backward uses the ``*_bwd`` figures.

    Attributes:
        call_us / call_us_bwd: fixed cost of one group (gather, kernel launch, select), fwd / fwd+bwd.
        rate / rate_bwd: the dense kernel's saturated rate.
        half_len / half_len_bwd: the length at which it reaches half of that rate.
        varlen_call_us / varlen_call_us_bwd: fixed cost of the flash varlen call.
        varlen_rate / varlen_rate_bwd: the flash varlen kernel's rate.
        varlen_kernels: the same four figures (call, call with backward, rate, rate with backward) for other
            backends' packed kernels, by backend name.
        causal_bwd_factor: the dense kernel's causal forward+backward rate as a share of ``rate_bwd`` when
            it runs one group per call (measured far below the dense causal rate).
        coordinate_penalty / coordinate_penalty_bwd: extra cost factor of the extra head-dim coordinate beyond
            its FLOPs (kernels are tuned for head dims 64/128/256: D + 8 leaves the fast path).
        padding: how a non-causal group with padding keys is made exact: ``"coordinate"`` or ``"mask"``.
        contiguous_groups: copy each group's inputs to contiguous (b, H, L, D) before the dense call (the
            grid's layout) instead of passing (b, L, H, D) strides.
        streams: side streams the groups are spread over (CUDA; 0 = the current stream only).
        max_group_span: the most sequences the dynamic programme considers for one group.
    """

    call_us: float
    call_us_bwd: float
    rate: float
    rate_bwd: float
    half_len: float
    half_len_bwd: float
    varlen_call_us: float = math.inf
    varlen_call_us_bwd: float = math.inf
    varlen_rate: float = 1.0
    varlen_rate_bwd: float = 1.0
    coordinate_penalty: float = 1.0
    coordinate_penalty_bwd: float = 1.0
    causal_bwd_factor: float = 1.0
    contiguous_groups: bool = False
    padding: str = "coordinate"
    streams: int = 0
    max_group_span: int = 64
    varlen_kernels: tuple[tuple[str, float, float, float, float], ...] = ()

    def dense_us(self, b: int, heads: int, lq: int, lk: int, d: int, dv: int, causal: bool, bwd: bool) -> float:
        flops = 2.0 * b * heads * lq * lk * (d + dv) * (0.5 if causal else 1.0) * (3.5 if bwd else 1.0)
        length = min(lq, lk)
        rate, half = (self.rate_bwd, self.half_len_bwd) if bwd else (self.rate, self.half_len)
        if bwd and causal:
            rate *= self.causal_bwd_factor
        return (self.call_us_bwd if bwd else self.call_us) + flops / (rate * length / (length + half)) / 1e6

    def varlen_us(self, work: float, heads: int, d: int, dv: int, causal: bool, bwd: bool,
                  backend: str = "flash") -> float:
        """``work`` = sum of Lq_i * Lk_i over the sequences; ``backend``: whose packed kernel runs them."""
        flops = 2.0 * heads * work * (d + dv) * (0.5 if causal else 1.0) * (3.5 if bwd else 1.0)
        call, call_bwd, rate, rate_bwd = self.varlen_call_us, self.varlen_call_us_bwd, self.varlen_rate, \
            self.varlen_rate_bwd
        for name, *figures in self.varlen_kernels:
            if name == backend:
                call, call_bwd, rate, rate_bwd = figures
        return (call_bwd if bwd else call) + flops / (rate_bwd if bwd else rate) / 1e6


COST_MODELS: dict[str, CostModel] = {
    # H200, torch 2.11, cuDNN 9.19 (shared/BASELINE.md): dense cuDNN 510 / 609 / 615 TFLOP/s forward at
    # S = 512 / 4k / 16k and 372 / 526 / 558 forward+backward; flash varlen 340 forward, 298 forward+backward.
    # cuDNN at head dim 136 (the masking coordinate on 128) took 1.58x / 2.27x the time of 128 (fwd / fwd+bwd,
    # 4x16x4096, benchmarks/varlen_probe.py, 2026-12-03) for 1.06x the FLOPs. Side streams: no consistent gain
    # on the BASELINE batches (the same probe: 0.75x to 1.2x of one stream across batches and modes), so off.
    # Causal groups, forward+backward: 186-236 useful TFLOP/s against 253-274 for flash varlen.
    "cuda": CostModel(call_us=30.0, call_us_bwd=90.0, rate=620.0, rate_bwd=570.0, half_len=110.0,
                      half_len_bwd=270.0, varlen_call_us=40.0, varlen_call_us_bwd=120.0, varlen_rate=340.0,
                      varlen_rate_bwd=298.0, coordinate_penalty=1.5, coordinate_penalty_bwd=2.1,
                      causal_bwd_factor=0.55, padding="coordinate", streams=0,
                      # FA4's flash_attn_varlen_func on the BASELINE ragged batches: 589-598 / 538-548 useful
                      # TFLOP/s non-causal, 503-513 / 459-464 causal (fwd / fwd+bwd); ~75 / ~170 us per call of
                      # Python dispatch (flash-attention#2426).
                      varlen_kernels=(("fa4", 75.0, 170.0, 560.0, 500.0),)),
    # CPU: the flash kernel runs near its rate from small lengths; a call costs ~30 us of Python and dispatch.
    "cpu": CostModel(call_us=40.0, call_us_bwd=120.0, rate=0.05, rate_bwd=0.04, half_len=8.0, half_len_bwd=8.0,
                     padding="mask"),
}
_FALLBACK_MODEL = COST_MODELS["cpu"]


@dataclasses.dataclass(frozen=True)
class Group:
    """One dense call: ``members`` (sequence indices) padded to ``(len_q, len_k)``.

    ``padding``: ``"none"`` (every member has exactly these lengths), ``"causal"`` (causal square, padding
    keys never visible), ``"coordinate"`` or ``"mask"`` (padding keys hidden that way), or ``"queries"`` (only
    query rows are padded: their outputs are dropped).
    """

    members: tuple[int, ...]
    len_q: int
    len_k: int
    padding: str = "none"


@dataclasses.dataclass(frozen=True)
class VarlenPlan:
    """What :func:`sdpa_flash.varlen.varlen_attention` runs for one batch, and why.

    Attributes:
        path: ``"grouped"``, ``"flash_varlen"`` (one packed call), ``"hybrid"`` or ``"empty"``.
        backend: the backend of the dense group calls as the policy plans it for the largest group (the
            calls are made through ``attention()``, which may pick per call), or the packed kernel's backend
            for ``flash_varlen``.
        groups: the dense calls.
        varlen_members: sequences computed by the one flash varlen call (``flash_varlen`` / ``hybrid``).
        zero_members: sequences with queries but no keys: their output is zeros.
        streams: CUDA side streams the groups are spread over.
        estimates: each candidate path's estimated time (µs), ``inf`` where it cannot run.
        reasons: why each other path was not chosen.
        spec: the call's summary.
        policy: the policy in force.
        varlen_backend: whose packed (``cu_seqlens``) kernel computes ``varlen_members``: ``"fa4"`` or ``"flash"``.
    """

    path: str
    backend: str
    groups: tuple[Group, ...]
    varlen_members: tuple[int, ...]
    zero_members: tuple[int, ...]
    streams: int
    estimates: dict[str, float]
    reasons: dict[str, tuple[str, ...]]
    spec: VarlenSpec
    policy: Policy
    varlen_backend: str = ""

    @property
    def padded_work(self) -> float:
        """Padded over useful score entries (1.0 = no padding) of the grouped part."""
        useful = sum(self.spec.seqlens_q[i] * self.spec.seqlens_k[i] for g in self.groups for i in g.members)
        padded = sum(len(g.members) * g.len_q * g.len_k for g in self.groups)
        return padded / useful if useful else 1.0

    def __str__(self) -> str:
        bits = []
        if self.groups:
            bits.append(f"{len(self.groups)} {self.backend} group call(s), padded work x{self.padded_work:.2f}")
        if self.varlen_members:
            bits.append(f"{len(self.varlen_members)} sequence(s) in one {self.varlen_backend} varlen call")
        head = f"varlen {self.path}: " + (", ".join(bits) or "nothing to compute")
        return "\n".join((head, *(f"  {k}: {v[0]}" for k, v in self.reasons.items() if v)))

    def explain(self) -> str:
        lines = [f"path:    {self.path}", f"policy:  {self.policy}", f"inputs:  {self.spec.describe()}"]
        for name, est in self.estimates.items():
            lines.append(f"estimate {name}: {'n/a' if math.isinf(est) else f'{est:,.0f} us'}")
        if self.groups:
            lines.append(f"groups:  {len(self.groups)} dense {self.backend} calls over {self.streams or 1} stream(s), "
                         f"padded work x{self.padded_work:.2f}")
            for g in self.groups[:12]:
                lines.append(f"  {len(g.members):4d} x ({g.len_q}, {g.len_k}) padding={g.padding}")
            if len(self.groups) > 12:
                lines.append(f"  ... {len(self.groups) - 12} more")
        if self.varlen_members:
            lines.append(f"varlen:  {len(self.varlen_members)} sequences in one {self.varlen_backend} call with "
                         "cu_seqlens")
        if self.zero_members:
            lines.append(f"zeros:   {len(self.zero_members)} sequences have queries but no keys")
        for name, why in self.reasons.items():
            lines.append(f"{name}:")
            lines.extend(f"  - {w}" for w in why)
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- planning
def _dense_spec(spec: VarlenSpec, b: int, lq: int, lk: int, causal: str | None, mask: str | None,
                d: int | None = None) -> AttentionSpec:
    return AttentionSpec(spec.device_type, spec.dtype, b, spec.heads_q, spec.heads_kv, lq, lk, d or spec.head_dim,
                         spec.head_dim_v, causal, mask, spec.dropout, spec.needs_grad)


def _coordinate_dim(d: int) -> int:
    return -(-(d + 1) // 8) * 8


def _varlen_kernel(spec: VarlenSpec, caps: Capabilities, policy: Policy) -> tuple[str, list[str]]:
    """The backend whose packed (``cu_seqlens``) kernel runs this batch in one call, and why not, when none can.

    Candidates are the policy's backends in its order (``auto`` / ``fused``: the ranking rule for the batch's
    longest sequence, as for a dense call of that shape, plug-ins included) that have a varlen entry point; the
    first one with no reasons wins.
    """
    dense = _dense_spec(spec, 1, max(spec.seqlens_q, default=1), max(spec.seqlens_k, default=1),
                        "bottom_right" if spec.causal else None, None)
    names = ranked(ranking(caps, dense).order) if policy.name in ("auto", "fused") else policy.backends
    names = tuple(n for n in names if BACKENDS[n].VARLEN)
    if not names:
        return "", [f"no backend allowed by policy {policy} has a packed (cu_seqlens) kernel "
                    f"({', '.join(n for n, b in BACKENDS.items() if b.VARLEN)} have)"]
    why: list[str] = []
    for name in names:
        reasons = BACKENDS[name].varlen_reasons(dense, caps) + denylist_reasons(name, dense, caps)
        if spec.causal == "top_left" and spec.seqlens_q != spec.seqlens_k:
            reasons.append("causal='top_left' with query and key lengths that differ: the varlen kernel aligns causal "
                           "bottom-right (pass causal='bottom_right' for flash-attn's convention)")
        if not reasons:
            return name, []
        why.extend(f"{name}: {r}" for r in reasons)
    return "", why


def _group_ok(spec: VarlenSpec, members: Sequence[int]) -> str | None:
    """How a group of these members is made exact (``None``: it cannot be)."""
    lq = [spec.seqlens_q[i] for i in members]
    lk = [spec.seqlens_k[i] for i in members]
    mq, mk = max(lq), max(lk)
    if all(a == mq for a in lq) and all(b == mk for b in lk):
        return "none"
    if spec.causal is not None:
        square = all(a == b for a, b in zip(lq, lk, strict=True))
        return "causal" if square else None
    return "queries" if all(b == mk for b in lk) else "keys"


def _grouping(spec: VarlenSpec, ids: list[int], model: CostModel, pad_keys: str, d_coord: int,
              bwd: bool) -> tuple[float, list[Group]]:
    """Cheapest cut of ``ids`` (sorted by ``(L_k, L_q)``) into contiguous groups: dynamic programming on the
    cost model. ``pad_keys`` is how padding keys are hidden (``"coordinate"``, ``"mask"``, or ``"none"``:
    groups whose key lengths differ are not allowed)."""
    n = len(ids)
    if not n:
        return 0.0, []
    lq = [spec.seqlens_q[i] for i in ids]
    lk = [spec.seqlens_k[i] for i in ids]
    causal = spec.causal is not None
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    kinds = [""] * (n + 1)
    for j in range(1, n + 1):
        mq = mk = 0
        nq, nk = lq[j - 1], lk[j - 1]
        square = True
        for i in range(j - 1, max(-1, j - 1 - model.max_group_span), -1):
            mq, mk, nq, nk = max(mq, lq[i]), max(mk, lk[i]), min(nq, lq[i]), min(nk, lk[i])
            square = square and lq[i] == lk[i]
            d = spec.head_dim
            if nq == mq and nk == mk:
                kind = "none"
            elif causal:
                if not square:
                    break  # a causal group with unequal query/key lengths must be exact pairs
                kind = "causal"
            elif nk == mk:
                kind = "queries"
            elif pad_keys == "none":
                break
            else:
                kind = pad_keys
                if kind == "coordinate":
                    d = d_coord
            cost = model.dense_us(j - i, spec.heads_q, mq, mk, d, spec.head_dim_v, causal, bwd)
            if kind == "coordinate":
                cost *= model.coordinate_penalty_bwd if bwd else model.coordinate_penalty
            if best[i] + cost < best[j]:
                best[j], cut[j], kinds[j] = best[i] + cost, i, kind
    groups: list[Group] = []
    j = n
    while j:
        i = cut[j]
        groups.append(Group(tuple(ids[i:j]), max(lq[i:j]), max(lk[i:j]), kinds[j]))
        j = i
    return best[n], groups[::-1]


@functools.lru_cache(maxsize=256)
def plan_varlen(spec: VarlenSpec, caps: Capabilities, policy: Policy) -> VarlenPlan:
    """Choose the path, groups and streams for ``spec`` (pure; cached)."""
    model = COST_MODELS.get(caps.device_type, _FALLBACK_MODEL)
    bwd = spec.needs_grad
    n = len(spec.seqlens_q)
    zero = tuple(i for i in range(n) if spec.seqlens_q[i] > 0 and spec.seqlens_k[i] == 0)
    live = [i for i in range(n) if spec.seqlens_q[i] > 0 and spec.seqlens_k[i] > 0]
    live.sort(key=lambda i: (spec.seqlens_k[i], spec.seqlens_q[i]))
    streams = model.streams if caps.device_type == "cuda" else 0
    reasons: dict[str, tuple[str, ...]] = {}
    if not live:
        return VarlenPlan("empty", "", (), (), zero, 0, {}, {}, spec, policy)

    # How padding keys are hidden: the cost model's choice, if the dense kernel can take it.
    longest = max(live, key=lambda i: spec.seqlens_q[i] * spec.seqlens_k[i])
    big_q, big_k = spec.seqlens_q[longest], spec.seqlens_k[longest]
    d_coord = _coordinate_dim(spec.head_dim)
    pad_keys = model.padding
    dense_causal = spec.causal

    def dense_reasons(mask: str | None, d: int | None = None) -> tuple[str, list[str]]:
        try:
            p = dense_plan(_dense_spec(spec, 1, big_q, big_k, dense_causal, mask, d), caps, policy)
        except BackendUnavailableError as exc:
            return "", [f"{name}: {r[0]}" for name, r in exc.reasons.items() if r] or [str(exc).splitlines()[0]]
        return p.backend, []

    backend, why_dense = dense_reasons(None)
    if pad_keys == "coordinate":
        b2, why = dense_reasons(None, d_coord)
        if why or d_coord > 256 or b2 != backend:
            pad_keys = "mask"
    if pad_keys == "mask":
        _, why = dense_reasons("bool")
        if why:
            pad_keys = "none"  # groups of exactly equal lengths only
    def groups_reasons(groups: Sequence[Group]) -> list[str]:
        """Why the policy cannot run some group's dense call (the longest sequence's is not the only shape: a
        kernel may refuse a length of 1, or a causal corner where a pair has more queries than keys)."""
        why: list[str] = []
        shapes = {(g.len_q, g.len_k, g.padding): len(g.members) for g in groups}
        for (lq, lk, padding), count in shapes.items():
            mask = "bool" if padding == "mask" else None
            d = d_coord if padding == "coordinate" else None
            try:
                dense_plan(_dense_spec(spec, 1, lq, lk, dense_causal, mask, d), caps, policy)
            except BackendUnavailableError as exc:
                first = next((f"{name}: {r[0]}" for name, r in exc.reasons.items() if r), str(exc).splitlines()[0])
                why.append(f"a group of {count} x (L_q={lq}, L_k={lk}): {first}")
        return why

    estimates: dict[str, float] = {}
    groups: list[Group]
    grouped_cost, groups = math.inf, []
    if not why_dense:
        grouped_cost, groups = _grouping(spec, live, model, pad_keys, d_coord, bwd)
        why_groups = groups_reasons(groups)
        if why_groups:
            grouped_cost, groups = math.inf, []
            reasons["grouped"] = tuple(why_groups)
    else:
        reasons["grouped"] = tuple(why_dense)
    estimates["grouped"] = grouped_cost

    vk, flash_why = _varlen_kernel(spec, caps, policy)
    hybrid_groups: list[Group]
    hybrid_varlen: tuple[int, ...]
    hybrid_cost, hybrid_groups, hybrid_varlen = math.inf, [], ()
    if flash_why:
        estimates["flash_varlen"] = estimates["hybrid"] = math.inf
        reasons["flash_varlen"] = tuple(flash_why)
        reasons["hybrid"] = ("needs the flash varlen kernel, which cannot run: " + flash_why[0],)
    else:
        work = [spec.seqlens_q[i] * spec.seqlens_k[i] for i in live]
        causal = spec.causal is not None
        estimates["flash_varlen"] = model.varlen_us(sum(work), spec.heads_q, spec.head_dim, spec.head_dim_v, causal,
                                                    bwd, vk)
        if not why_dense:
            # hybrid: the k shortest (by work) in one varlen call, the rest grouped; try a few cut points.
            by_work = sorted(live, key=lambda i: spec.seqlens_q[i] * spec.seqlens_k[i])
            for frac in (0.25, 0.5, 0.75, 0.875):
                k = int(len(by_work) * frac)
                if not 0 < k < len(by_work):
                    continue
                short = by_work[:k]
                rest = sorted(by_work[k:], key=lambda i: (spec.seqlens_k[i], spec.seqlens_q[i]))
                c_rest, g_rest = _grouping(spec, rest, model, pad_keys, d_coord, bwd)
                if groups_reasons(g_rest):
                    continue
                c = c_rest + model.varlen_us(sum(spec.seqlens_q[i] * spec.seqlens_k[i] for i in short),
                                             spec.heads_q, spec.head_dim, spec.head_dim_v, causal, bwd, vk)
                if c < hybrid_cost:
                    hybrid_cost, hybrid_groups, hybrid_varlen = c, g_rest, tuple(sorted(short))
        estimates["hybrid"] = hybrid_cost
        if math.isinf(hybrid_cost):
            reasons["hybrid"] = (f"no cut into one flash varlen call plus dense groups that policy {policy} can run"
                                 + (f" (dense: {why_dense[0]})" if why_dense else ""),)
    finite = {k: v for k, v in estimates.items() if not math.isinf(v)}
    if not finite:
        raise BackendUnavailableError(
            f"No varlen path allowed by policy {policy} can run this batch on {caps.name or caps.device_type}.",
            inputs=spec.describe(), reasons=reasons)
    path = min(finite, key=lambda k: finite[k])
    for other, est in estimates.items():
        if other != path and other not in reasons:
            reasons[other] = (f"estimated {est:,.0f} us against {finite[path]:,.0f} us for {path} (cost model for "
                              f"{caps.device_type})",)
    if path == "grouped":
        return VarlenPlan(path, backend, tuple(groups), (), zero, streams, estimates, reasons, spec, policy)
    if path == "hybrid":
        return VarlenPlan(path, backend, tuple(hybrid_groups), hybrid_varlen, zero, streams, estimates, reasons,
                          spec, policy, vk)
    return VarlenPlan(path, vk, (), tuple(sorted(live)), zero, 0, estimates, reasons, spec, policy, vk)


# ------------------------------------------------------------------------------------------- execution
@dataclasses.dataclass
class _Exec:
    """What one plan needs on one device, built once: index tensors and split sizes.

    Sequences that form a group on their own without padding are read as views of ``torch.split`` of the
    packed tensors; the other groups' rows are gathered with a single ``index_select`` per input (one
    ``index_add`` in the backward, not one full-size zero tensor per group), then split per group. Outputs are
    assembled per sequence and concatenated once, in packed order.
    """

    singles: dict[int, int]  # group number -> its one sequence
    gather_q: torch.Tensor | None
    gather_k: torch.Tensor | None
    sizes_q: list[int]  # rows of each gathered group, in gathered order
    sizes_k: list[int]
    gathered: list[int]  # group numbers, in gathered order
    where: dict[int, int]  # group number -> its position in gathered order
    member_rows: list[list[int]]  # per gathered group: split sizes over its b * len_q rows (real, pad, real, ...)
    varlen: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, int, int] | None
    issue_order: list[int]  # groups, largest first (long kernels start first; short ones fill in)
    flash_calls: Any = None  # stats() counter of the packed varlen call for this plan, taken on its first call
    varlen_run: Any = None  # the packed kernel: run(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale)
    direct: _Direct | None = None  # the groups' kernels called directly, one autograd node for all (see _Direct)


def _build_exec(p: VarlenPlan, device: torch.device) -> _Exec:
    s = p.spec
    cu_q = [0, *torch.tensor(s.seqlens_q, dtype=torch.long).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(s.seqlens_k, dtype=torch.long).cumsum(0).tolist()]
    singles: dict[int, int] = {}
    idx_q: list[torch.Tensor] = []
    idx_k: list[torch.Tensor] = []
    sizes_q: list[int] = []
    sizes_k: list[int] = []
    gathered: list[int] = []
    member_rows: list[list[int]] = []
    for n, g in enumerate(p.groups):
        if len(g.members) == 1 and g.padding == "none":
            singles[n] = g.members[0]
            continue
        lens_q = torch.tensor([s.seqlens_q[i] for i in g.members])
        lens_k = torch.tensor([s.seqlens_k[i] for i in g.members])
        start_q = torch.tensor([cu_q[i] for i in g.members])
        start_k = torch.tensor([cu_k[i] for i in g.members])
        # padding positions read the sequence's own last row: real, finite data whose outputs are dropped
        idx_q.append((start_q[:, None] + torch.minimum(torch.arange(g.len_q)[None, :], (lens_q - 1)[:, None]))
                     .reshape(-1))
        idx_k.append((start_k[:, None] + torch.minimum(torch.arange(g.len_k)[None, :], (lens_k - 1)[:, None]))
                     .reshape(-1))
        sizes_q.append(len(g.members) * g.len_q)
        sizes_k.append(len(g.members) * g.len_k)
        gathered.append(n)
        rows: list[int] = []
        for i in g.members:
            rows += [s.seqlens_q[i], g.len_q - s.seqlens_q[i]]
        member_rows.append(rows)
    gq = torch.cat(idx_q).to(device) if idx_q else None
    gk = torch.cat(idx_k).to(device) if idx_k else None
    varlen = None
    if p.varlen_members:
        m = p.varlen_members
        whole = len(m) == len(s.seqlens_q)
        lq = [s.seqlens_q[i] for i in m]
        lk = [s.seqlens_k[i] for i in m]
        cq = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32).to(device)
        ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32).to(device)
        rq = None if whole else _ranges(cu_q, m).to(device)
        rk = None if whole else _ranges(cu_k, m).to(device)
        varlen = (rq, rk, cq, ck, max(lq), max(lk))
    order = sorted(range(len(p.groups)), key=lambda n: -len(p.groups[n].members) * p.groups[n].len_q
                   * p.groups[n].len_k)
    ex = _Exec(singles, gq, gk, sizes_q, sizes_k, gathered, {n: j for j, n in enumerate(gathered)}, member_rows,
               varlen, order)
    if varlen is not None:
        ex.varlen_run = BACKENDS[p.varlen_backend].varlen()
    ex.direct = _Direct.build(p, ex, device, cu_q, cu_k)
    return ex


def _ranges(cu: list[int], members: Sequence[int]) -> torch.Tensor:
    """The packed row indices of ``members``' tokens, in that order."""
    if not members:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.tensor([cu[i] for i in members], dtype=torch.long)
    lens = torch.tensor([cu[i + 1] - cu[i] for i in members], dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(len(members)), lens)
    offs = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    return starts[seg] + offs


_exec_cache: dict[tuple[Any, ...], _Exec] = {}
_caches.register("varlen.exec", _exec_cache.clear)  # entries hold a stats counter: reset_stats() starts them afresh
_streams: dict[int | None, list[torch.cuda.Stream]] = {}


def _side_streams(device: torch.device, n: int) -> list[torch.cuda.Stream]:
    got = _streams.get(device.index)
    if got is None or len(got) < n:
        got = [torch.cuda.Stream(device=device) for _ in range(n)]
        _streams[device.index] = got
    return got[:n]


_Q_EXTRA = {torch.float16: 256.0, torch.bfloat16: 1.0, torch.float32: 1.0, torch.float64: 1.0}
_K_EXTRA = {torch.float16: -32768.0, torch.bfloat16: -(2.0**100), torch.float32: -(2.0**100),
            torch.float64: -(2.0**100)}


def _with_coordinate(qg: torch.Tensor, kg: torch.Tensor, key_ok: torch.Tensor, d_coord: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the masking coordinate: queries get ``c`` there, real keys 0, padding keys ``-big`` (exact: see
    the module docstring). ``qg`` ``(b, Lq, Hq, D)``, ``kg`` ``(b, Lk, Hkv, D)``, ``key_ok`` ``(b, Lk)``."""
    extra = d_coord - qg.shape[-1]
    aq = qg.new_zeros(1, 1, 1, extra)
    aq[..., 0] = _Q_EXTRA[qg.dtype]
    ak = kg.new_zeros(*key_ok.shape, 1, extra)
    ak[..., 0] = torch.where(key_ok, 0.0, _K_EXTRA[kg.dtype])[..., None].to(kg.dtype)
    return (torch.cat([qg, aq.expand(*qg.shape[:-1], extra)], -1),
            torch.cat([kg, ak.expand(*kg.shape[:-1], extra)], -1))


def _spec_of(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seqlens_q: tuple[int, ...],
             seqlens_k: tuple[int, ...], causal: Any, dropout_p: float) -> VarlenSpec:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__} instead.")
        if t.dim() != 3:
            raise AttentionInputError(f"Expected {name} to be 3-D packed (T, H, D), but got a {t.dim()}-D tensor of "
                                      f"shape {tuple(t.shape)} instead.")
        if t.dtype not in FLOAT_DTYPES:
            raise AttentionInputError(f"Expected {name} to be floating point, but got dtype={t.dtype} instead.")
    if not query.dtype == key.dtype == value.dtype:
        raise AttentionInputError(f"Expected query, key and value to have one dtype, but got {query.dtype}, "
                                  f"{key.dtype}, {value.dtype} instead.")
    if not query.device == key.device == value.device:
        raise AttentionInputError(f"Expected query, key and value on one device, but got {query.device}, "
                                  f"{key.device}, {value.device} instead.")
    if key.shape[0] != value.shape[0] or key.shape[1] != value.shape[1]:
        raise AttentionInputError(f"Expected key and value to have the same tokens and heads, but got "
                                  f"{tuple(key.shape)} and {tuple(value.shape)} instead.")
    if query.shape[-1] != key.shape[-1]:
        raise AttentionInputError(f"Expected query and key to have the same head dim, but got {query.shape[-1]} and "
                                  f"{key.shape[-1]} instead.")
    hq, hk = query.shape[1], key.shape[1]
    if hk == 0 or hq % hk:
        raise AttentionInputError(f"Expected the query heads ({hq}) to be a multiple of the key/value heads ({hk}) "
                                  "(GQA/MQA), but they are not.")
    if query.shape[-1] == 0 or value.shape[-1] == 0:
        raise AttentionInputError("Expected non-zero head dims, but got "
                                  f"{query.shape[-1]} (query/key) and {value.shape[-1]} (value) instead.")
    if len(seqlens_q) != len(seqlens_k):
        raise AttentionInputError(f"Expected as many query sequences as key sequences, but got {len(seqlens_q)} and "
                                  f"{len(seqlens_k)} instead.")
    if sum(seqlens_q) != query.shape[0]:
        raise AttentionInputError(f"Expected the query lengths to sum to its {query.shape[0]} rows, but they sum to "
                                  f"{sum(seqlens_q)} instead.")
    if sum(seqlens_k) != key.shape[0]:
        raise AttentionInputError(f"Expected the key lengths to sum to its {key.shape[0]} rows, but they sum to "
                                  f"{sum(seqlens_k)} instead.")
    kind = CAUSAL_KINDS.get(causal, "invalid") if isinstance(causal, (bool, str, type(None))) else "invalid"
    if kind == "invalid":
        raise AttentionInputError(f"Expected causal to be False, True, 'top_left' or 'bottom_right', but got "
                                  f"{causal!r} instead.")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise AttentionInputError(f"Expected dropout_p to be a float in [0, 1), but got {dropout_p!r} instead.")
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return VarlenSpec(query.device.type, query.dtype, hq, hk, query.shape[-1], value.shape[-1], seqlens_q, seqlens_k,
                      kind, dropout_p > 0, needs_grad)


def _host_lengths(cu: Any, given: Sequence[int] | None, max_seqlen: int, what: str) -> tuple[int, ...]:
    if given is not None:
        lens = tuple(map(int, given))
    else:
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or \
                cu.numel() < 1:
            desc = f"{cu.dim()}-D dtype={cu.dtype}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise AttentionInputError(f"Expected {what} to be a 1-D int32 tensor with a leading 0, but got {desc} "
                                      "instead.")
        host = cu.tolist()
        if host[0] != 0:
            raise AttentionInputError(f"Expected {what} to start at 0, but it starts at {host[0]} instead.")
        lens = tuple(b - a for a, b in itertools.pairwise(host))
    if lens and min(lens) < 0:
        raise AttentionInputError(f"Expected {what} to be non-decreasing, but it has a negative length.")
    if lens and max_seqlen is not None and max(lens) > max_seqlen:
        raise AttentionInputError(f"Expected max_seqlen >= the longest sequence ({max(lens)}) for {what}, but got "
                                  f"{max_seqlen} instead.")
    return lens


def _policy(policy: Any) -> Policy:
    return get_policy() if policy is None else resolve_policy(policy)


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seqlens_q: Sequence[int],
            seqlens_k: Sequence[int], *, causal: Any = False, dropout_p: float = 0.0, policy: Any = None
            ) -> VarlenPlan:
    spec = _spec_of(query, key, value, tuple(seqlens_q), tuple(seqlens_k), causal, dropout_p)
    return plan_varlen(spec, capabilities(query.device), _policy(policy))


def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: Any, cu_seqlens_k: Any,
        max_seqlen_q: int, max_seqlen_k: int, *, causal: Any = False, scale: float | None = None,
        dropout_p: float = 0.0, policy: Any = None, seqlens_q: Sequence[int] | None = None,
        seqlens_k: Sequence[int] | None = None) -> torch.Tensor:
    """Execute the plan for one packed call; see :func:`sdpa_flash.varlen.varlen_attention_packed`."""
    lens_q = _host_lengths(cu_seqlens_q, seqlens_q, max_seqlen_q, "cu_seqlens_q")
    lens_k = _host_lengths(cu_seqlens_k, seqlens_k, max_seqlen_k, "cu_seqlens_k")
    spec = _spec_of(query, key, value, lens_q, lens_k, causal, dropout_p)
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise AttentionInputError(f"Expected scale to be None or a finite float, but got {scale!r} instead.")
    pol = _policy(policy)
    p = plan_varlen(spec, capabilities(query.device), pol)
    dev = query.device
    key_ = (spec, pol, dev)
    ex = _exec_cache.get(key_)
    if ex is None:
        if len(_exec_cache) >= 64:
            _exec_cache.clear()
        ex = _exec_cache[key_] = _build_exec(p, dev)
    return _execute(p, ex, query, key, value, dropout_p, scale, pol)


def _group_inputs(p: VarlenPlan, ex: _Exec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                  ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each group's (q, k, v) as (b, L, H, D), by group number: views for a single sequence, gathered rows
    (one ``index_select`` per input for all groups) for the others."""
    s = p.spec
    if ex.singles:
        vq, vk, vv = (torch.split(t, list(lens)) for t, lens in ((query, s.seqlens_q), (key, s.seqlens_k),
                                                                 (value, s.seqlens_k)))
    if ex.gather_q is not None:
        gq = torch.split(query.index_select(0, ex.gather_q), ex.sizes_q)
        # gather_k is set with gather_q
        gk = torch.split(key.index_select(0, ex.gather_k), ex.sizes_k)  # type: ignore[arg-type]  # (see above)
        gv = torch.split(value.index_select(0, ex.gather_k), ex.sizes_k)  # type: ignore[arg-type]  # (see above)
    out = []
    for n, g in enumerate(p.groups):
        if n in ex.singles:
            i = ex.singles[n]
            out.append((vq[i].unsqueeze(0), vk[i].unsqueeze(0), vv[i].unsqueeze(0)))
        else:
            j, b = ex.where[n], len(g.members)
            out.append((gq[j].view(b, g.len_q, s.heads_q, s.head_dim), gk[j].view(b, g.len_k, s.heads_kv, s.head_dim),
                        gv[j].view(b, g.len_k, s.heads_kv, s.head_dim_v)))
    return out


def _place_outputs(p: VarlenPlan, ex: _Exec, n: int, og: torch.Tensor, outs: list[torch.Tensor | None]) -> None:
    """Group ``n``'s output (b, L, H, Dv) into ``outs``, per member sequence (padding rows dropped)."""
    g = p.groups[n]
    if n in ex.singles:
        outs[ex.singles[n]] = og[0]
        return
    rows = torch.split(og.reshape(len(g.members) * g.len_q, *og.shape[2:]), ex.member_rows[ex.where[n]])
    for r, i in enumerate(g.members):
        outs[i] = rows[2 * r]


def _execute(p: VarlenPlan, ex: _Exec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             dropout_p: float, scale: float | None, pol: Policy) -> torch.Tensor:
    from ._dense import dense_attention as attention

    spec = p.spec
    n_seq = len(spec.seqlens_q)
    d = spec.head_dim
    softmax_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    causal = spec.causal or False
    outs: list[torch.Tensor | None] = [None] * n_seq
    dev = query.device
    if ex.direct is not None and ex.direct.usable(query, key, value, pol):
        grouped = ex.direct.run(query, key, value, softmax_scale)
        if ex.varlen is None and not p.zero_members:
            return grouped
        for i, o in zip(ex.direct.members, ex.direct.split(grouped), strict=True):
            outs[i] = o
        return _finish(p, ex, query, key, value, dropout_p, softmax_scale, pol, outs)
    streams = _side_streams(dev, p.streams) if p.streams and dev.type == "cuda" and len(p.groups) > 1 else []
    main = torch.cuda.current_stream(dev) if streams else None
    inputs = _group_inputs(p, ex, query, key, value)
    d_coord = _coordinate_dim(d)
    contiguous = COST_MODELS.get(dev.type, _FALLBACK_MODEL).contiguous_groups
    if main is not None:  # after the gathers above: the side streams read what the current stream wrote
        for st in streams:
            st.wait_stream(main)
    for slot, n in enumerate(ex.issue_order):
        g = p.groups[n]
        ctx = torch.cuda.stream(streams[slot % len(streams)]) if streams else _null
        with ctx:
            mask = None
            qg, kg, vg = inputs[n]
            if n not in ex.singles:
                if g.padding in ("coordinate", "mask"):
                    lens_k = torch.tensor([spec.seqlens_k[i] for i in g.members], device=dev)
                    key_ok = torch.arange(g.len_k, device=dev)[None, :] < lens_k[:, None]
                    if g.padding == "coordinate":
                        qg, kg = _with_coordinate(qg, kg, key_ok, d_coord)
                    else:
                        mask = key_ok[:, None, None, :]
            if contiguous:  # (b, H, L, D) contiguous, the layout the dense kernels are fastest on
                qg, kg, vg = (t.transpose(1, 2).contiguous() for t in (qg, kg, vg))
                og = attention(qg, kg, vg, attn_mask=mask, causal=causal, dropout_p=dropout_p,
                               scale=softmax_scale, policy=pol).transpose(1, 2)
            else:
                og = attention(qg, kg, vg, attn_mask=mask, causal=causal, dropout_p=dropout_p,
                               scale=softmax_scale, layout="bshd", policy=pol)
            if main is not None:
                og.record_stream(main)
            _place_outputs(p, ex, n, og, outs)
    if main is not None:
        for st in streams:
            main.wait_stream(st)
    return _finish(p, ex, query, key, value, dropout_p, softmax_scale, pol, outs)


def _finish(p: VarlenPlan, ex: _Exec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            dropout_p: float, softmax_scale: float, pol: Policy, outs: list[torch.Tensor | None]) -> torch.Tensor:
    """The flash varlen part and the zero rows, then the packed output (``outs``: per sequence, or ``None``)."""
    spec = p.spec
    hq, dv = spec.heads_q, spec.head_dim_v
    if ex.varlen is not None:
        rq, rk, cq, ck, mq, mk = ex.varlen
        if rq is None:
            qv, kv, vv = query, key, value
        else:
            # rk is None exactly when rq is
            qv, kv, vv = query.index_select(0, rq), key.index_select(0, rk), value.index_select(0, rk)  # type: ignore[arg-type]
        qv, kv, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (qv, kv, vv))
        ov = ex.varlen_run(qv, kv, vv, cq, ck, mq, mk, dropout_p, spec.causal is not None, softmax_scale)
        if ex.flash_calls is None:
            ex.flash_calls = _plan_counter(p.varlen_backend, f"{p.varlen_backend} varlen op", spec.describe())
        next(ex.flash_calls)
        if pol.shadow and not dropout_p:
            seed = _shadow.tick(p.varlen_backend, pol.shadow)
            if seed is not None:
                _shadow_one_sequence(p, pol, qv, kv, vv, ov, softmax_scale, seed)
        if rq is None and not p.zero_members:
            return ov
        for i, o in zip(p.varlen_members, torch.split(ov, [spec.seqlens_q[i] for i in p.varlen_members]),
                        strict=True):
            outs[i] = o
    for i in p.zero_members:
        outs[i] = query.new_zeros(spec.seqlens_q[i], hq, dv)
    pieces = [o for o in outs if o is not None]
    out = query.new_zeros(query.shape[0], hq, dv) if not pieces else pieces[0] if len(pieces) == 1 else \
        torch.cat(pieces)
    if spec.needs_grad and not out.requires_grad:  # only zeros (no sequence sees a key): still differentiable
        out = _Zeros.apply(out, query, key, value)
    return out


def _shadow_one_sequence(p: VarlenPlan, pol: Policy, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, scale: float, seed: int) -> None:
    """A shadow check of the packed varlen call on one of its sequences (drawn from ``seed``), as a dense call."""
    spec, members = p.spec, p.varlen_members
    j = seed % len(members)
    oq = sum(spec.seqlens_q[i] for i in members[:j])
    ok = sum(spec.seqlens_k[i] for i in members[:j])
    i = members[j]
    lq, lk = spec.seqlens_q[i], spec.seqlens_k[i]
    qs, os_ = (t[oq:oq + lq].unsqueeze(0).transpose(1, 2) for t in (q, out))
    ks, vs = (t[ok:ok + lk].unsqueeze(0).transpose(1, 2) for t in (k, v))
    dense = _dense_spec(spec, 1, lq, lk, "bottom_right" if spec.causal else None, None)
    name = p.varlen_backend
    _shadow.check(qs, ks, vs, None, scale, os_, dense, name, f"{spec.describe()}: sequence {i} ({name} varlen op)",
                  pol.shadow_action, seed=seed)


# ------------------------------------------------------------------------------- direct group execution
# The groups' kernels are called through their aten forward and backward ops (``Backend.autograd_ops``), with one
# autograd node for the whole grouped part instead of a few per group (views, the kernel, the output split):
# measured on the H200 host, the autograd graph of a per-group attention() call costs ~3x the host time of the
# kernel calls themselves, and the grouped path is host-bound when it has many small groups.
_det_on = torch.are_deterministic_algorithms_enabled
# While torch.compile traces, the groups go through attention(), which dynamo traces kernel by kernel.
_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


class _Direct:
    """The grouped part of one plan, run without per-group autograd (see the adapters above).

    Built only where that is exactly what ``attention()`` would run for every group: each group's dense plan
    takes the kernel's direct route with nothing to adapt (no GQA repeat, head-dim padding, key truncation or
    masks), on padding that needs no mask (``none``, ``causal``, ``queries``). Per call it also needs contiguous
    packed inputs, no autocast, no shadow checking and torch's deterministic mode off; otherwise the groups go
    through ``attention()`` one by one, as before.
    """

    def __init__(self, p: VarlenPlan, ex: _Exec, calls: list[tuple[Any, Any, bool, Any]], real_q: Any,
                 cu_q: list[int], cu_k: list[int]) -> None:
        self.p, self.ex, self.calls, self.real_q, self.cu_q, self.cu_k = p, ex, calls, real_q, cu_q, cu_k
        self.members = sorted(i for g in p.groups for i in g.members)
        self.sizes = [p.spec.seqlens_q[i] for i in self.members]

    @classmethod
    def build(cls, p: VarlenPlan, ex: _Exec, device: torch.device, cu_q: list[int], cu_k: list[int]
              ) -> _Direct | None:
        s = p.spec
        if not p.groups or p.streams or s.dropout or min(s.head_dim, s.head_dim_v) < 2:
            return None  # (side streams: each group's kernels are issued on its stream by the per-group path)
        caps = capabilities(device)
        calls = []
        for g in p.groups:
            if g.padding not in ("none", "causal", "queries"):
                return None
            dense = _dense_spec(s, len(g.members), g.len_q, g.len_k, s.causal, None)
            try:
                dp = dense_plan(dense, caps, p.policy)
            except BackendUnavailableError:
                return None
            ops = BACKENDS[dp.backend].autograd_ops(device.type)
            pr = dp.prep
            if ops is None or dp.route != "direct" or dp.fallback or pr.repeat_kv != 1 or pr.pad_qk_to or \
                    pr.pad_v_to or pr.truncate_keys or pr.causal_mask or pr.float_bias or \
                    not isinstance(pr.kernel_causal, bool):
                return None  # (a fallback is counted and warned about by attention())
            calls.append((*ops, pr.kernel_causal, _plan_counter(dp.backend, dp.route, dense.describe())))
        real_q = None
        if ex.gather_q is not None:
            keep = []  # per gathered group, (b, len_q): True on each member's real query rows
            for n in ex.gathered:
                g = p.groups[n]
                lens = torch.tensor([s.seqlens_q[i] for i in g.members])
                keep.append((torch.arange(g.len_q)[None, :] < lens[:, None]).reshape(-1))
            real_q = torch.cat(keep).to(device)[:, None, None]
        return cls(p, ex, calls, real_q, cu_q, cu_k)

    def usable(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pol: Policy) -> bool:
        return (not pol.shadow and query.is_contiguous() and key.is_contiguous() and value.is_contiguous()
                and not torch.is_autocast_enabled(query.device.type) and not _det_on() and not _compiling())

    def split(self, grouped: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(grouped, self.sizes)

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """The grouped sequences' outputs, packed in sequence order."""
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            return _DirectGroups.apply(query, key, value, self, scale)
        return self.forward(query, key, value, scale, False)[0]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, lse: bool
                ) -> tuple[torch.Tensor, list[Any]]:
        p, ex = self.p, self.ex
        inputs = [tuple(t.transpose(1, 2) for t in qkv) for qkv in _group_inputs(p, ex, query, key, value)]
        results: list[Any] = [None] * len(p.groups)
        outs: list[torch.Tensor | None] = [None] * len(p.spec.seqlens_q)
        for n in ex.issue_order:
            fwd, _, is_causal, counter = self.calls[n]
            results[n] = fwd(*inputs[n], is_causal, scale, lse)
            next(counter)
            _place_outputs(p, ex, n, results[n][0].transpose(1, 2), outs)
        pieces: list[torch.Tensor] = [outs[i] for i in self.members]  # type: ignore[misc]  # every member placed above
        grouped = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return grouped, [inputs, results] if lse else []

    def backward(self, grad: torch.Tensor, saved: list[Any], scale: float, shapes: list[torch.Size]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, ex, s = self.p, self.ex, self.p.spec
        inputs, results = saved
        if grad.shape[0] != shapes[0][0]:  # grad is for the grouped members only: back to packed positions
            full = grad.new_zeros(shapes[0][0], *grad.shape[1:])
            start = 0
            for i, n_rows in zip(self.members, self.sizes, strict=True):
                full[self.cu_q[i]:self.cu_q[i] + n_rows] = grad[start:start + n_rows]
                start += n_rows
            grad = full
        go_single = torch.split(grad, list(s.seqlens_q)) if ex.singles else ()
        if ex.gather_q is not None:  # padding query rows get no gradient
            go_gathered = torch.split(grad.index_select(0, ex.gather_q) * self.real_q, ex.sizes_q)
        dq, dk, dv = (grad.new_zeros(shape) for shape in shapes)
        gathered: list[list[tuple[int, torch.Tensor]]] = [[], [], []]  # per input: (group number, its gradient)
        for n in ex.issue_order:
            g = p.groups[n]
            _, bwd, is_causal, _ = self.calls[n]
            out, extra = results[n]
            if n in ex.singles:
                go = go_single[ex.singles[n]].unsqueeze(0)
            else:
                go = go_gathered[ex.where[n]].view(len(g.members), g.len_q, s.heads_q, s.head_dim_v)
            grads = bwd(go.transpose(1, 2), *inputs[n], out, extra, is_causal, scale)
            if n in ex.singles:
                i = ex.singles[n]
                for t, gr, cu, lens in ((dq, grads[0], self.cu_q, s.seqlens_q), (dk, grads[1], self.cu_k, s.seqlens_k),
                                        (dv, grads[2], self.cu_k, s.seqlens_k)):
                    t[cu[i]:cu[i] + lens[i]] = gr[0].transpose(0, 1)
            else:
                for parts, gr in zip(gathered, grads, strict=True):
                    parts.append((n, gr))
        if ex.gather_q is not None:
            for t, parts, index in ((dq, gathered[0], ex.gather_q), (dk, gathered[1], ex.gather_k),
                                    (dv, gathered[2], ex.gather_k)):
                order = sorted(parts, key=lambda x: ex.where[x[0]])
                rows = torch.cat([gr.transpose(1, 2).reshape(-1, *gr.shape[1:2], gr.shape[-1]) for _, gr in order])
                # padding rows add exact zeros (no gradient reaches them); gather_k is set with gather_q
                t.index_add_(0, index, rows)  # type: ignore[arg-type]
        return dq, dk, dv


class _DirectGroups(torch.autograd.Function):
    """One autograd node for every group of a plan run by :class:`_Direct`."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, direct: _Direct,
                scale: float) -> torch.Tensor:
        out, saved = direct.forward(query, key, value, scale, True)
        # the tensors go through autograd's saved-tensor machinery (freed after backward, as the aten ops' are),
        # the rest (SymInts, None) stays on ctx
        leaves, ctx.tree = tree_flatten(saved)
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        ctx.save_for_backward(*(x for x, t in zip(leaves, ctx.is_tensor, strict=True) if t))
        ctx.others = [None if t else x for x, t in zip(leaves, ctx.is_tensor, strict=True)]
        ctx.direct, ctx.scale = direct, scale
        ctx.shapes = [query.shape, key.shape, value.shape]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the kernels' own backward ops: no double backward
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tensors = iter(ctx.saved_tensors)
        saved = tree_unflatten([next(tensors) if t else x for x, t in zip(ctx.others, ctx.is_tensor, strict=True)],
                               ctx.tree)
        dq, dk, dv = ctx.direct.backward(grad.contiguous(), saved, ctx.scale, ctx.shapes)
        return dq, dk, dv, None, None


class _Zeros(torch.autograd.Function):
    """Pass ``out`` (all zeros) through, giving zero gradients to the inputs it does not depend on."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in inputs]
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes))


_null = contextlib.nullcontext()


def clear_caches() -> None:
    """Forget every plan and index set (after changing :data:`COST_MODELS`)."""
    plan_varlen.cache_clear()
    _exec_cache.clear()


_caches.register("varlen.plan", plan_varlen.cache_clear)
