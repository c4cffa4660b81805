"""Sliding windows, logit softcap and attention sinks as arguments of attention() (issue #25, dense calls).

Each variant is backend data (``Requirements.window / softcap / sinks``): chunked does all three exactly (skipped
tiles, tanh, one more softmax column), math takes a window as a mask, FA4 takes all three as its own arguments,
and the fused SDPA kernels are refused with the reason. Accuracy: the tolerance rule of ``sdpa_flash.testing``
against the float64 reference, with the same-dtype reference's own error as the yardstick, forward and backward
(the sinks' gradient included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import fa4_fake  # tests/ is on sys.path (pytest rootdir-relative imports)
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sdpa_flash
from sdpa_flash import AttentionInputError, AttentionSpec, BackendUnavailableError, Capabilities, plan
from sdpa_flash.backends import chunked as chunked_mod
from sdpa_flash.backends import fa4 as fa4_mod
from sdpa_flash.backends.flash import packed_window_args as flash_packed_window_args
from sdpa_flash.testing import compare_to_reference, property_profile, reference_attention

PROFILE = property_profile()


@contextlib.contextmanager
def _tiles(bq: int, bk: int) -> Iterator[None]:
    saved = chunked_mod._block_sizes
    chunked_mod._block_sizes = lambda *_: (bq, bk)  # type: ignore[assignment]  # small tiles: edges inside the call
    try:
        yield
    finally:
        chunked_mod._block_sizes = saved


def _inputs(b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dtype: torch.dtype, sinks: bool, seed: int = 0,
            device: str = "cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    s = torch.randn(hq, generator=g, dtype=torch.float64) * 2 if sinks else None
    out = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    if s is not None:
        out.append(s.to(device=device, dtype=torch.float32).requires_grad_())  # float32, as FA4 and gpt-oss keep them
    return tuple(out)


def _check(policy: str, b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dtype: torch.dtype, causal: Any,
           window: Any, softcap: Any, sinks: bool, seed: int = 0, device: str = "cpu") -> None:
    """attention() under ``policy`` against the float64 reference by the tolerance rule, forward and backward."""
    leaves = _inputs(b, hq, hkv, sq, sk, d, dtype, sinks, seed, device)
    q, k, v = leaves[:3]
    s = leaves[3] if sinks else None
    kw = dict(causal=causal, window=window, softcap=softcap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning: no fused kernel does these on the CPU
        out = sdpa_flash.attention(q, k, v, sinks=s, policy=policy, **kw)
    same = reference_attention(q, k, v, sinks=s, dtype=None, **kw)
    ref = reference_attention(q, k, v, sinks=s, dtype=torch.float64, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    names = ("out", "dq", "dk", "dv", "dsinks")[:len(leaves) + 1]
    got = (out, *torch.autograd.grad(out, leaves, grad.to(out.dtype)))
    want_same = (same, *torch.autograd.grad(same, leaves, grad.to(same.dtype)))
    want = (ref, *torch.autograd.grad(ref, leaves, grad))
    mags, smags = _floor_magnitudes(q, k, v, causal, window, ref, grad)
    for i, (name, c, sd, r) in enumerate(zip(names, got, want_same, want, strict=True)):
        m = (mags[i], smags[i]) if i < 4 else (None, None)  # (the sinks' sum over rows: the plain floor)
        comparison = compare_to_reference(c, sd, r, name=name, magnitude=m[0], score_magnitude=m[1],
                                          reduction=max(sk, sq, d))
        assert comparison.passed, f"{policy} {name}: {comparison}"


def _floor_magnitudes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: Any, window: Any,
                      out64: torch.Tensor, grad: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
    """The tolerance rule's floor magnitudes (``M``, ``Ms``) of out, dq, dk and dv, as sdpa_flash.testing works
    them out for a masked problem: the window as the boolean mask it stands for. (Softcap only shrinks the scores
    and a sink only takes weight away, so the plain problem's magnitudes bound theirs.)"""
    from sdpa_flash.spec import window_mask_tensor
    from sdpa_flash.testing import ProblemParams
    from sdpa_flash.testing._problems import AttentionProblem, _magnitudes

    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    mask = None
    if window is not None:
        left, right = window
        mask = window_mask_tensor((left, right), sq, sk, q.device)
    params = ProblemParams(q.dtype, b, hq, hkv, sq, sk, d, v.shape[-1], causal=causal or False, backward=True,
                           mask="bool" if mask is not None else "none")
    problem = AttentionProblem(params, q.device, q.detach(), k.detach(), v.detach(), mask, grad)
    return _magnitudes(problem, out64.detach(), True)


# ------------------------------------------------------------------------------------------------ accuracy
@settings(max_examples=PROFILE.max_examples, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 40),
                    st.integers(1, 40), st.sampled_from([8, 16])),
    causal=st.sampled_from([False, "bottom_right"]),
    window=st.none() | st.tuples(st.none() | st.integers(0, 24), st.none() | st.integers(0, 24)),
    softcap=st.none() | st.sampled_from([1.0, 5.0]),
    sinks=st.booleans(),
    tiles=st.sampled_from([(8, 8), (16, 8), (1024, 1024)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_chunked_variants_match_the_float64_reference(shape: Any, causal: Any, window: Any, softcap: Any,
                                                      sinks: bool, tiles: tuple[int, int],
                                                      dtype: torch.dtype) -> None:
    b, (hq, hkv), sq, sk, d = shape
    if causal and sq > sk and window is None and not sinks:
        causal = False  # (rows that see no key are covered below; here every row sees one)
    with _tiles(*tiles):
        _check("chunked", b, hq, hkv, sq, sk, d, dtype, causal, window, softcap, sinks)


@pytest.mark.parametrize("sinks", [False, True])
def test_rows_that_the_window_leaves_empty(sinks: bool) -> None:
    """Sq > Sk, bottom-right: the first queries see no key at all (output 0; with sinks all weight on the sink)."""
    with _tiles(8, 8):
        _check("chunked", 1, 2, 1, 30, 12, 8, torch.float64, "bottom_right", (3, None), None, sinks)
    q, k, v = (t.detach() for t in _inputs(1, 2, 1, 30, 12, 8, torch.float64, False)[:3])
    out = sdpa_flash.attention(q, k, v, causal="bottom_right", window=(3, None), policy="chunked")
    assert out[:, :, :18].abs().max() == 0  # query i's own position is key i - 18


@pytest.mark.parametrize(("window", "causal"), [((4, 2), False), ((6, 0), "bottom_right"), ((0, 0), False)])
def test_math_takes_a_window_as_a_mask(window: Any, causal: Any) -> None:
    _check("math", 2, 4, 2, 20, 27, 8, torch.float32, causal, window, None, False)
    q = torch.randn(1, 2, 20, 8)
    plan = sdpa_flash.explain(q, q, q, window=window, causal=causal, policy="math")
    assert any("window" in n and "boolean mask" in n for n in plan.notes), plan.notes


# ------------------------------------------------------------------------------------------- decisions
def test_each_backend_says_native_adapted_or_refused() -> None:
    q = torch.randn(1, 2, 32, 16)
    s = torch.zeros(2)
    table = {}
    for variant, kw in (("window", {"window": (4, 0)}), ("softcap", {"softcap": 5.0}), ("sinks", {"sinks": s})):
        plan = sdpa_flash.explain(q, q, q, **kw)
        table[variant] = {name: why[0] for name, why in plan.reasons.items()}
        table[variant][plan.backend] = "runs"
    assert "fused kernel is never given" in table["window"]["flash"]
    assert "logit softcap" in table["softcap"]["math"] and "logit softcap" in table["softcap"]["flash"]
    assert "attention sinks" in table["sinks"]["math"]
    for variant in table:
        assert table[variant].get("chunked") == "runs" or variant == "window"
    assert sdpa_flash.explain(q, q, q, window=(4, 0)).backend == "math"  # ranked above chunked on the CPU


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
def test_gpt_oss_layers_without_fa4_plan_onto_the_cuda_flash_kernel(cc: tuple[int, int]) -> None:
    """An A100, or an H100 without the [fa4] extra: a gpt-oss layer (GQA 64/8, hd64, sinks, a window on every
    other layer) is planned onto PyTorch's flash kernel, the sinks adapted from its log-sum-exp and the window its
    own, not onto chunked; softcap (no SDPA kernel has it) runs on FlexAttention, ranked after them, said so."""
    caps = Capabilities.synthetic("cuda", cc)
    for window in ((127, None), None):
        if window is not None and not flash_packed_window_args():
            continue  # (this torch's flash ops take no window: refused with that reason, tested elsewhere)
        spec = AttentionSpec("cuda", torch.bfloat16, 1, 64, 8, 8192, 8192, 64, 64, "top_left", needs_grad=True,
                             window=window, sinks=True)
        p = plan(spec, caps)
        assert p.backend == "flash" and not p.fallback and p.prep.window_mask is None, p.explain()
        try:  # with dropout: refused with the reason (and nothing else may take it: then a typed error)
            reasons = plan(dataclasses.replace(spec, dropout=True), caps).reasons
        except BackendUnavailableError as exc:
            reasons = exc.reasons
        assert "sinks with dropout_p > 0" in reasons["flash"][0]
    soft = plan(AttentionSpec("cuda", torch.bfloat16, 2, 16, 16, 8192, 8192, 128, 128, "top_left", softcap=50.0),
                caps)
    assert soft.backend == "flex" and not soft.fallback and "logit softcap" in soft.reasons["flash"][0]
    assert soft.order.index("flex") == soft.order.index("math") - 1, soft.order  # after every fused SDPA kernel


def test_a_window_that_covers_every_key_is_a_plain_call() -> None:
    q = torch.randn(1, 2, 16, 8)
    plain = sdpa_flash.explain(q, q, q, causal=True)
    for window in ((15, 0), (None, 3), (100, -1), (-1, -1)):
        plan = sdpa_flash.explain(q, q, q, causal=True, window=window)
        assert plan.backend == plain.backend and plan.spec.window is None, (window, plan)
    assert sdpa_flash.explain(q, q, q, window=(14, None)).spec.window == (14, None)
    torch.testing.assert_close(sdpa_flash.attention(q, q, q, causal=True, window=(15, 0)),
                               sdpa_flash.attention(q, q, q, causal=True), rtol=0, atol=0)


def test_softcap_zero_is_off() -> None:
    q = torch.randn(1, 2, 16, 8)
    assert sdpa_flash.explain(q, q, q, softcap=0).spec.softcap is None


@pytest.mark.parametrize(("kw", "match"), [
    ({"window": 4}, r"window to be None or \(left, right\)"),
    ({"window": (1, 2, 3)}, r"window to be None or \(left, right\)"),
    ({"window": (1.5, 0)}, r"window to be None or \(left, right\)"),
    ({"window": (True, 0)}, r"window to be None or \(left, right\)"),
    ({"window": (4, 0), "causal": True}, r"causal='top_left'.*pass causal='bottom_right'"),
    ({"softcap": -1.0}, r"softcap to be None or a finite float >= 0"),
    ({"softcap": float("inf")}, r"softcap to be None or a finite float >= 0"),
    ({"softcap": True}, r"softcap to be None or a finite float >= 0"),
    ({"sinks": torch.zeros(3)}, r"sinks to be a floating-point tensor of shape \(Hq,\) = \(4,\)"),
    ({"sinks": torch.zeros(4, dtype=torch.int64)}, r"sinks to be a floating-point tensor"),
    ({"sinks": [0.0] * 4}, r"sinks to be None or a torch\.Tensor"),
])
def test_bad_variant_arguments_raise_before_any_kernel(kw: dict[str, Any], match: str) -> None:
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 4, 12, 16)
    with pytest.raises(AttentionInputError, match=match):
        sdpa_flash.attention(q, k, k, **kw)
    with pytest.raises(AttentionInputError, match=match):
        sdpa_flash.explain(q, k, k, **kw)


@pytest.mark.parametrize("left_padding", [False, True])
def test_key_padding_with_variants_equals_the_dense_masked_call(left_padding: bool) -> None:
    """With Sq == Sk and each row's real tokens one run, a window and causal masking depend on j - i only, so the
    packed route (which takes the variants) computes what the dense call with the padding as a mask does, padded
    query rows zero; each sequence as if alone. (Other paddings: tests/test_varlen_variants.py.)"""
    q, k, v, s = (t.detach() for t in _inputs(2, 4, 2, 12, 12, 8, torch.float64, True))
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, :4] = False if left_padding else True
    kpm[1, 8:] = True if left_padding else False
    kw = dict(causal=True, window=(3, 0), softcap=4.0, sinks=s, policy="chunked")
    out = sdpa_flash.attention(q, k, v, key_padding_mask=kpm, **kw)
    dense = sdpa_flash.attention(q, k, v, attn_mask=kpm[:, None, None, :], **kw)
    torch.testing.assert_close(out, dense * kpm[:, None, :, None], rtol=1e-12, atol=1e-12)
    real = kpm[1]  # one sequence alone, packed by hand: the same rows
    alone = sdpa_flash.attention(q[1:, :, real], k[1:, :, real], v[1:, :, real], **kw)
    torch.testing.assert_close(out[1:, :, real], alone, rtol=1e-12, atol=1e-12)
    plan = sdpa_flash.explain(q, k, v, key_padding_mask=kpm, **kw)
    assert plan.spec.window == (3, None) and plan.spec.softcap == 4.0 and plan.spec.sinks, plan  # the varlen plan


