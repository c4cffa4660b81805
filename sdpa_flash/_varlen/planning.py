"""The varlen engine's planning: the batch's summary (:class:`VarlenSpec`), the cut of its sequences into dense
groups by the cost model, and the choice of path (:func:`plan_varlen`: pure, cached); see :mod:`sdpa_flash._varlen`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from .. import _caches
from .._validate import check_window
from ..capability import Capabilities
from ..errors import BackendUnavailableError
from ..planner import plan as dense_plan
from ..policy import Policy
from ..spec import AttentionSpec, Window, dtype_name
from .cost import CostModel, cost_model, visible_pairs, window_span

__all__ = ["Group", "VarlenPlan", "VarlenSpec", "plan_varlen"]



# --------------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class VarlenSpec:
    """What a varlen call's plan depends on (lengths as host tuples; shapes in (T, H, D) terms).

    ``window``, ``softcap`` and ``sinks`` are :class:`~sdpa_flash.spec.AttentionSpec`'s, the window aligned per
    sequence (bottom-right: query i of sequence s sees key j iff ``-left <= j - (i + Lk_s - Lq_s) <= right``).
    """

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
    window: Window | None = None
    softcap: float | None = None
    sinks: bool = False

    @property
    def variants(self) -> bool:
        """A window, softcap or sinks."""
        return self.window is not None or self.softcap is not None or self.sinks

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
        if self.window is not None:
            parts.append(f"window={self.window} per sequence")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        return ", ".join(parts)



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
        cost_model: the key of the cost model that decided (``"cuda"``, ``"cuda:sm90"``, ``"cpu"``).
        contiguous_groups: the groups' inputs are gathered into contiguous memory (the cost model's choice).
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
    cost_model: str = ""
    contiguous_groups: bool = False

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
        if self.cost_model:
            lines.append(f"cost:    the {self.cost_model!r} cost model")
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
    """The dense call of ``b`` sequences padded to ``(lq, lk)``, with the batch's variants; the window as that call
    keeps it (dropped where it covers every key of the padded shape, as :func:`sdpa_flash.attention` drops it)."""
    window = spec.window
    if window is not None and not (causal == "top_left" and lq != lk):  # (planning's exact pairs: see _grouping)
        window = check_window(window, causal, lq, lk)
    return AttentionSpec(spec.device_type, spec.dtype, b, spec.heads_q, spec.heads_kv, lq, lk, d or spec.head_dim,
                         spec.head_dim_v, causal, mask, spec.dropout, spec.needs_grad, window=window,
                         softcap=spec.softcap, sinks=spec.sinks)


def _coordinate_dim(d: int) -> int:
    return -(-(d + 1) // 8) * 8


def packed_spec(spec: VarlenSpec) -> AttentionSpec:
    """What the one planner is asked for a ragged batch's packed kernel: its longest query and key as one sequence
    (causal, if any, bottom-right), with the batch's variants."""
    return _dense_spec(spec, 1, max(spec.seqlens_q, default=1), max(spec.seqlens_k, default=1),
                       "bottom_right" if spec.causal else None, None)


def _varlen_kernel(spec: VarlenSpec, caps: Capabilities, policy: Policy) -> tuple[str, list[str]]:
    """The backend whose packed (``cu_seqlens``) kernel runs this batch in one call, and why not, when none can.

    The one planner decides (:func:`sdpa_flash.planner.plan` with ``entry="packed"``): the policy's backends in its
    order (``auto`` / ``fused``: the ranking rule for the batch's longest sequence, as for a dense call of that
    shape, plug-ins included), each refused with its reasons (no packed kernel, requirements, denylist) until one
    can run it.
    """
    if spec.causal == "top_left" and spec.seqlens_q != spec.seqlens_k:
        return "", ["causal='top_left' with query and key lengths that differ: packed kernels align causal "
                    "bottom-right (pass causal='bottom_right' for flash-attn's convention)"]
    try:
        return dense_plan(packed_spec(spec), caps, policy, entry="packed").backend, []
    except BackendUnavailableError as exc:
        return "", [f"{name}: {r}" for name, why in exc.reasons.items() for r in why]


