"""When another PyTorch layer must see the call — an active torch function mode, a tensor subclass, or a
replaced ``F.scaled_dot_product_attention`` (context parallel's wrapper) — ``attention()`` routes through
``F.scaled_dot_product_attention`` and still computes the same thing; otherwise it calls the kernel directly.
Under autocast it casts the inputs as autocast casts SDPA's."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import sdpa_flash
from sdpa_flash.testing import assert_close_to_reference, reference_attention

B, D = 2, 16


class RecordingMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def qkv(hq: int = 4, hkv: int = 2, sq: int = 12, sk: int = 20, layout: str = "bhsd", seed: int = 0,
        dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, hq, sq, D), (B, hkv, sk, D), (B, hkv, sk, D)]
    if layout == "bshd":
        shapes = [(b, s, h, d) for b, h, s, d in shapes]
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def compare(kwargs: dict[str, Any], run: Any, layout: str = "bhsd", **shape: Any) -> None:
    """``run(q, k, v, **kwargs)`` forward and backward against the float64 reference (every row sees a key)."""
    base = qkv(layout=layout, **shape)
    leaves = [t.clone().requires_grad_() for t in base]
    out = run(*leaves, layout=layout, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    cand = [out, *torch.autograd.grad(out, leaves, grad)]
    same_leaves = [t.clone().requires_grad_() for t in base]
    same_out = reference_attention(*same_leaves, layout=layout, dtype=None, **kwargs)
    same = [same_out, *torch.autograd.grad(same_out, same_leaves, grad)]
    ref_leaves = [t.double().requires_grad_() for t in base]
    ref_out = reference_attention(*ref_leaves, layout=layout, **kwargs)
    ref = [ref_out, *torch.autograd.grad(ref_out, ref_leaves, grad.double())]
    assert_close_to_reference(cand, same, ref)


OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "bottomright": {"causal": "bottom_right"},  # Sq=12 < Sk=20: every row sees keys
    "boolmask-causal": {"causal": True, "attn_mask": torch.ones(12, 20, dtype=torch.bool).tril(diagonal=3)},
    "floatmask-bottomright": {"causal": "bottom_right", "attn_mask": torch.linspace(-1, 1, 240).reshape(12, 20)},
    "scale": {"scale": 0.3},
}


# ------------------------------------------------------------------------------------ torch function mode
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("kwargs", OPTIONS.values(), ids=OPTIONS.keys())
def test_function_mode_routes_through_sdpa(kwargs: dict[str, Any], layout: str) -> None:
    mode = RecordingMode()

    def run(*args: Any, **kw: Any) -> torch.Tensor:
        with mode:
            return sdpa_flash.attention(*args, **kw)

    compare(kwargs, run, layout=layout)
    assert F.scaled_dot_product_attention in mode.seen


def test_function_mode_explain_route() -> None:
    q, k, v = qkv()
    assert sdpa_flash.explain(q, k, v).route == "direct"
    with RecordingMode():
        p = sdpa_flash.explain(q, k, v, causal=True)
    assert p.route == "sdpa"
    assert "F.scaled_dot_product_attention" in str(p)
    assert p.backend == "flash"  # the plan is still made (and enforced), PyTorch's dispatcher picks the kernel
    assert sdpa_flash.explain(q, k, v, causal=True).route == "direct"


def test_function_mode_explain_reason() -> None:
    q, k, v = qkv()
    with RecordingMode():
        p = sdpa_flash.explain(q, k, v)
    assert "torch function mode" in p.route_reason


def test_function_mode_still_applies_the_policy() -> None:
    q, k, v = qkv()
    with RecordingMode(), pytest.raises(sdpa_flash.BackendUnavailableError, match="dropout_p > 0"):
        sdpa_flash.attention(q, k, v, dropout_p=0.5, policy="flash")
    with RecordingMode(), pytest.raises(sdpa_flash.AttentionInputError, match="Expected causal"):
        sdpa_flash.attention(q, k, v, causal="sideways")


def test_direct_route_does_not_call_sdpa() -> None:
    """With no mode, no subclass and no wrapper, the kernel's aten op is called directly."""
    q, k, v = qkv()
    p = sdpa_flash.explain(q, k, v, causal=True)
    assert p.route == "direct" and "directly" in p.route_reason
    assert "direct aten op" in str(p)


# ------------------------------------------------------------------------------- a tensor subclass
class Tagged(torch.Tensor):
    seen: list[str] = []  # noqa: RUF012 - shared on purpose: records across instances

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_routes_through_sdpa() -> None:
    q, k, v = qkv()
    tq = q.as_subclass(Tagged)
    Tagged.seen.clear()
    p = sdpa_flash.explain(tq, k, v, causal=True)
    assert p.route == "sdpa" and "subclass" in p.route_reason
    out = sdpa_flash.attention(tq, k, v, causal=True)
    assert "scaled_dot_product_attention" in Tagged.seen
    torch.testing.assert_close(out.as_subclass(torch.Tensor), reference_attention(q, k, v, causal=True, dtype=None))


