"""``sdpa_flash.attention()`` on the CPU against the float64 math reference, forward and backward.

Every comparison uses the library's own tolerance rule (``sdpa_flash.testing.assert_close_to_reference``): the
candidate may be at most ``K`` times as far from the float64 reference as PyTorch's math backend is when it
runs in the candidate's dtype. ``out``, ``dq``, ``dk`` and ``dv`` are compared with one upstream gradient.

Fully-masked query rows (``causal="bottom_right"`` with ``Sq > Sk`` leaves the first ``Sq - Sk`` rows without
any key; a mask can do the same to any row) have no defined output yet, so they are left out of the comparison:
only rows that see at least one key are compared, and the upstream gradient of the other rows is zero, so they
cannot feed anything into ``dk``/``dv`` either.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import pytest
import torch

import sdpa_flash
from sdpa_flash.testing import assert_close_to_reference, reference_attention

B, D = 2, 16

DTYPES = {"f32": torch.float32, "f64": torch.float64}
POLICIES = ("auto", "math")
CAUSALS = {"noncausal": False, "causal": True, "bottomright": "bottom_right"}
HEADS = {"mha4x4": (4, 4), "gqa4x2": (4, 2), "mqa4x1": (4, 1)}
SEQLENS = {"s32x32": (32, 32), "s24x40": (24, 40), "s40x24": (40, 24)}
LAYOUTS = ("bhsd", "bshd")
MASKS = ("nomask", "boolmask", "floatmask")
SCALES = {"scaledefault": None, "scale0.3": 0.3}


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float32
    policy: str = "auto"
    causal: bool | str = False
    heads: tuple[int, int] = (4, 4)
    seqlens: tuple[int, int] = (32, 32)
    layout: str = "bhsd"
    mask: str = "nomask"
    scale: float | None = None
    dv: int = D
    seed: int = 0


def _make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(case.seed)
    hq, hkv = case.heads
    sq, sk = case.seqlens

    def shape(h: int, s: int, d: int) -> tuple[int, ...]:
        return (B, h, s, d) if case.layout == "bhsd" else (B, s, h, d)

    q = torch.randn(shape(hq, sq, D), generator=gen, dtype=case.dtype)
    k = torch.randn(shape(hkv, sk, D), generator=gen, dtype=case.dtype)
    v = torch.randn(shape(hkv, sk, case.dv), generator=gen, dtype=case.dtype)
    mask: torch.Tensor | None = None
    if case.mask == "boolmask":  # True = attend, keep-probability 0.8
        mask = torch.rand(B, 1, sq, sk, generator=gen) < 0.8
    elif case.mask == "floatmask":  # additive bias in the input dtype, with some -inf (masked) entries
        bias = torch.randn(sq, sk, generator=gen, dtype=case.dtype) * 0.5
        mask = bias.masked_fill(torch.rand(sq, sk, generator=gen) < 0.2, float("-inf"))
    return q, k, v, mask


def _allowed(case: Case, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Hq, Sq, Sk) boolean: which keys each query may see, computed independently of the library."""
    hq, _ = case.heads
    sq, sk = case.seqlens
    allowed = torch.ones(B, hq, sq, sk, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask != float("-inf"))
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(sk).unsqueeze(0)
    if case.causal is True:
        allowed = allowed & (j <= i)
    elif case.causal == "bottom_right":
        allowed = allowed & (j <= i + sk - sq)
    return allowed


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def _forward_backward(fn, leaves, grad_out):  # type: ignore[no-untyped-def]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def check_case(case: Case) -> None:
    """Run ``attention()`` forward + backward for ``case`` and compare with the float64 reference."""
    q, k, v, mask = _make_inputs(case)
    kwargs = {"attn_mask": mask, "causal": case.causal, "scale": case.scale, "layout": case.layout}

    # Rows that see at least one key; the others are excluded (their output is not defined yet).
    visible = _allowed(case, mask).any(-1)  # (B, Hq, Sq)

    hq, _ = case.heads
    sq, _ = case.seqlens
    out_shape_bhsd = (B, hq, sq, case.dv)
    gen = torch.Generator().manual_seed(case.seed + 1)
    grad_bhsd = torch.randn(out_shape_bhsd, generator=gen, dtype=torch.float64)
    grad_bhsd = grad_bhsd * visible.unsqueeze(-1)  # no gradient flows from the excluded rows
    grad_out = _bhsd(grad_bhsd, case.layout)

    def leaves(dtype: torch.dtype) -> list[torch.Tensor]:
        return [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]

    cand = _forward_backward(
        lambda *t: sdpa_flash.attention(*t, policy=case.policy, **kwargs), leaves(case.dtype), grad_out
    )
    same = _forward_backward(
        lambda *t: reference_attention(*t, dtype=None, **kwargs), leaves(case.dtype), grad_out
    )
    ref64 = _forward_backward(lambda *t: reference_attention(*t, **kwargs), leaves(torch.float64), grad_out)

    out = cand[0]
    assert out.dtype == case.dtype
    assert tuple(_bhsd(out, case.layout).shape) == out_shape_bhsd
    for g, t in zip(cand[1:], (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == case.dtype

    def select(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        o, dq, dk, dv = tensors
        return [_bhsd(o, case.layout)[visible], _bhsd(dq, case.layout)[visible], dk, dv]

    assert_close_to_reference(select(cand), select(same), select(ref64))


# --------------------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("seqlens", SEQLENS.values(), ids=SEQLENS.keys())
@pytest.mark.parametrize("causal", CAUSALS.values(), ids=CAUSALS.keys())
def test_reference_matches_naive_softmax(causal: bool | str, seqlens: tuple[int, int]) -> None:
    """reference_attention is what the rest of this file trusts: check it against a naive float64 formula."""
    case = Case(causal=causal, seqlens=seqlens, heads=(4, 2), mask="boolmask", scale=0.3, dtype=torch.float64)
    q, k, v, mask = _make_inputs(case)
    allowed = _allowed(case, mask)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kr.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    visible = allowed.any(-1)
    expected = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ vr
    got = reference_attention(q, k, v, attn_mask=mask, causal=causal, scale=0.3)
    torch.testing.assert_close(got[visible], expected[visible], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ parametrized grids
@pytest.mark.parametrize("seqlens", SEQLENS.values(), ids=SEQLENS.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("causal", CAUSALS.values(), ids=CAUSALS.keys())
@pytest.mark.parametrize("policy", POLICIES)
def test_causal_heads_seqlens(policy: str, causal: bool | str, heads: tuple[int, int],
                              seqlens: tuple[int, int]) -> None:
    check_case(Case(policy=policy, causal=causal, heads=heads, seqlens=seqlens))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dtype_policy_layout(dtype: torch.dtype, policy: str, layout: str) -> None:
    check_case(Case(dtype=dtype, policy=policy, layout=layout, causal=True, heads=(4, 2), seqlens=(24, 40),
                    mask="boolmask", seed=1))


@pytest.mark.parametrize("scale", SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize("causal", CAUSALS.values(), ids=CAUSALS.keys())
@pytest.mark.parametrize("mask", MASKS)
def test_mask_causal_scale(mask: str, causal: bool | str, scale: float | None) -> None:
    check_case(Case(mask=mask, causal=causal, scale=scale, heads=(4, 1), seqlens=(40, 24), seed=2))


def _sweep(n: int, seed: int) -> list[pytest.param]:
    rng = random.Random(seed)
    params = []
    for i in range(n):
        dk, pol, ck, hk, sk, lay, mk, sck = (
            rng.choice(list(DTYPES)), rng.choice(POLICIES), rng.choice(list(CAUSALS)), rng.choice(list(HEADS)),
            rng.choice(list(SEQLENS)), rng.choice(LAYOUTS), rng.choice(MASKS), rng.choice(list(SCALES)),
        )
        case = Case(dtype=DTYPES[dk], policy=pol, causal=CAUSALS[ck], heads=HEADS[hk], seqlens=SEQLENS[sk],
                    layout=lay, mask=mk, scale=SCALES[sck], seed=100 + i)
        params.append(pytest.param(case, id=f"{i:03d}-{dk}-{pol}-{ck}-{hk}-{sk}-{lay}-{mk}-{sck}"))
    return params


@pytest.mark.parametrize("case", _sweep(150, seed=20260521))
def test_random_sweep(case: Case) -> None:
    check_case(case)


# ------------------------------------------------------------------------------------ value head dim
def test_value_head_dim_differs_under_math() -> None:
    check_case(Case(policy="math", dv=8, heads=(4, 2), seqlens=(24, 40), causal="bottom_right", mask="floatmask"))


def test_value_head_dim_differs_under_auto_falls_back_to_math() -> None:
    q, k, v, _ = _make_inputs(Case(dv=8, seqlens=(16, 16)))
    p = sdpa_flash.explain(q, k, v)
    assert p.backend == "math" and p.fallback
    assert "value head_dim=8 differs" in p.reasons["flash"][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sdpa_flash.attention(q, k, v)
    assert out.shape == (B, 4, 16, 8)
    assert any("fell back" in str(w.message) for w in caught)
    torch.testing.assert_close(out, reference_attention(q, k, v, dtype=None))


# ------------------------------------------------------------------------------------------- explain
@pytest.mark.parametrize("causal", CAUSALS.values(), ids=CAUSALS.keys())
@pytest.mark.parametrize("policy, backend", [("auto", "flash"), ("math", "math")], ids=["auto", "math"])
def test_explain_backend_on_cpu(policy: str, backend: str, causal: bool | str) -> None:
    q, k, v, mask = _make_inputs(Case(heads=(4, 2), seqlens=(24, 40), mask="boolmask"))
    p = sdpa_flash.explain(q, k, v, attn_mask=mask, causal=causal, policy=policy)
    assert isinstance(p, sdpa_flash.Plan)
    assert p.backend == backend
    assert p.route == "direct"
    assert not p.fallback
    assert p.spec.device_type == "cpu" and p.spec.heads_q == 4 and p.spec.heads_kv == 2


# ------------------------------------------------------------------------------------------- dropout
def _qkv(b: int = 2, hq: int = 4, hkv: int = 4, sq: int = 8, sk: int = 8, d: int = D, dv: int = D,
         dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, dv, generator=gen, dtype=dtype))


def test_dropout_under_auto_runs_math_and_warns_once() -> None:
    q, k, v = _qkv(hq=4, hkv=2, sq=11, sk=19)  # a shape no other test uses: the warning is new; >= 16 keys: not
    # the denylist (pytorch/pytorch#141128) but dropout is the reason
    p = sdpa_flash.explain(q, k, v, dropout_p=0.5)
    assert p.backend == "math" and p.fallback
    assert p.reasons["flash"] == ("dropout_p > 0 is not supported",)
    outs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            outs.append(sdpa_flash.attention(q, k, v, dropout_p=0.5))
    fell_back = [w for w in caught if "fell back" in str(w.message)]
    assert len(fell_back) == 1, [str(w.message) for w in caught]
    assert issubclass(fell_back[0].category, UserWarning)
    assert "math" in str(fell_back[0].message)
    no_dropout = sdpa_flash.attention(q, k, v)
    for out in outs:
        assert out.shape == no_dropout.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, no_dropout)  # dropout was applied


def test_dropout_backward_runs_under_auto() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(sq=9, sk=9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sdpa_flash.attention(q, k, v, dropout_p=0.3, causal=True)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dropout_under_flash_policy_raises(layout: str) -> None:
    q, k, v = _qkv()
    with pytest.raises(sdpa_flash.BackendUnavailableError, match="dropout_p > 0 is not supported") as info:
        sdpa_flash.attention(q, k, v, dropout_p=0.1, policy="flash", layout=layout)
    assert set(info.value.reasons) == {"flash"}
    with pytest.raises(sdpa_flash.BackendUnavailableError):
        sdpa_flash.explain(q, k, v, dropout_p=0.1, policy="flash", layout=layout)


# ------------------------------------------------------------------------------------- zero-size inputs
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_batch_returns_empty(layout: str, policy: str) -> None:
    q, k, v = _qkv(b=0, sq=8, sk=6, dv=12)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = sdpa_flash.attention(q, k, v, causal=True, layout=layout, policy=policy)
    assert out.shape == ((0, 4, 8, 12) if layout == "bhsd" else (0, 8, 4, 12))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("causal", CAUSALS.values(), ids=CAUSALS.keys())
def test_zero_keys_returns_zeros(causal: bool | str, policy: str) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(sq=8, sk=0, dv=12))
    out = sdpa_flash.attention(q, k, v, causal=causal, policy=policy)
    assert out.shape == (B, 4, 8, 12)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("sizes", [{"b": 0}, {"sk": 0}], ids=["zero-batch", "zero-keys"])
def test_zero_size_gqa(sizes: dict[str, int]) -> None:
    # planner.plan() returns Plan("math", ...) with a default Prep() (repeat_kv=1) for zero-size problems, but
    # the math kernel has no native GQA, so Hq=4 / Hkv=2 fails with a broadcasting RuntimeError instead of
    # returning an empty tensor / zeros.
    q, k, v = _qkv(**{"hq": 4, "hkv": 2, **sizes})
    out = sdpa_flash.attention(q, k, v)
    assert out.shape == (q.shape[0], 4, 8, D)
    assert torch.equal(out, torch.zeros_like(out))


def test_learned_float_mask_gets_its_gradient_from_a_backend_that_gives_one() -> None:
    """A float ``attn_mask`` that requires grad (a learned bias) is part of the plan: CPU flash and chunked say they
    give it no gradient, auto falls back to math (warning once), and the mask's gradient is math's, exactly."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(3, 9, 9, generator=g, requires_grad=True)
    p = sdpa_flash.explain(q, k, v, attn_mask=bias, causal=True)
    assert p.backend == "math" and "gives no gradient" in p.reasons["flash"][0], p.explain()
    assert "attn_mask=float (requires grad)" in p.explain()
    with pytest.warns(UserWarning, match=r"fell back to the math backend.*gives no gradient for it"):
        out = sdpa_flash.attention(q, k, v, attn_mask=bias, causal=True)
    (dbias,) = torch.autograd.grad(out.square().sum(), [bias])
    ref = reference_attention(q, k, v, attn_mask=bias, causal=True, dtype=None)
    (ref_dbias,) = torch.autograd.grad(ref.square().sum(), [bias])
    torch.testing.assert_close(dbias, ref_dbias, rtol=0, atol=0)
    for strict in ("flash", "chunked"):
        with pytest.raises(sdpa_flash.BackendUnavailableError, match=r"attn_mask requires grad.*detach the mask"):
            sdpa_flash.attention(q, k, v, attn_mask=bias, policy=strict)
    # a detached bias, or no autograd, leaves the fast kernel in place
    assert sdpa_flash.explain(q, k, v, attn_mask=bias.detach()).backend == "flash"
    with torch.no_grad():
        assert sdpa_flash.explain(q, k, v, attn_mask=bias).backend == "flash"
        sdpa_flash.attention(q, k, v, attn_mask=bias, policy="flash")  # forward only: fine


# ------------------------------------------------------------------------------------ other libraries' keywords
_KW_HEAD = ("Expected attention()'s keyword arguments to be among attn_mask, causal, dropout_p, scale, layout, "
            "policy, key_padding_mask, window, softcap, sinks, but got ")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"is_causal": True}, "is_causal=True instead. sdpa_flash spells is_causal= as causal= (True or 'top_left' is "
                          "F.scaled_dot_product_attention's is_causal=True; 'bottom_right' is flash-attn's "
                          "convention)."),
    ({"casual": True}, "casual=True instead. Did you mean causal= for casual=?"),
    ({"enable_gqa": True}, "enable_gqa=True instead. GQA/MQA needs no flag: pass key and value with fewer heads than "
                           "the query (Hq % Hkv == 0) and drop enable_gqa=."),
    ({"softmax_scale": 0.5}, "softmax_scale=0.5 instead. sdpa_flash spells softmax_scale= as scale= (None means "
                             "1/sqrt(D))."),
    ({"frobnicate": 1}, "frobnicate=1 instead."),
])
def test_unknown_keywords_name_our_spelling(kwargs: dict[str, object], message: str) -> None:
    q = torch.randn(1, 2, 8, 4)
    for call in (sdpa_flash.attention, sdpa_flash.explain):
        with pytest.raises(sdpa_flash.AttentionInputError) as info:
            call(q, q, q, **kwargs)
        assert str(info.value) == _KW_HEAD.replace("attention()", f"{call.__name__}()") + message
        assert isinstance(info.value, ValueError)


def test_unknown_keyword_values_are_shown_short() -> None:
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(sdpa_flash.AttentionInputError, match=r"but got attn_bias=<tensor \(1, 2, 8, 4\) float32> "
                                                             r"instead\. sdpa_flash spells attn_bias= as attn_mask="):
        sdpa_flash.attention(q, q, q, attn_bias=q)


def test_fallback_warning_and_error_give_shapes_in_the_users_layout() -> None:
    # (B, S, H, D) in, (B, S, H, D) in the message: with layout="bshd" the shapes are not turned into (B, H, S, D)
    q = torch.randn(2, 23, 3, 8)  # B=2, S=23, H=3, D=8: a shape no other test uses, so the warning is new
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdpa_flash.attention(q, q, q, dropout_p=0.25, layout="bshd")
    [msg] = [str(w.message) for w in caught if "fell back" in str(w.message)]
    assert msg.startswith("sdpa_flash fell back to the math backend (O(N^2) memory) for query (2, 23, 3, 8), key "
                          "(2, 23, 3, 8), value (2, 23, 3, 8), float32 on cpu, layout=bshd, dropout because flash: "
                          "dropout_p > 0 is not supported.")
    for call in (sdpa_flash.attention, sdpa_flash.explain):
        with pytest.raises(sdpa_flash.BackendUnavailableError) as info:
            call(q, q, q, dropout_p=0.25, layout="bshd", policy="flash")
        assert info.value.inputs == ("query (2, 23, 3, 8), key (2, 23, 3, 8), value (2, 23, 3, 8), float32 on cpu, "
                                     "layout=bshd, dropout")
        assert "  inputs: query (2, 23, 3, 8), key" in str(info.value)


def test_cpu_flash_kernel_has_no_dropout() -> None:
    # Why CPU dropout calls run on math: PyTorch's CPU flash kernel refuses dropout_p > 0 (torch 2.13). If a torch
    # release starts accepting it, this fails: then check its masks and set dropout=True in flash's CPU requirements.
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(RuntimeError, match="Currently do not support dropout > 0"):
        torch._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.1, False)
    assert sdpa_flash.backends.BACKENDS["flash"].requirements("cpu").dropout is False