def _grouping(spec: VarlenSpec, ids: list[int], model: CostModel, pad_keys: str, d_coord: int,
              bwd: bool) -> tuple[float, list[Group]]:
    """Cheapest cut of ``ids`` (sorted by ``(L_k, L_q)``) into contiguous groups: dynamic programming on the
    cost model. ``pad_keys`` is how padding keys are hidden (``"coordinate"``, ``"mask"``, or ``"none"``:
    groups whose key lengths differ are not allowed).

    With a window, a group's dense call aligns it to the padded shape's corner (offset ``len_k - len_q``) while each
    sequence's own corner is ``L_k - L_q``: so the members of a non-causal group share ``L_k - L_q`` (right padding
    then keeps every real query's window where it was; the padding keys past a window's reach stay hidden by the
    key padding, and a window that reaches them also reaches the last real key, so no real query sees padding
    alone). Causal groups are square or exact already."""
    n = len(ids)
    if not n:
        return 0.0, []
    lq = [spec.seqlens_q[i] for i in ids]
    lk = [spec.seqlens_k[i] for i in ids]
    causal = spec.causal is not None
    same_offset = spec.window is not None and not causal
    span = window_span(spec.causal, spec.window)
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
            if same_offset and lk[i] - lq[i] != lk[j - 1] - lq[j - 1]:
                break  # a window is aligned per sequence (see above): one offset per group
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
            cost = model.dense_us(j - i, spec.heads_q, mq, mk, d, spec.head_dim_v, causal, bwd,
                                  visible_pairs(mq, mk, spec.causal, spec.window), span)
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
    model_key, model = cost_model(caps.device_type, caps.arch)
    p = _plan_varlen(spec, caps, policy, model_key, model)
    return dataclasses.replace(p, cost_model=model_key, contiguous_groups=model.contiguous_groups)


def _plan_varlen(spec: VarlenSpec, caps: Capabilities, policy: Policy, model_key: str, model: CostModel
                 ) -> VarlenPlan:
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
    # the coordinate hides a padding key by a huge negative score, which a softcap would bound at -softcap: a mask
    pad_keys = "mask" if spec.softcap is not None and model.padding == "coordinate" else model.padding
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
        pairs = {i: visible_pairs(spec.seqlens_q[i], spec.seqlens_k[i], spec.causal, spec.window) for i in live}
        estimates["flash_varlen"] = model.varlen_us(sum(pairs.values()), spec.heads_q, spec.head_dim,
                                                    spec.head_dim_v, bwd, vk)
        if not why_dense:
            # hybrid: the k shortest (by work) in one varlen call, the rest grouped; try a few cut points.
            by_work = sorted(live, key=lambda i: pairs[i])
            for frac in (0.25, 0.5, 0.75, 0.875):
                k = int(len(by_work) * frac)
                if not 0 < k < len(by_work):
                    continue
                short = by_work[:k]
                rest = sorted(by_work[k:], key=lambda i: (spec.seqlens_k[i], spec.seqlens_q[i]))
                c_rest, g_rest = _grouping(spec, rest, model, pad_keys, d_coord, bwd)
                if groups_reasons(g_rest):
                    continue
                c = c_rest + model.varlen_us(sum(pairs[i] for i in short), spec.heads_q, spec.head_dim,
                                             spec.head_dim_v, bwd, vk)
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
                              f"{model_key}, on {caps.arch})",)
    if path == "grouped":
        return VarlenPlan(path, backend, tuple(groups), (), zero, streams, estimates, reasons, spec, policy)
    if path == "hybrid":
        return VarlenPlan(path, backend, tuple(hybrid_groups), hybrid_varlen, zero, streams, estimates, reasons,
                          spec, policy, vk)
    return VarlenPlan(path, vk, (), tuple(sorted(live)), zero, 0, estimates, reasons, spec, policy, vk)



_caches.register("varlen.plan", plan_varlen.cache_clear)