# ----------------------------------------------------------------------------- a replaced F.sdpa
def test_wrapped_sdpa_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    original = F.scaled_dot_product_attention
    calls: list[dict[str, Any]] = []

    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return original(*args, **kwargs)

    q, k, v = qkv()
    assert sdpa_flash.explain(q, k, v).route == "direct"
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", wrapper)
    p = sdpa_flash.explain(q, k, v, causal="bottom_right")
    assert p.route == "sdpa" and "wrapped" in p.route_reason
    compare({"causal": "bottom_right"}, sdpa_flash.attention)
    assert len(calls) == 1
    assert calls[0]["enable_gqa"] is True  # Hq=4, Hkv=2 handed over as GQA
    compare({"causal": True}, sdpa_flash.attention, layout="bshd")
    assert len(calls) == 2 and calls[1]["is_causal"] is True

    monkeypatch.undo()  # the wrapper is gone: back to the direct route, the wrapper is not called
    assert F.scaled_dot_product_attention is original
    assert sdpa_flash.explain(q, k, v).route == "direct"
    sdpa_flash.attention(q, k, v, causal=True)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"attn_mask": torch.ones(12, 20, dtype=torch.bool).tril(3)}],
                         ids=["plain", "causal", "boolmask"])
def test_autocast_bfloat16(kwargs: dict[str, Any], layout: str) -> None:
    q, k, v = qkv(layout=layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_flash.attention(q, k, v, layout=layout, **kwargs)
        p = sdpa_flash.explain(q, k, v, layout=layout, **kwargs)
        torch_out = F.scaled_dot_product_attention(
            *((q, k, v) if layout == "bhsd" else (t.transpose(1, 2) for t in (q, k, v))),
            is_causal=bool(kwargs.get("causal")), attn_mask=kwargs.get("attn_mask"), enable_gqa=True,
        )
    assert out.dtype == torch.bfloat16 == torch_out.dtype  # as PyTorch's SDPA under autocast
    assert p.spec.dtype == torch.bfloat16
    assert p.backend == "flash"
    cast = [t.to(torch.bfloat16) for t in (q, k, v)]
    assert_close_to_reference(out, reference_attention(*cast, layout=layout, dtype=None, **kwargs),
                              reference_attention(*cast, layout=layout, **kwargs))
    assert sdpa_flash.attention(q, k, v, layout=layout, **kwargs).dtype == torch.float32  # outside: no cast


def test_autocast_keeps_float64_and_backward_reaches_float32_leaves() -> None:
    q, k, v = qkv(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sdpa_flash.attention(q, k, v).dtype == torch.float64  # autocast leaves float64 alone
        assert sdpa_flash.explain(q, k, v).spec.dtype == torch.float64
    leaves = [t.float().requires_grad_() for t in qkv()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_flash.attention(*leaves, causal=True)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


@pytest.mark.parametrize("what", ["mixed-qkv", "float32-mask-bf16-q"])
def test_autocast_accepts_what_autocast_makes_uniform(what: str) -> None:
    # Shapes no other test uses, so that this is the first call with them (a cached entry would hide the bug).
    if what == "mixed-qkv":
        q, k, v = qkv(sq=7, sk=17, seed=5)  # 17 keys: CPU flash, as F.sdpa picks (fewer: the denylist, math)
        args: list[Any] = [q, k.to(torch.bfloat16), v]
        kwargs: dict[str, Any] = {}
    else:
        q, k, v = (t.to(torch.bfloat16) for t in qkv(sq=5, sk=11, seed=6))
        args, kwargs = [q, k, v], {"attn_mask": torch.zeros(5, 11)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.scaled_dot_product_attention(*args, enable_gqa=True, **kwargs)
        assert sdpa_flash.explain(*args, **kwargs).spec.dtype == torch.bfloat16
        out = sdpa_flash.attention(*args, **kwargs)
    torch.testing.assert_close(out, expected)


def test_autocast_fallback_warning_points_at_the_caller() -> None:
    q, k, v = qkv(sq=6, sk=6, seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sdpa_flash.attention(q, k, v, dropout_p=0.5)  # call site 1
            sdpa_flash.attention(q, k, v, dropout_p=0.5)  # call site 2
    fell_back = [w for w in caught if "fell back" in str(w.message)]
    assert [w.filename for w in fell_back] == [__file__, __file__]