@pytest.mark.parametrize("policy", ["math", None])
def test_math_takes_a_square_causal_window_as_one_mask(policy: Any) -> None:
    """Sq == Sk: causal would be the kernel's own flag, but the math op takes no flag with a mask, so the causal
    corner joins the window's mask."""
    _check("math", 1, 2, 2, 16, 16, 8, torch.float64, True, (3, 0), None, False)
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sdpa_flash.attention(q, q, q, causal=True, window=(3, 0), policy=policy)
    torch.testing.assert_close(out, reference_attention(q, q, q, causal=True, window=(3, 0)), rtol=1e-12,
                               atol=1e-12)
    plan = sdpa_flash.explain(q, q, q, causal=True, window=(3, 0), policy=policy)
    assert plan.backend == "math" and any("causal materialised" in n for n in plan.notes), plan.notes


def test_other_libraries_spellings_name_ours() -> None:
    q = torch.randn(1, 2, 8, 8)
    for spelling, ours in (("window_size", "window="), ("sliding_window", "window="), ("s_aux", "sinks="),
                           ("learnable_sink", "sinks="), ("logit_softcap", "softcap=")):
        with pytest.raises(AttentionInputError, match=ours):
            sdpa_flash.attention(q, q, q, **{spelling: 1})


def test_fused_policy_refuses_a_window_with_the_reason() -> None:
    q = torch.randn(1, 2, 32, 16)
    with pytest.raises(BackendUnavailableError, match="never given an O"):
        sdpa_flash.attention(q, q, q, window=(4, 0), policy="flash")


