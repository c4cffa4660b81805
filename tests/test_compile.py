"""``torch.compile`` of code calling ``sdpa_flash.attention``: one graph (no breaks), the eager result, a working
backward, and no recompilation for repeated calls with the same shapes.

Most tests compile with the ``aot_eager`` backend (dynamo + AOTAutograd, i.e. the full graph capture and the
joint forward/backward trace, without the C++ build of inductor); one test runs inductor end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sdpa_flash


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@dataclass(frozen=True)
class Case:
    q: tuple[int, ...]
    kv: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    mask: tuple[int, ...] | None = None  # a boolean mask of this shape is passed as a graph input


CASES = {
    "causal": Case((2, 4, 8, 16), (2, 4, 8, 16), {"causal": True}),
    "gqa-bottomright": Case((2, 4, 6, 16), (2, 2, 10, 16), {"causal": "bottom_right", "scale": 0.3}),
    "bshd": Case((2, 8, 4, 16), (2, 8, 2, 16), {"layout": "bshd", "causal": True}),
    "boolmask": Case((2, 4, 8, 16), (2, 4, 12, 16), {}, mask=(2, 1, 8, 12)),
    "math": Case((2, 4, 8, 16), (2, 1, 8, 16), {"policy": "math", "causal": True}),
}


def make(case: Case, seed: int = 0) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.q, generator=gen)
    k = torch.randn(case.kv, generator=gen)
    v = torch.randn(case.kv, generator=gen)
    kwargs = case.kwargs
    if case.mask is None:
        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return sdpa_flash.attention(q, k, v, **kwargs)

        return fn, [q, k, v]
    mask = torch.rand(case.mask, generator=gen) < 0.8
    mask[..., 0] = True  # every query row sees a key

    def fn_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, k, v, attn_mask=m, **kwargs)

    return fn_masked, [q, k, v, mask]


def forward_backward(fn: Callable[..., torch.Tensor], args: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [a.detach().clone().requires_grad_() for a in args[:3]]
    out = fn(*leaves, *args[3:])
    grad = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_compiled_matches_eager(case: Case) -> None:
    fn, args = make(case)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = forward_backward(fn, args)
    got = forward_backward(compiled, args)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, eager, strict=True):
        torch.testing.assert_close(g, e, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():  # and without autograd (a different graph: no backward needed)
        torch.testing.assert_close(compiled(*args), fn(*args))


def test_compiled_with_inductor() -> None:
    fn, args = make(CASES["gqa-bottomright"])
    compiled = torch.compile(fn, fullgraph=True)
    eager = forward_backward(fn, args)
    got = forward_backward(compiled, args)
    for g, e in zip(got, eager, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_no_graph_breaks(case: Case) -> None:
    fn, args = make(case)
    result = torch._dynamo.explain(fn)(*args)
    assert result.graph_break_count == 0, result.break_reasons
    assert result.graph_count == 1


@pytest.mark.parametrize("case", [CASES["causal"], CASES["boolmask"]], ids=["causal", "boolmask"])
def test_no_recompilation_for_same_shapes(case: Case) -> None:
    fn, args = make(case)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    first = compiled(*args)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for seed in range(5):
        _, fresh = make(case, seed=seed + 1)  # new values, same shapes, dtypes and options
        torch.testing.assert_close(compiled(*fresh), fn(*fresh))
    torch.testing.assert_close(compiled(*args), first)
    assert counters["stats"]["unique_graphs"] == graphs


def test_policy_in_force_when_compiling() -> None:
    q = torch.randn(2, 4, 8, 16)

    def fn(q: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, q, q, dropout_p=0.5)

    with pytest.warns(UserWarning, match="fell back to the math backend"):  # "auto": decided while compiling
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_backend_unavailable_keeps_its_type_under_compile() -> None:
    q = torch.randn(2, 4, 8, 16)

    def fn(q: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, q, q, dropout_p=0.5, policy="flash")

    with pytest.raises(sdpa_flash.BackendUnavailableError, match="dropout_p > 0 is not supported"):
        torch.compile(fn, backend="aot_eager")(q)


def test_invalid_input_keeps_its_type_under_compile() -> None:
    q = torch.randn(2, 4, 8, 16)

    def fn(q: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, q, q, causal="sideways")

    with pytest.raises(sdpa_flash.AttentionInputError, match="Expected causal"):
        torch.compile(fn, backend="aot_eager")(q)


@pytest.mark.parametrize("how", ["second-seqlen", "dynamic-true"])
def test_dynamic_shapes_fullgraph(how: str) -> None:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, k, v, causal=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True if how == "dynamic-true" else None)
    for s in (8, 12, 20):  # the second length makes dynamo mark the sequence dimension dynamic
        q, k, v = torch.randn(2, 4, s, 16), torch.randn(2, 2, s, 16), torch.randn(2, 2, s, 16)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
