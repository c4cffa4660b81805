"""The varlen engine's execution: what a plan needs on a device, built once (index tensors, split sizes), the
group calls (through ``attention()``, or the kernels' own ops under one autograd node), the packed kernel call, and
the entry points :func:`run` and :func:`explain`; see :mod:`sdpa_flash._varlen`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import _caches, _shadow
from .._failures import is_refusal, record_or_raise, retrying
from ..backends import BACKENDS
from ..capability import capabilities
from ..errors import AttentionInputError, BackendUnavailableError
from ..planner import plan as dense_plan
from ..policy import Policy, get_policy, resolve_policy
from ..stats import plan_counter as _plan_counter
from .inputs import _host_lengths, _spec_of
from .planning import VarlenPlan, _coordinate_dim, _dense_spec, packed_spec, plan_varlen

__all__ = ["clear_caches", "explain", "run"]


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
    variants: dict[str, Any] = dataclasses.field(default_factory=dict)  # window/softcap for the packed kernel


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
        ex.variants = {name: value for name, value in (("window", s.window), ("softcap", s.softcap))
                       if value is not None}
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
    :mod:`sdpa_flash._varlen`). ``qg`` ``(b, Lq, Hq, D)``, ``kg`` ``(b, Lk, Hkv, D)``, ``key_ok`` ``(b, Lk)``."""
    extra = d_coord - qg.shape[-1]
    aq = qg.new_zeros(1, 1, 1, extra)
    aq[..., 0] = _Q_EXTRA[qg.dtype]
    ak = kg.new_zeros(*key_ok.shape, 1, extra)
    ak[..., 0] = torch.where(key_ok, 0.0, _K_EXTRA[kg.dtype])[..., None].to(kg.dtype)
    return (torch.cat([qg, aq.expand(*qg.shape[:-1], extra)], -1),
            torch.cat([kg, ak.expand(*kg.shape[:-1], extra)], -1))


def _policy(policy: Any) -> Policy:
    return get_policy() if policy is None else resolve_policy(policy)


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seqlens_q: Sequence[int],
            seqlens_k: Sequence[int], *, causal: Any = False, dropout_p: float = 0.0, policy: Any = None,
            window: Any = None, softcap: Any = None, sinks: Any = None) -> VarlenPlan:
    spec = _spec_of(query, key, value, tuple(seqlens_q), tuple(seqlens_k), causal, dropout_p, window, softcap, sinks)
    return plan_varlen(spec, capabilities(query.device), _policy(policy))


def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: Any, cu_seqlens_k: Any,
        max_seqlen_q: int, max_seqlen_k: int, *, causal: Any = False, scale: float | None = None,
        dropout_p: float = 0.0, policy: Any = None, seqlens_q: Sequence[int] | None = None,
        seqlens_k: Sequence[int] | None = None, window: Any = None, softcap: Any = None,
        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Execute the plan for one packed call; see :func:`sdpa_flash.varlen.varlen_attention_packed`."""
    lens_q = _host_lengths(cu_seqlens_q, seqlens_q, max_seqlen_q, "cu_seqlens_q")
    lens_k = _host_lengths(cu_seqlens_k, seqlens_k, max_seqlen_k, "cu_seqlens_k")
    spec = _spec_of(query, key, value, lens_q, lens_k, causal, dropout_p, window, softcap, sinks)
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
    try:
        return _execute(p, ex, query, key, value, dropout_p, scale, pol, sinks if spec.sinks else None)
    except _PackedFirstCallFailed as failed:
        exc = failed.__cause__ or failed
        name = failed.backend
        what = (f"the {name} backend's packed kernel failed at its first call for {spec.describe()}: "
                f"{type(exc).__name__}: {exc}")
        reason = record_or_raise(name, f"{name} (packed)", packed_spec(spec), exc, pol, spec.describe(), what)
        with retrying(what):
            out = run(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                      scale=scale, dropout_p=dropout_p, policy=policy, seqlens_q=lens_q, seqlens_k=lens_k,
                      window=window, softcap=softcap, sinks=sinks)
        again = plan_varlen(spec, capabilities(query.device), pol)
        warnings.warn(f"sdpa_flash: {what}. This batch ran on {again.path}"
                      f"{f' ({again.varlen_backend})' if again.varlen_backend else ''} instead, and such batches will "
                      f"from now on in this process (the {name} packed kernel's reason: {reason}).", UserWarning,
                      stacklevel=3)
        return out


class _PackedFirstCallFailed(Exception):
    """A packed kernel raised at its first call for a plan (internal: :func:`run` reroutes or raises)."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.backend = backend


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
             dropout_p: float, scale: float | None, pol: Policy, sinks: torch.Tensor | None = None) -> torch.Tensor:
    from .._dense import dense_attention as attention

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
        return _finish(p, ex, query, key, value, dropout_p, softmax_scale, pol, outs, sinks)
    streams = _side_streams(dev, p.streams) if p.streams and dev.type == "cuda" and len(p.groups) > 1 else []
    main = torch.cuda.current_stream(dev) if streams else None
    inputs = _group_inputs(p, ex, query, key, value)
    d_coord = _coordinate_dim(d)
    contiguous = p.contiguous_groups
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
                               scale=softmax_scale, policy=pol, window=spec.window, softcap=spec.softcap,
                               sinks=sinks).transpose(1, 2)
            else:
                og = attention(qg, kg, vg, attn_mask=mask, causal=causal, dropout_p=dropout_p,
                               scale=softmax_scale, layout="bshd", policy=pol, window=spec.window,
                               softcap=spec.softcap, sinks=sinks)
            if main is not None:
                og.record_stream(main)
            _place_outputs(p, ex, n, og, outs)
    if main is not None:
        for st in streams:
            main.wait_stream(st)
    return _finish(p, ex, query, key, value, dropout_p, softmax_scale, pol, outs, sinks)


def _finish(p: VarlenPlan, ex: _Exec, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            dropout_p: float, softmax_scale: float, pol: Policy, outs: list[torch.Tensor | None],
            sinks: torch.Tensor | None = None) -> torch.Tensor:
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
        try:
            if spec.variants:  # (keywords a packed kernel gets only when it declares them: see Backend.varlen)
                ov = ex.varlen_run(qv, kv, vv, cq, ck, mq, mk, dropout_p, spec.causal is not None, softmax_scale,
                                   **ex.variants, **({} if sinks is None else {"sinks": sinks}))
            else:
                ov = ex.varlen_run(qv, kv, vv, cq, ck, mq, mk, dropout_p, spec.causal is not None, softmax_scale)
        except Exception as exc:
            if ex.flash_calls is None and is_refusal(exc):  # its first call: the kernel may refuse the configuration
                raise _PackedFirstCallFailed(p.varlen_backend) from exc
            raise
        if ex.flash_calls is None:
            ex.flash_calls = _plan_counter(p.varlen_backend, f"{p.varlen_backend} varlen op", spec.describe())
        next(ex.flash_calls)
        if pol.shadow and not dropout_p and not spec.variants:  # (the shadow's reference has no variants)
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
        out = _Zeros.apply(out, query, key, value, *(() if sinks is None else (sinks,)))
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
        if not p.groups or p.streams or s.dropout or s.variants or min(s.head_dim, s.head_dim_v) < 2:
            # (side streams: each group's kernels are issued on its stream by the per-group path; the kernels'
            # own ops of autograd_ops take no window, softcap or sinks)
            return None
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