def test_list_window_and_cached_calls_agree() -> None:
    q = torch.randn(1, 2, 24, 8)
    first = sdpa_flash.attention(q, q, q, window=[3, 1], policy="chunked")
    again = sdpa_flash.attention(q, q, q, window=(3, 1), policy="chunked")
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    other = sdpa_flash.attention(q, q, q, window=(3, 2), policy="chunked")
    assert (other - first).abs().max() > 0  # the window is part of the per-call cache key


def test_torch_compile_traces_the_variants() -> None:
    import torch._dynamo

    q, k, v, s = (t.detach() for t in _inputs(1, 2, 2, 20, 20, 8, torch.float32, True))

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, k, v, causal=True, window=(5, 0), softcap=4.0, sinks=s, policy="chunked")

    torch._dynamo.reset()
    eager = fn(q, k, v, s)
    compiled = torch.compile(fn, backend="eager", fullgraph=True)(q, k, v, s)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ FA4 (stand-in)
@pytest.fixture
def fake_fa4(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(fa4_mod, "_module", fa4_fake)
    monkeypatch.setattr(fa4_mod, "installed_version", lambda: "4.0.0b40")
    fa4_fake.CALLS.clear()
    yield fa4_fake


def _fa4_run(window: Any, softcap: Any, sinks: bool, causal: bool) -> tuple[Any, ...]:
    from sdpa_flash import Capabilities, plan
    from sdpa_flash.backends import BACKENDS
    from sdpa_flash.policy import resolve_policy

    caps = Capabilities.synthetic("cuda", (9, 0), kernels={"fa4": "4.0.0b40"})
    leaves = _inputs(1, 4, 2, 24, 24, 32, torch.bfloat16, sinks)  # (head dim 32: FA4's sm90 backward is right there)
    q, k, v = leaves[:3]
    spec = sdpa_flash.AttentionSpec("cuda", torch.bfloat16, 1, 4, 2, 24, 24, 32, 32, "top_left" if causal else None,
                                    needs_grad=True, window=window, softcap=softcap, sinks=sinks)
    p = plan(spec, caps, resolve_policy("fa4"))
    run = BACKENDS["fa4"].runner(spec, p.prep)
    out = run(q, k, v, None, 0.0, None, *leaves[3:])
    return out, leaves


@pytest.mark.parametrize(("window", "softcap", "sinks", "causal"), [
    ((6, 2), None, False, False), ((6, None), 8.0, False, True), (None, None, True, False), ((5, 0), 3.0, True, True),
])
def test_fa4_gets_window_softcap_and_sinks_as_its_own_arguments(fake_fa4: Any, window: Any, softcap: Any,
                                                                sinks: bool, causal: bool) -> None:
    out, leaves = _fa4_run(window, softcap, sinks, causal)
    name, call = fake_fa4.CALLS[-1]
    assert name == "_flash_attn_fwd" and call["causal"] == causal and call["sink"] == sinks
    assert call["window"] == (window if window is not None else (None, None))
    assert call["softcap"] == (softcap or 0.0)
    q, k, v = leaves[:3]
    s = leaves[3] if sinks else None
    kw = dict(causal=causal, window=window, softcap=softcap)
    same = reference_attention(q, k, v, sinks=s, dtype=None, **kw)
    ref = reference_attention(q, k, v, sinks=s, **kw)
    comparison = compare_to_reference(out, same, ref, reduction=24)
    assert comparison.passed, str(comparison)
    if sinks:  # the sinks' gradient is FA4's backward's (here the stand-in's), through our one autograd node
        (g,) = torch.autograd.grad(out.float().sum(), [leaves[3]])
        (g_same,) = torch.autograd.grad(same.float().sum(), [leaves[3]])
        (g_ref,) = torch.autograd.grad(ref.sum(), [leaves[3]])
        comparison = compare_to_reference(g, g_same, g_ref, name="dsinks", dtype=torch.bfloat16)
        assert comparison.passed, str(comparison)


def test_fa4_custom_op_takes_the_sink_and_gives_its_gradient(fake_fa4: Any) -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 16, 2, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    sink = torch.randn(2, requires_grad=True)
    out, _ = fa4_mod.fa4_fwd(q, k, v, None, True, 4, -1, 0.0, sink)
    (dsink,) = torch.autograd.grad(out.float().sum(), [sink])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    s64 = sink.detach().double().requires_grad_()
    ref = reference_attention(*(t.transpose(1, 2) for t in leaves), causal="bottom_right", window=(4, None),
                              sinks=s64).transpose(1, 2)
    (dref,) = torch.autograd.grad(ref.sum(), [s64])
    s_same = sink.detach().clone().requires_grad_()
    same = reference_attention(*(t.detach().transpose(1, 2) for t in (q, k, v)), causal="bottom_right",
                               window=(4, None), sinks=s_same, dtype=None)
    (dsame,) = torch.autograd.grad(same.float().sum(), [s_same])
    comparison = compare_to_reference(dsink, dsame, dref, name="dsinks", dtype=torch.bfloat16)
    assert comparison.passed, str(comparison)


def test_a_layer_that_must_see_the_call_gets_the_window_as_a_mask() -> None:
    """Under a torch function mode the call goes through F.scaled_dot_product_attention, which has no window: the
    window arrives as a mask there; softcap and sinks, which no mask expresses, are refused with the reason."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.sdpa = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.nn.functional.scaled_dot_product_attention:
                self.sdpa += 1
            return func(*args, **(kwargs or {}))

    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 16, 16, 8, torch.float64, False))
    want = reference_attention(q, k, v, causal=True, window=(3, 0))
    with Seen() as mode:
        out = sdpa_flash.attention(q, k, v, causal=True, window=(3, 0))
        assert mode.sdpa == 1
        with pytest.raises(BackendUnavailableError, match="no softcap or attention sinks"):
            sdpa_flash.attention(q, k, v, softcap=3.0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- CUDA flash windows
def test_cuda_flash_takes_the_window_itself_where_torch_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without FA4 a windowed call on Hopper runs on FlashAttention-2's own window (cuDNN and efficient are refused
    with the reason); a torch whose flash ops lack window_size_left/right says so instead."""
    from sdpa_flash import Capabilities
    from sdpa_flash._validate import attention_spec
    from sdpa_flash.backends import flash as flash_mod
    from sdpa_flash.planner import plan

    caps = Capabilities.synthetic("cuda", (9, 0))
    q = torch.empty(2, 8, 1024, 64, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(2, 2, 1024, 64, dtype=torch.bfloat16, device="meta")
    spec = dataclasses.replace(attention_spec(q, kv, kv, None, True, 0.0, None, "bhsd", (127, 0)), device_type="cuda")
    p = plan(spec, caps)
    assert p.backend == "flash" and not p.fallback and p.prep.window_mask is None, p.explain()
    assert "sliding window" in p.reasons["cudnn"][0]
    monkeypatch.setattr(flash_mod, "packed_window_args", lambda: False)
    plan.cache_clear()  # type: ignore[attr-defined]  # functools' cache API on the public wrapper
    try:
        p = plan(spec, caps)
        assert p.backend != "flash" and "take no window_size_left/right" in p.reasons["flash"][0], p.explain()
    finally:
        monkeypatch.undo()
        plan.cache_clear()  # type: ignore[attr-defined]  # (the same)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_flash_window_matches_float64_math(causal: bool) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the CUDA flash kernel needs sm80+")
    window = (37, 0) if causal else (37, 11)
    leaves = _inputs(2, 8, 2, 300, 300, 64, torch.bfloat16, False, device="cuda")
    plan = sdpa_flash.explain(*leaves, causal=causal, window=window, policy="flash")
    assert plan.prep.window_mask is None  # the kernel's own window, no mask
    _check("flash", 2, 8, 2, 300, 300, 64, torch.bfloat16, causal, window, None, False, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("causal", "window", "sk"), [(False, None, 300), ("bottom_right", (63, 0), 300),
                                                     ("bottom_right", None, 420)])
def test_cuda_flash_sinks_match_float64_math(causal: Any, window: Any, sk: int) -> None:
    """Sinks on PyTorch's dense CUDA flash kernel: its log-sum-exp adapted exactly (out, dq, dk, dv, dsinks)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the CUDA flash kernel needs sm80+")
    if window is not None and not flash_packed_window_args():
        pytest.skip("this torch's flash op takes no window")
    leaves = _inputs(2, 8, 2, 300, sk, 64, torch.bfloat16, True, device="cuda")
    assert sdpa_flash.explain(*leaves[:3], causal=causal, window=window, sinks=leaves[3]).backend in ("flash", "fa4")
    _check("flash", 2, 8, 2, 300, sk, 64, torch.bfloat16, causal, window, None, True, device="cuda")


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_warmup_takes_the_variants_a_model_uses(varlen: bool) -> None:
    """A window, softcap or sinks is a configuration of its own for the kernels that take them (FA4 compiles each,
    FlexAttention too): warmup() runs them as the model will, and its log line names them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the CPU's softcap fallback warning)
        res = sdpa_flash.warmup(heads=4, kv_heads=2, head_dim=16, seqlen=24, causal=True, dtype=torch.float32,
                                device="cpu", window=(7, 0), softcap=5.0, sinks=True, varlen=varlen)
    assert res.backend == "chunked"  # softcap and sinks on the CPU
    assert "causal=True, window=(7, 0), softcap=5.0, sinks=yes, training" in str(res)
