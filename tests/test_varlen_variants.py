"""Sliding windows, logit softcap and attention sinks on ragged batches (issue #25, the packed part).

``varlen_attention`` / ``varlen_attention_packed`` / ``explain_varlen`` take ``window=``, ``softcap=`` and ``sinks=``
with ``attention()``'s conventions, the window aligned bottom-right per sequence. Every route that claims a variant
is checked against float64 math of each sequence alone (``sdpa_flash.testing.reference_attention``) by the project's
tolerance rule, forward and backward, the sinks' gradient included:

* the grouped dense route on the CPU, under every way of grouping (per sequence, key mask, head-dim coordinate,
  equal lengths only), on the dense kernels that do the variants (chunked; math for windows);
* FlashAttention-4's packed call, through ``tests/fa4_fake.py`` (its conventions, float32 arithmetic);
* PyTorch's packed flash op, through ``tests/flash_packed_fake.py`` (FlashAttention-2's conventions, including the
  log-sum-exp it returns, which the sinks' adaptation uses), and on a GPU the real op (``sm80`` tests below).

Refusals are checked as data: ``explain_varlen`` names the route and every packed kernel's reasons.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import fa4_fake  # tests/ is on sys.path (pytest rootdir-relative imports)
import flash_packed_fake
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from varlen_cost import cost_model, force_packed
from varlen_cost import models as cpu_models

import sdpa_flash
from sdpa_flash import AttentionInputError, BackendUnavailableError, Capabilities, varlen
from sdpa_flash import _varlen as engine
from sdpa_flash._varlen import execution
from sdpa_flash.backends import fa4 as fa4_mod
from sdpa_flash.backends import flash as flash_mod
from sdpa_flash.policy import resolve_policy
from sdpa_flash.spec import window_mask_tensor
from sdpa_flash.testing import ProblemParams, compare_to_reference, property_profile, reference_attention
from sdpa_flash.testing._problems import AttentionProblem, _magnitudes

EXAMPLES = max(10, property_profile().max_examples // 2)
SM90 = Capabilities.synthetic("cuda", (9, 0))
SM90_FA4 = Capabilities.synthetic("cuda", (9, 0), kernels={"fa4": "4.0.0b40"})


# --------------------------------------------------------------------------------------------------- helpers
def _visible(lq: int, lk: int, causal: Any, window: Any) -> torch.Tensor:
    """(Lq, Lk) True where query i of one sequence sees key j, from the definitions (not the library's code)."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal is True or causal == "top_left":
        keep &= j <= i
    elif causal == "bottom_right":
        keep &= j <= i + lk - lq
    if window is not None:
        left, right = (None if s is None or s < 0 else s for s in window)
        rel = j - (i + lk - lq)
        if left is not None:
            keep &= rel >= -left
        if right is not None:
            keep &= rel <= right
    return keep


@dataclasses.dataclass
class Case:
    """One ragged problem: per-sequence lengths, sizes, and the options (``sinks``: whether there are any)."""

    lq: list[int]
    lk: list[int]
    causal: Any = False
    window: Any = None
    softcap: float | None = None
    sinks: bool = False
    hq: int = 2
    hkv: int = 2
    d: int = 8
    dv: int = 8
    dtype: torch.dtype = torch.float32
    sinks_dtype: torch.dtype = torch.float32
    seed: int = 0

    def options(self) -> dict[str, Any]:
        return {"causal": self.causal, "window": self.window, "softcap": self.softcap}


def run_and_check(case: Case, *, policy: Any = None, device: str = "cpu",
                  run: Any = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``varlen_attention_packed`` (or ``run(q, k, v, cu_q, cu_k, max_q, max_k, sinks)``) on ``case``, checked against
    float64 math of each sequence alone by the tolerance rule: out, dq, dk, dv and dsinks. Rows that see no key
    must be exactly 0 and get no upstream gradient. Returns the output and the gradients."""
    c = case
    g = torch.Generator().manual_seed(c.seed)
    tq, tk = sum(c.lq), sum(c.lk)
    base = [torch.randn(tq, c.hq, c.d, generator=g), torch.randn(tk, c.hkv, c.d, generator=g),
            torch.randn(tk, c.hkv, c.dv, generator=g)]
    sink_base = torch.randn(c.hq, generator=g) * 2 if c.sinks else None
    leaves = [t.to(device=device, dtype=c.dtype).requires_grad_() for t in base]
    sink = None if sink_base is None else sink_base.to(device=device, dtype=c.sinks_dtype).requires_grad_()
    vis = [_visible(a, b, c.causal, c.window) for a, b in zip(c.lq, c.lk, strict=True)]
    rows = torch.cat([v.any(-1) for v in vis]).to(device) if tq else torch.zeros(0, dtype=torch.bool, device=device)
    go = (torch.randn(tq, c.hq, c.dv, generator=g).to(device=device, dtype=c.dtype) * rows[:, None, None])
    cu_q = varlen.cu_seqlens_from_lengths(c.lq, device)
    cu_k = varlen.cu_seqlens_from_lengths(c.lk, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback's warning: no fused kernel of PyTorch's does the variants
        if run is None:
            out = varlen.varlen_attention_packed(*leaves, cu_q, cu_k, max(c.lq, default=0), max(c.lk, default=0),
                                                 sinks=sink, policy=policy, **c.options())
        else:
            out = run(*leaves, cu_q, cu_k, max(c.lq, default=0), max(c.lk, default=0), sink)
    assert out.shape == (tq, c.hq, c.dv) and out.dtype == c.dtype
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows])), "rows that see no key must be 0"
    wrt = leaves + ([sink] if sink is not None else [])
    grads = [gr if gr is not None else torch.zeros_like(t)
             for gr, t in zip(torch.autograd.grad(out, wrt, go, allow_unused=True), wrt, strict=True)]

    def reference(dt: torch.dtype | None) -> list[torch.Tensor]:
        ins = [t.detach().to(dt or t.dtype).requires_grad_() for t in leaves]
        s = None if sink is None else sink.detach().to(dt or sink.dtype).requires_grad_()
        outs = []
        starts_q = [0, *torch.tensor(c.lq).cumsum(0).tolist()]
        starts_k = [0, *torch.tensor(c.lk).cumsum(0).tolist()]
        for i, (a, b) in enumerate(zip(c.lq, c.lk, strict=True)):
            qi = ins[0][starts_q[i]:starts_q[i] + a]
            if not a:
                continue
            if not b:
                outs.append(qi.new_zeros(a, c.hq, c.dv))
                continue
            ki, vi = (t[starts_k[i]:starts_k[i] + b] for t in ins[1:])
            o = reference_attention(*(t.transpose(0, 1)[None] for t in (qi, ki, vi)), sinks=s, dtype=dt,
                                    **c.options())
            outs.append(o[0].transpose(0, 1).nan_to_num(0.0))
        ref = torch.cat(outs) if outs else ins[0].new_zeros(0, c.hq, c.dv)
        wrt_ref = ins + ([s] if s is not None else [])
        if not ref.requires_grad:  # no sequence with both queries and keys: nothing depends on the inputs
            return [ref.detach(), *(torch.zeros_like(t) for t in wrt_ref)]
        gr = torch.autograd.grad(ref, wrt_ref, go.to(ref.dtype), allow_unused=True)
        return [ref.detach(), *(x if x is not None else torch.zeros_like(t) for x, t in zip(gr, wrt_ref, strict=True))]

    ref64, same = reference(torch.float64), reference(None)
    mags, smags, reduction = _floors(c, leaves, ref64[0], go, vis)
    names = ("out", "dq", "dk", "dv", "dsinks")
    include = [rows[:, None, None], rows[:, None, None], None, None, None]
    for i, (cand, sd, r) in enumerate(zip([out, *grads], same, ref64, strict=True)):
        m = (mags[i], smags[i]) if i < 4 else (None, None)  # (the sinks' sum over rows: the plain floor)
        comparison = compare_to_reference(cand, sd, r, name=names[i], magnitude=m[0], score_magnitude=m[1],
                                          reduction=reduction, include=include[i], dtype=c.dtype)
        assert comparison.passed, f"{case}: {comparison}"
    return out.detach(), grads


def _floors(c: Case, leaves: list[torch.Tensor], out64: torch.Tensor, go: torch.Tensor, vis: list[torch.Tensor]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The tolerance rule's floor magnitudes (``M``, ``Ms``) of out, dq, dk, dv, packed, worked out per sequence by
    ``sdpa_flash.testing`` for the sequence alone with its visible keys as a boolean mask (softcap only shrinks the
    scores and a sink only takes weight away, so the plain problem's magnitudes bound theirs)."""
    dev = leaves[0].device
    packed: list[list[torch.Tensor]] = [[], [], [], []]
    spacked: list[list[torch.Tensor]] = [[], [], [], []]
    starts_q = [0, *torch.tensor(c.lq).cumsum(0).tolist()]
    starts_k = [0, *torch.tensor(c.lk).cumsum(0).tolist()]
    reduction = 1
    for i, (a, b) in enumerate(zip(c.lq, c.lk, strict=True)):
        sq = slice(starts_q[i], starts_q[i] + a)
        sk = slice(starts_k[i], starts_k[i] + b)
        if not a or not b:
            for lst in (packed, spacked):
                lst[0].append(torch.zeros(a, c.hq, c.dv, dtype=torch.float64, device=dev))
                lst[1].append(torch.zeros(a, c.hq, c.d, dtype=torch.float64, device=dev))
                lst[2].append(torch.zeros(b, c.hkv, c.d, dtype=torch.float64, device=dev))
                lst[3].append(torch.zeros(b, c.hkv, c.dv, dtype=torch.float64, device=dev))
            continue
        reduction = max(reduction, b, a * c.hq // c.hkv, c.d, c.dv)
        q, k, v = (t.detach()[s].transpose(0, 1)[None] for t, s in zip(leaves, (sq, sk, sk), strict=True))
        params = ProblemParams(c.dtype, 1, c.hq, c.hkv, a, b, c.d, c.dv, backward=True, mask="bool")
        problem = AttentionProblem(params, dev, q, k, v, vis[i].to(dev), go[sq].transpose(0, 1)[None])
        m, ms = _magnitudes(problem, out64[sq].transpose(0, 1)[None], True)
        for n in range(4):
            packed[n].append(m[n][0].transpose(0, 1))
            spacked[n].append(ms[n][0].transpose(0, 1))
    return [torch.cat(x) for x in packed], [torch.cat(x) for x in spacked], reduction


def models() -> dict[str, engine.CostModel]:
    """The CPU cost model, and variants that force each way of grouping (every one must be exact)."""
    return cpu_models("cpu")


LQ = [5, 1, 7, 7, 3, 12, 0, 4, 9, 9, 30]
LK_CROSS = [3, 0, 9, 2, 5, 12, 4, 1, 9, 10, 2]
VARIANTS = {
    "window": {"window": (3, 2)},
    "causal window": {"window": (4, None), "causal": "bottom_right"},
    "softcap": {"softcap": 2.5},
    "sinks": {"sinks": True},
    "all three": {"window": (2, 0), "causal": "bottom_right", "softcap": 4.0, "sinks": True},
}


# ------------------------------------------------------------------------------------- the grouped route
@pytest.mark.parametrize("model", list(models()))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_grouping_with_variants_equals_per_sequence_attention(model: str, variant: str) -> None:
    kw = VARIANTS[variant]
    with cost_model("cpu", models()[model]):
        run_and_check(Case(LQ, LQ, **kw))
        run_and_check(Case(LQ, LK_CROSS, hq=4, hkv=2, **kw))  # Lq != Lk per sequence, GQA
        if kw.get("causal") == "bottom_right":  # top-left causal is the same on square sequences
            run_and_check(Case(LQ, LQ, **{**kw, "causal": True}))


@settings(max_examples=EXAMPLES, deadline=None)
@given(lq=st.lists(st.integers(0, 20), min_size=1, max_size=6), extra=st.lists(st.integers(-6, 8), min_size=6,
                                                                                   max_size=6),
       causal=st.sampled_from([False, True, "bottom_right"]),
       window=st.none() | st.tuples(st.none() | st.integers(0, 12), st.none() | st.integers(0, 12)),
       softcap=st.none() | st.sampled_from([1.0, 5.0]), sinks=st.booleans(), group=st.sampled_from([1, 2]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       sinks_dtype=st.sampled_from(["float32", "input"]), model=st.sampled_from(list(models())),
       policy=st.sampled_from([None, "chunked"]), seed=st.integers(0, 2**16))
def test_varlen_variants_equal_per_sequence_attention_property(
        lq: list[int], extra: list[int], causal: Any, window: Any, softcap: Any, sinks: bool, group: int,
        dtype: torch.dtype, sinks_dtype: str, model: str, policy: Any, seed: int) -> None:
    """Any lengths (zero-length sequences, Lq != Lk, rows the window leaves without a key), any variant mix, GQA,
    every grouping, auto and chunked: forward and backward (sinks' gradient too) within the tolerance rule."""
    lk = lq if causal is True else [max(0, a + b) for a, b in zip(lq, extra, strict=False)]
    case = Case(lq, lk, causal, window, softcap, sinks, hq=2 * group, hkv=2, d=8, dv=8 if group == 1 else 4,
                dtype=dtype, sinks_dtype=torch.float32 if sinks_dtype == "float32" else dtype, seed=seed)
    with cost_model("cpu", models()[model]):
        run_and_check(case, policy=policy)


@pytest.mark.parametrize("sinks", [False, True])
def test_rows_the_window_leaves_without_a_key_are_zero(sinks: bool) -> None:
    """Bottom-right with Lq > Lk and a left-only window: the first queries of each sequence see no key (0, as the
    dense call gives, with or without a sink), and nothing of them reaches the other rows' gradients."""
    case = Case([30, 6, 12], [12, 6, 2], "bottom_right", (3, None), None, sinks, hq=4, hkv=2)
    out, _ = run_and_check(case)
    assert out[:18].abs().max() == 0 and out[30:30].numel() == 0  # query i's own position is key i - 18
    run_and_check(dataclasses.replace(case, causal=False, window=(0, 0)))  # a band of one key: i + Lk - Lq
    run_and_check(dataclasses.replace(case, window=(-1, -1)))  # -1 on both sides: unbounded, a plain call


def test_zero_length_sequences_with_every_variant() -> None:
    for kw in VARIANTS.values():
        run_and_check(Case([0, 3, 0, 2], [0, 0, 4, 2], **{**kw, "causal": "bottom_right" if "causal" in kw else
                                                           False}))
        run_and_check(Case([2, 1], [0, 0], **{k: v for k, v in kw.items() if k != "causal"}))  # no key at all


def test_nested_and_varlen_batch_inputs_take_the_variants() -> None:
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 4, 8, generator=g) for n in (4, 9, 1)]
    s = torch.randn(4, generator=g)
    kw = dict(causal=True, window=(2, 0), softcap=3.0, sinks=s)
    batch = varlen.pack(xs)
    out = varlen.varlen_attention(batch, batch, batch, **kw)
    nested = varlen.varlen_attention(*(batch.to_nested(),) * 3, **kw)
    assert nested.is_nested and torch.equal(varlen.from_nested(nested).values, out.values)
    for x, o in zip(xs, out.unpack(), strict=True):
        ref = reference_attention(*(x.transpose(0, 1)[None],) * 3, **kw)[0].transpose(0, 1)
        torch.testing.assert_close(o, ref.float(), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- the plan
def test_softcap_never_hides_padding_with_the_coordinate() -> None:
    """The coordinate trick hides a padding key by a huge negative score, which c * tanh(s / c) would bound at -c:
    with a softcap the groups hide padding keys with a mask instead (sinks keep the coordinate: it stays exact)."""
    b = varlen.pack([torch.randn(n, 2, 8) for n in (3, 9, 5, 7)])
    with cost_model("cpu", models()["one group, coordinate padding"]):
        capped = varlen.explain_varlen(b, b, b, softcap=5.0)
        assert capped.groups and all(g.padding != "coordinate" for g in capped.groups), capped.explain()
        sunk = varlen.explain_varlen(b, b, b, sinks=torch.zeros(2))
        assert any(g.padding == "coordinate" for g in sunk.groups), sunk.explain()
        run_and_check(Case([3, 9, 5, 7], [3, 9, 5, 7], softcap=1.0))
        run_and_check(Case([3, 9, 5, 7], [3, 9, 5, 7], sinks=True))


def test_a_window_groups_only_sequences_with_one_corner_offset() -> None:
    """A dense group call aligns a window to its padded shape's corner: non-causal groups hold sequences with one
    L_k - L_q, so each keeps its own corner (and the plan shows it)."""
    lq, lk = [4, 6, 8, 5, 9], [4, 8, 6, 5, 12]
    q = varlen.pack([torch.randn(n, 2, 8) for n in lq])
    kv = varlen.pack([torch.randn(n, 2, 8) for n in lk])
    with cost_model("cpu", models()["one group, mask padding"]):
        plain = varlen.explain_varlen(q, kv, kv)
        assert len(plain.groups) == 1
        windowed = varlen.explain_varlen(q, kv, kv, window=(2, 1))
        for g in windowed.groups:
            assert len({lk[i] - lq[i] for i in g.members}) == 1, windowed.explain()
        assert len(windowed.groups) == 4  # offsets 0 (two sequences), 2, -2 and 3
        run_and_check(Case(lq, lk, window=(2, 1)))


@given(lq=st.integers(1, 40), lk=st.integers(1, 40), causal=st.sampled_from([None, "top_left", "bottom_right"]),
       left=st.none() | st.integers(0, 50), right=st.none() | st.integers(0, 50))
@settings(max_examples=300, deadline=None)
def test_the_cost_model_counts_the_pairs_the_mask_leaves(lq: int, lk: int, causal: str | None, left: int | None,
                                                         right: int | None) -> None:
    """The work the cost model charges: exactly the (query, key) pairs the causal mask and the window leave (the
    blocks the kernels compute), counted in closed form, against the mask itself."""
    from sdpa_flash._varlen.cost import visible_pairs, window_span

    window = None if left is None and right is None else (left, right)
    if causal == "top_left" and window is not None and lq != lk:
        causal = "bottom_right"  # (windows are aligned bottom-right; top-left with a window is refused)
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if causal is not None:
        visible &= torch.ones(lq, lk, dtype=torch.bool).tril(0 if causal == "top_left" else lk - lq)
    if window is not None:
        visible &= window_mask_tensor(window, lq, lk, torch.device("cpu"))
    assert visible_pairs(lq, lk, causal, window) == int(visible.sum())
    span = window_span(causal, window)
    assert int(visible.sum(-1).max()) <= span  # no query sees more keys than the span says


def test_a_window_shrinks_the_estimates_to_the_work_it_leaves() -> None:
    """A window of 128 over sequences of 1-4k tokens leaves ~1/16 of the causal work: the packed call's estimate falls
    towards its fixed cost, and the plan says so in its estimates (synthetic sm90 capabilities)."""
    caps, auto = Capabilities.synthetic("cuda", (9, 0)), resolve_policy("auto")
    lens = (1024, 2048, 3000, 4096)
    specs = {w: engine.VarlenSpec("cuda", torch.bfloat16, 64, 8, 64, 64, lens, lens, "bottom_right", False, True,
                                  window=w) for w in (None, (127, 0))}
    model = engine.cost.COST_MODELS["cuda"]
    kernel = engine.planning._varlen_kernel(specs[None], caps, auto)[0]  # flash's packed op, or FA4's if installed
    fixed = model.varlen_us(0, 64, 64, 64, True, kernel)
    work = {w: engine.plan_varlen(spec, caps, auto).estimates["flash_varlen"] - fixed for w, spec in specs.items()}
    full = sum(n * (n + 1) // 2 for n in lens)
    windowed = sum(128 * n - 127 * 128 // 2 for n in lens)  # 128 keys per query but the first 127 queries'
    assert work[(127, 0)] / work[None] == pytest.approx(windowed / full, rel=1e-9)


def test_explain_varlen_names_the_route_and_the_reasons() -> None:
    b = varlen.pack([torch.randn(n, 2, 8) for n in (5, 9, 2)])
    p = varlen.explain_varlen(b, b, b, causal=True, window=(3, 0), softcap=5.0, sinks=torch.zeros(2))
    assert p.path == "grouped" and p.backend == "chunked", p.explain()
    text = p.explain()
    assert "window=(3, None) per sequence" in text and "softcap=5" in text and "sinks" in text
    assert "CUDA only" in p.reasons["flash_varlen"][0]
    with pytest.raises(BackendUnavailableError, match="no logit softcap"):
        varlen.varlen_attention(b, b, b, softcap=5.0, policy="math")
    plan = varlen.explain_varlen(b, b, b, window=(3, 1), policy="math")  # math takes a window as a mask
    assert plan.backend == "math" and "window=(3, 1)" in plan.spec.describe()


def _packed_reasons(spec: engine.VarlenSpec, caps: Capabilities, policy: str = "auto") -> engine.VarlenPlan:
    return engine.plan_varlen(spec, caps, resolve_policy(policy))


def test_packed_kernels_say_which_variants_they_take() -> None:
    """On an H100 without FA4 the flash packed op takes windows (where the op schema has them) and sinks (its
    log-sum-exp adaptation), never softcap; with FA4 installed, FA4 takes all three; the reasons say so."""
    lens = (300, 17, 129, 64)
    base = engine.VarlenSpec("cuda", torch.bfloat16, 8, 2, 64, 64, lens, lens, "top_left", False, True)
    with cost_model("cuda", dataclasses.replace(engine.COST_MODELS["cuda"], call_us=1e9, call_us_bwd=1e9)):
        for change, flash_ok in (({"window": (31, None)}, flash_mod.packed_window_args()), ({"sinks": True}, True),
                                 ({"softcap": 30.0}, False)):
            spec = dataclasses.replace(base, **change)
            p = _packed_reasons(spec, SM90)
            if flash_ok:
                assert p.path == "flash_varlen" and p.varlen_backend == "flash", p.explain()
            else:
                assert p.varlen_backend != "flash", p.explain()
                assert any("no logit softcap" in r for r in p.reasons["flash_varlen"]), p.explain()
            with_fa4 = _packed_reasons(spec, SM90_FA4, "fa4")
            assert with_fa4.path == "flash_varlen" and with_fa4.varlen_backend == "fa4", with_fa4.explain()
        with pytest.raises(BackendUnavailableError) as info:  # the dense flash op adapts sinks the same way
            _packed_reasons(dataclasses.replace(base, sinks=True, dropout=True), SM90, "flash")
        for route in ("flash_varlen", "grouped"):
            assert any("sinks with dropout_p > 0" in r for r in info.value.reasons[route]), str(info.value)


def test_a_torch_whose_packed_op_has_no_window_refuses_it_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash_mod, "packed_window_args", lambda: False)
    sdpa_flash._caches.clear_all()
    try:
        lens = (300, 17)
        spec = engine.VarlenSpec("cuda", torch.bfloat16, 8, 2, 64, 64, lens, lens, None, False, True, (16, 16))
        with pytest.raises(BackendUnavailableError, match="take no window_size_left/right") as info:
            _packed_reasons(spec, SM90, "flash")
        assert "flash_varlen" in info.value.reasons
    finally:
        sdpa_flash._caches.clear_all()


def test_the_packed_op_schema_is_read_for_the_window() -> None:
    forward = {a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments}
    backward = {a.name for a in torch.ops.aten._flash_attention_backward.default._schema.arguments}
    want = {"window_size_left", "window_size_right"}
    assert flash_mod.packed_window_args() == (want <= forward and want <= backward)


# --------------------------------------------------------------------------------------- input checking
BAD = [
    ({"window": 4}, r"window to be None or \(left, right\)"),
    ({"window": (1, 2, 3)}, r"window to be None or \(left, right\)"),
    ({"window": (1.5, 0)}, r"window to be None or \(left, right\)"),
    ({"softcap": -1.0}, r"softcap to be None or a finite float >= 0"),
    ({"softcap": float("nan")}, r"softcap to be None or a finite float >= 0"),
    ({"sinks": torch.zeros(3)}, r"sinks to be a floating-point tensor of shape \(Hq,\) = \(4,\)"),
    ({"sinks": torch.zeros(4, dtype=torch.int64)}, r"sinks to be a floating-point tensor"),
    ({"sinks": [0.0] * 4}, r"sinks to be None or a torch\.Tensor"),
    ({"sinks": torch.zeros(4, device="meta")}, r"sinks on cpu like the query"),
]


@pytest.mark.parametrize(("kw", "match"), BAD)
def test_bad_variants_read_the_same_at_every_entry_point(kw: dict[str, Any], match: str) -> None:
    q = varlen.pack([torch.randn(n, 4, 8) for n in (3, 5)])
    kv = varlen.pack([torch.randn(n, 2, 8) for n in (4, 5)])
    calls = [
        lambda: varlen.varlen_attention(q, kv, kv, **kw),
        lambda: varlen.explain_varlen(q, kv, kv, **kw),
        lambda: varlen.varlen_attention_packed(q.values, kv.values, kv.values, q.cu_seqlens, kv.cu_seqlens,
                                               q.max_seqlen, kv.max_seqlen, **kw),
        lambda: sdpa_flash.attention(torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8),
                                     key_padding_mask=torch.ones(2, 5, dtype=torch.bool), **kw),
        lambda: sdpa_flash.attention(torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8),
                                     **kw),
    ]
    for call in calls:
        with pytest.raises(AttentionInputError, match=match):
            call()


def test_top_left_causal_with_a_window_names_the_sequence_whose_lengths_differ() -> None:
    q = varlen.pack([torch.randn(n, 2, 8) for n in (3, 5, 4)])
    kv = varlen.pack([torch.randn(n, 2, 8) for n in (3, 7, 4)])
    for call in (varlen.varlen_attention, varlen.explain_varlen):
        with pytest.raises(AttentionInputError, match=r"Sq=5 != Sk=7 in sequence 1.*pass causal='bottom_right'"):
            call(q, kv, kv, causal=True, window=(2, 0))
    varlen.varlen_attention(q, kv, kv, causal="bottom_right", window=(2, 0))  # flash-attn's corner: fine
    empty = varlen.pack([torch.randn(n, 2, 8) for n in (3, 0)])
    keys = varlen.pack([torch.randn(n, 2, 8) for n in (3, 6)])
    varlen.varlen_attention(empty, keys, keys, causal=True, window=(2, 0))  # a sequence with no query: no corner


def test_a_window_that_covers_every_key_of_every_sequence_is_a_plain_call() -> None:
    b = varlen.pack([torch.randn(n, 2, 8) for n in (3, 9)])
    assert varlen.explain_varlen(b, b, b, causal=True, window=(8, 0)).spec.window is None
    assert varlen.explain_varlen(b, b, b, causal=True, window=(7, 0)).spec.window == (7, None)
    assert varlen.explain_varlen(b, b, b, window=(None, 8)).spec.window is None
    assert varlen.explain_varlen(b, b, b, softcap=0).spec.softcap is None


# ------------------------------------------------------------------------------------ key_padding_mask
def _padded(kind: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.ones(3, 10, dtype=torch.bool)
    kpm[0, 7:] = False  # right padding
    kpm[1, :3] = False  # left padding
    if kind == "holes":
        kpm[2, ::3] = False
    else:
        kpm[2, :2] = kpm[2, 9:] = False  # both sides: still one run
    return q, k, v, kpm, torch.randn(4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["runs", "holes"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_key_padding_mask_with_variants(kind: str, variant: str) -> None:
    """With key padding, a window is defined in padded coordinates (as with the padding given as attn_mask); the
    packed route takes the call when that is the same problem — softcap and sinks always, a window when each row's
    real tokens are one run — and the dense masked route otherwise; both give the padded-coordinates answer."""
    q, k, v, kpm, s = _padded(kind)
    kw = {**VARIANTS[variant], "sinks": s if VARIANTS[variant].get("sinks") else None}
    kw["causal"] = True if kw.get("causal") else False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sdpa_flash.attention(q, k, v, key_padding_mask=kpm, **kw)
    plan = sdpa_flash.explain(q, k, v, key_padding_mask=kpm, **kw)
    windowed_holes = kind == "holes" and "window" in kw
    assert isinstance(plan, engine.VarlenPlan) != windowed_holes, plan
    if windowed_holes:
        assert any("padding inside a row" in n for n in plan.notes), plan.notes
    allowed = kpm[:, None, None, :] & torch.ones(10, 10, dtype=torch.bool)
    if kw["causal"]:
        allowed = allowed & torch.ones(10, 10, dtype=torch.bool).tril()
    if kw.get("window") is not None:
        allowed = allowed & window_mask_tensor(tuple(None if x is None or x < 0 else x for x in kw["window"]),
                                               10, 10, q.device)
    ref = reference_attention(q, k, v, attn_mask=allowed, softcap=kw.get("softcap"), sinks=kw.get("sinks"))
    rows = kpm[:, None, :, None]
    torch.testing.assert_close(out, (ref.nan_to_num(0.0) * rows), rtol=1e-10, atol=1e-10)


def test_key_padding_mask_with_fewer_queries_than_keys() -> None:
    """Sq != Sk: every query is real. Softcap and sinks take the packed route; a window, whose corner in padded
    coordinates is Sk - Sq rather than each sequence's L_k - Sq, the dense masked route (explain() says why)."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, 7:] = False
    s = torch.randn(4, generator=g, dtype=torch.float64)
    for kw, packed in (({"softcap": 3.0, "sinks": s}, True), ({"window": (3, 1)}, False)):
        plan = sdpa_flash.explain(q, k, v, key_padding_mask=kpm, **kw)
        assert isinstance(plan, engine.VarlenPlan) == packed, plan
        if not packed:
            assert any("the window with Sq=6 != Sk=10 is defined in padded coordinates" in n for n in plan.notes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = sdpa_flash.attention(q, k, v, key_padding_mask=kpm, **kw)
        allowed = kpm[:, None, None, :]
        if "window" in kw:
            allowed = allowed & window_mask_tensor(kw["window"], 6, 10, q.device)
        ref = reference_attention(q, k, v, attn_mask=allowed, softcap=kw.get("softcap"), sinks=kw.get("sinks"))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_key_padding_mask_layout_sees_runs_and_holes() -> None:
    from sdpa_flash.attention import _mask_layout

    kpm = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert _mask_layout(kpm).contiguous is False and _mask_layout(kpm).lengths == (2, 2, 2, 0)
    assert _mask_layout(kpm[[0, 1, 3]]).contiguous is True
    assert _mask_layout(torch.zeros(2, 0, dtype=torch.bool)).contiguous is True


# ------------------------------------------------------------------------ FA4's packed call (stand-in)
@pytest.fixture
def on_sm90(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """The engine plans for a constructed H100 (with FA4 when the test asks for ``fake_fa4``), and the one packed
    call is the cheapest path (dense groups would run this machine's CPU kernels)."""
    caps = SM90_FA4 if "fake_fa4" in request.fixturenames else SM90
    monkeypatch.setattr(execution, "capabilities", lambda device: caps)
    model = engine.COST_MODELS["cuda"]
    monkeypatch.setitem(engine.COST_MODELS, "cuda", dataclasses.replace(model, call_us=1e9, call_us_bwd=1e9))
    engine.clear_caches()
    yield
    engine.clear_caches()


@pytest.fixture
def fake_fa4(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(fa4_mod, "_module", fa4_fake)
    monkeypatch.setattr(fa4_mod, "installed_version", lambda: "4.0.0b40")
    fa4_fake.CALLS.clear()
    yield fa4_fake


@pytest.fixture
def fake_flash_packed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(flash_mod, "_PACKED_FWD", flash_packed_fake.forward)
    monkeypatch.setattr(flash_mod, "_PACKED_BWD", flash_packed_fake.backward)
    flash_packed_fake.CALLS.clear()
    yield flash_packed_fake


HALF_LQ = [5, 9, 1, 7, 16]
HALF_LK = [6, 9, 3, 7, 2]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cross", [False, True])
def test_fa4_packed_call_gets_the_variants_as_its_own_arguments(fake_fa4: Any, on_sm90: None, variant: str,
                                                                cross: bool) -> None:
    kw = VARIANTS[variant]
    case = Case(HALF_LQ, HALF_LK if cross else HALF_LQ, **kw, hq=4, hkv=2, d=32, dv=32, dtype=torch.bfloat16)
    run_and_check(case, policy="fa4")
    name, call = fake_fa4.CALLS[-1]
    assert name == "flash_attn_varlen_func" and [c for c, _ in fake_fa4.CALLS].count(name) == 1
    window = kw.get("window")
    want = (None, None) if window is None else (window[0], None if kw.get("causal") else window[1])
    assert call["window_size"] == want  # (causal masking caps the right side: FA4 makes it 0 itself)
    assert call["softcap"] == kw.get("softcap", 0.0) and call["sink"] == kw.get("sinks", False)
    assert call["causal"] == bool(kw.get("causal"))


def test_fa4_packed_call_maps_minus_one_per_side(fake_fa4: Any, on_sm90: None) -> None:
    """(-1, 0) is flash-attn 2's 'unbounded left, 0 right': never FA4's empty band (NOTES.md)."""
    run_and_check(Case(HALF_LQ, HALF_LK, window=(-1, 0), hq=4, hkv=2, d=32, dv=32, dtype=torch.bfloat16),
                  policy="fa4")
    assert fake_fa4.CALLS[-1][1]["window_size"] == (None, 0)


# -------------------------------------------------------------------- PyTorch's packed flash op (model)
@pytest.mark.parametrize("variant", ["window", "causal window", "sinks"])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_packed_op_takes_windows_and_sinks(fake_flash_packed: Any, on_sm90: None, variant: str, cross: bool,
                                                dtype: torch.dtype) -> None:
    """The window goes to the op as window_size_left/right (-1 unbounded); sinks by the exact adaptation
    O * sigmoid(lse - sink) and the op's backward with logaddexp(lse, sink): forward, dq/dk/dv and dsinks."""
    kw = VARIANTS[variant]
    if "window" in kw and not flash_mod.packed_window_args():
        pytest.skip("this torch's packed flash op takes no window")
    case = Case(HALF_LQ, HALF_LK if cross else HALF_LQ, **kw, hq=4, hkv=2, d=16, dv=16, dtype=dtype)
    run_and_check(case, policy="flash")
    fwd = [c for n, c in fake_flash_packed.CALLS if n == "forward"]
    assert len(fwd) == 1, fake_flash_packed.CALLS
    left, right = kw.get("window", (None, None))
    want = (-1 if left is None else left, -1 if right is None else right) if "window" in kw else (None, None)
    assert fwd[0]["window"] == want
    if kw.get("sinks"):  # the sinks' backward is the op's own, on the adapted output and log-sum-exp
        assert [n for n, _ in fake_flash_packed.CALLS] == ["forward", "backward"]


def test_flash_packed_sinks_with_both_sink_dtypes_and_window(fake_flash_packed: Any, on_sm90: None) -> None:
    if not flash_mod.packed_window_args():
        pytest.skip("this torch's packed flash op takes no window")
    for sinks_dtype in (torch.float32, torch.bfloat16):
        run_and_check(Case([30, 6, 12, 1], [12, 6, 2, 1], "bottom_right", (3, None), None, True, hq=4, hkv=2, d=16,
                           dv=16, dtype=torch.bfloat16, sinks_dtype=sinks_dtype), policy="flash")


def test_flash_packed_sinks_report_an_unexpected_lse_layout(fake_flash_packed: Any, on_sm90: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def padded_lse(*args: Any, **kw: Any) -> tuple[torch.Tensor, ...]:
        out, lse, *rest = flash_packed_fake.forward(*args, **kw)
        return (out, lse[None], *rest)  # (1, H, T): another layout

    monkeypatch.setattr(flash_mod, "_PACKED_FWD", padded_lse)
    with pytest.raises(sdpa_flash.SdpaFlashError, match=r"log-sum-exp of shape \(1, 4, 38\).*policy='chunked'"):
        run_and_check(Case(HALF_LQ, HALF_LQ, sinks=True, hq=4, hkv=2, d=16, dv=16, dtype=torch.bfloat16),
                      policy="flash")


@pytest.mark.parametrize("variant", ["sinks", "window and sinks", "cross, window and sinks"])
def test_dense_flash_op_adapts_sinks_like_the_packed_one(fake_flash_packed: Any, monkeypatch: pytest.MonkeyPatch,
                                                         variant: str) -> None:
    """attention(sinks=...) on PyTorch's CUDA flash kernel (modelled here): the same op with cu_seqlens None, its
    (B, H, S) log-sum-exp adapted exactly; checked, through a batch of equal sequences, against float64 math of
    each alone: out, dq, dk, dv and dsinks."""
    from sdpa_flash import _dense

    monkeypatch.setattr(_dense, "capabilities", lambda device: SM90)
    # the CUDA kernel function on these CPU tensors (its sinks calls go to the model above)
    monkeypatch.setattr(flash_mod.FlashBackend, "kernel", lambda self, device_type, traced=False: flash_mod._CUDA)
    sdpa_flash._caches.clear_all()
    window = None if variant == "sinks" else (5, 0)
    if window and not flash_mod.packed_window_args():
        pytest.skip("this torch's flash op takes no window")
    lq, lk = ([9] * 3, [14] * 3) if variant.startswith("cross") else ([11] * 3, [11] * 3)
    causal = "bottom_right" if window else None

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Any, cu_k: Any, max_q: int, max_k: int,
              sinks: torch.Tensor | None) -> torch.Tensor:
        b = len(lq)
        qd, kd, vd = (t.unflatten(0, (b, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views
        plan = sdpa_flash.explain(qd, kd, vd, causal=causal or False, window=window, sinks=sinks, policy="flash")
        assert plan.backend == "flash", plan.explain()
        out = sdpa_flash.attention(qd, kd, vd, causal=causal or False, window=window, sinks=sinks, policy="flash")
        return out.transpose(1, 2).flatten(0, 1)

    try:
        run_and_check(Case(lq, lk, causal, window, None, True, hq=4, hkv=2, d=16, dv=16, dtype=torch.bfloat16),
                      run=dense)
    finally:
        sdpa_flash._caches.clear_all()
    fwd = [c for n, c in fake_flash_packed.CALLS if n == "forward"]
    assert len(fwd) == 1 and fwd[0].get("dense"), fake_flash_packed.CALLS
    assert [n for n, _ in fake_flash_packed.CALLS] == ["forward", "backward"]
    with pytest.raises(BackendUnavailableError, match="sinks with dropout_p > 0"):
        q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)
        sdpa_flash.attention(q, q, q, dropout_p=0.1, sinks=torch.zeros(4), policy="flash")


# ------------------------------------------------------------------------------------------------- GPU
def _cuda_lengths(cross: bool) -> tuple[list[int], list[int]]:
    lq = [300, 1, 129, 129, 64, 17, 0, 512, 200, 77, 5, 1000]
    lk = [250, 3, 129, 100, 64, 40, 7, 512, 1, 77, 90, 999] if cross else lq
    return lq, lk


CUDA_VARIANTS = {
    "window": {"window": (48, 16)},
    "causal window": {"window": (63, None), "causal": "bottom_right"},
    "sinks": {"sinks": True},
    "window and sinks": {"window": (31, 0), "causal": "bottom_right", "sinks": True},
}


@pytest.mark.sm80
@pytest.mark.parametrize("variant", list(CUDA_VARIANTS))
@pytest.mark.parametrize("cross", [False, True])
def test_cuda_flash_packed_op_with_variants_equals_per_sequence_attention(variant: str, cross: bool) -> None:
    """The real packed flash op: windows as its own arguments, sinks by the log-sum-exp adaptation, in one call."""
    kw = CUDA_VARIANTS[variant]
    if "window" in kw and not flash_mod.packed_window_args():
        pytest.skip(f"torch {torch.__version__}'s packed flash op takes no window")
    lq, lk = _cuda_lengths(cross)
    with cost_model("cuda", force_packed("cuda", "flash")):
        for dtype in (torch.bfloat16, torch.float16):
            case = Case(lq, lk, **kw, hq=8, hkv=2, d=64, dv=64, dtype=dtype)
            b = varlen.from_cu_seqlens(torch.zeros(sum(lq), 8, 64, device="cuda", dtype=dtype),
                                       varlen.cu_seqlens_from_lengths(lq))
            bk = varlen.from_cu_seqlens(torch.zeros(sum(lk), 2, 64, device="cuda", dtype=dtype),
                                        varlen.cu_seqlens_from_lengths(lk))
            sinks = torch.zeros(8, device="cuda") if kw.get("sinks") else None
            p = varlen.explain_varlen(b, bk, bk, policy="flash", sinks=sinks,
                                      **{k: v for k, v in kw.items() if k != "sinks"})
            assert p.path == "flash_varlen" and p.varlen_backend == "flash", p.explain()
            run_and_check(case, policy="flash", device="cuda")
            run_and_check(dataclasses.replace(case, sinks_dtype=dtype), policy="flash", device="cuda")


@pytest.mark.sm90
@pytest.mark.parametrize("variant", [*CUDA_VARIANTS, "softcap"])
@pytest.mark.parametrize("cross", [False, True])
def test_cuda_fa4_packed_call_with_variants_equals_per_sequence_attention(variant: str, cross: bool) -> None:
    if not sdpa_flash.capabilities("cuda").kernel_version("fa4"):
        pytest.skip("flash-attn-4 is not installed")
    kw = {**CUDA_VARIANTS.get(variant, {}), **({"softcap": 20.0} if variant == "softcap" else {})}
    lq, lk = _cuda_lengths(cross)
    lq, lk = [n for n in lq if n], [m for n, m in zip(lq, lk, strict=True) if n]
    with cost_model("cuda", force_packed("cuda", "fa4")):
        for dtype in (torch.bfloat16, torch.float16):
            run_and_check(Case(lq, lk, **kw, hq=8, hkv=2, d=64, dv=64, dtype=dtype), policy="fa4", device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_grouped_route_with_variants_equals_per_sequence_attention(variant: str) -> None:
    """The grouped route on the GPU: per-sequence groups and one padded group (dense kernels that do the variants:
    FA4 where installed, else chunked or math)."""
    kw = VARIANTS[variant]
    lq, lk = _cuda_lengths(True)
    no_packed = dataclasses.replace(engine.COST_MODELS["cuda"], varlen_call_us=1e9, varlen_call_us_bwd=1e9,
                                    varlen_kernels=())
    for model in (dataclasses.replace(no_packed, max_group_span=1),
                  dataclasses.replace(no_packed, padding="mask", call_us=1e9, call_us_bwd=1e9)):
        with cost_model("cuda", model):
            run_and_check(Case(lq, lk, **kw, hq=4, hkv=2, d=64, dv=64, dtype=torch.bfloat16), device="cuda")
