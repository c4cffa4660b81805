"""Tests of ``sdpa_flash.testing`` itself: the tolerance rule has teeth, passes correct kernels, says where it
failed; the profiles are parsed strictly; ``ran_backends`` sees what ran.

Mutation checks: each runs a *wrong* attention (a wrong scale, a dropped mask, the other causal corner, K/V
heads tiled instead of interleaved, a backward that ignores the causal mask, a result computed in a lower
precision) on problems where the mistake matters, and asserts that the rule rejects it, while the correct
backends pass the very same problems. All on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import sdpa_flash
import sdpa_flash.testing as testing
import sdpa_flash.testing._compare as compare_module
from sdpa_flash import AttentionInputError
from sdpa_flash.testing import (
    FLOOR_UNITS,
    PROPERTY_PROFILES,
    AttentionProblem,
    K,
    ProblemParams,
    assert_close_to_reference,
    attention_outputs,
    attention_references,
    compare_attention,
    compare_to_reference,
    property_profile,
    ran_backends,
)

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
HALF_AND_SINGLE = {n: d for n, d in DTYPES.items() if d != torch.float64}
CPU_BACKENDS = ("flash", "math", "chunked")

# Problems where each mutation changes the answer by far more than any rounding: normal data, Sq != Sk,
# GQA with two key/value heads, every layout. At least 16 keys: the CPU flash kernel does not take fewer without a
# mask (the denylist, pytorch/pytorch#141128), and policy="flash" would refuse them.
SHAPES: dict[str, dict[str, Any]] = {
    "mha": {"batch": 2, "heads_q": 2, "heads_kv": 2, "seqlen_q": 17, "seqlen_k": 17},
    "gqa_sq<sk": {"batch": 1, "heads_q": 4, "heads_kv": 2, "seqlen_q": 6, "seqlen_k": 19, "layout": "bshd"},
    "gqa_sq>sk": {"batch": 2, "heads_q": 4, "heads_kv": 2, "seqlen_q": 22, "seqlen_k": 16},
}


def make(dtype: torch.dtype, shape: str, seed: int = 0, **changes: Any) -> AttentionProblem:
    fields = {"head_dim": 16, "head_dim_v": 16, "backward": True, "seed": seed, **SHAPES[shape], **changes}
    return ProblemParams(dtype, **fields).build()


def failed(outputs: list[torch.Tensor], problem: AttentionProblem) -> list[str]:
    return [c.name for c in compare_attention(problem, outputs) if not c.passed]


# ------------------------------------------------------------------------------------- correct kernels pass
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_correct_backends_pass(backend: str, shape: str, dtype: torch.dtype) -> None:
    for causal in (False, True, "bottom_right"):
        for mask in ("none", "bool", "float", "key_padding"):
            problem = make(dtype, shape, causal=causal, mask=mask)
            results = assert_close_to_reference(attention_outputs(problem, policy=backend), problem)
            assert [c.name for c in results] == ["out", "dq", "dk", "dv"]
            assert all(0 <= c.usage <= 1 and c.compared > 0 for c in results)


# ------------------------------------------------------------------------------------ mutations are caught
def _wrong_scale(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None, **kw: Any) -> torch.Tensor:
    d = q.shape[-1]
    return sdpa_flash.attention(q, k, v, scale=(scale or 1 / math.sqrt(d)) * 1.25, **kw)


def _dropped_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: Any, **kw: Any) -> torch.Tensor:
    return sdpa_flash.attention(q, k, v, attn_mask=None, **kw)


def _other_corner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Any, **kw: Any) -> torch.Tensor:
    return sdpa_flash.attention(q, k, v, causal="bottom_right" if causal is True else True, **kw)


def _tiled_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, **kw: Any) -> torch.Tensor:
    hd = 1 if layout == "bhsd" else 2
    rep = q.shape[hd] // k.shape[hd]
    reps = [1, 1, 1, 1]
    reps[hd] = rep  # [h0, h1, h0, h1] where query head h reads key/value head h // rep: [h0, h0, h1, h1]
    return sdpa_flash.attention(q, k.repeat(*reps), v.repeat(*reps), layout=layout, **kw)


MUTATIONS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, Any]]] = {
    "wrong_scale": (_wrong_scale, {}),
    "dropped_bool_mask": (_dropped_mask, {"mask": "bool"}),
    "dropped_float_mask": (_dropped_mask, {"mask": "float"}),
    "dropped_key_padding": (_dropped_mask, {"mask": "key_padding"}),
    "swapped_causal_corner": (_other_corner, {"causal": True}),
    "swapped_causal_corner_br": (_other_corner, {"causal": "bottom_right"}),
    "tiled_instead_of_interleaved_kv_heads": (_tiled_heads, {}),
}


def _matters(mutation: str, shape: str) -> bool:
    """Tiling and interleaving agree without GQA; the causal corners agree when Sq == Sk."""
    sizes = SHAPES[shape]
    if mutation.startswith("tiled"):
        return sizes["heads_q"] != sizes["heads_kv"]
    return not mutation.startswith("swapped") or sizes["seqlen_q"] != sizes["seqlen_k"]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("mutation", "shape"), [(m, s) for m in MUTATIONS for s in SHAPES if _matters(m, s)])
def test_rule_rejects_a_wrong_attention(mutation: str, shape: str, dtype: torch.dtype) -> None:
    fn, changes = MUTATIONS[mutation]
    problem = make(dtype, shape, **changes)
    references = attention_references(problem)
    assert_close_to_reference(attention_outputs(problem, policy="flash"), problem, references=references)
    wrong = attention_outputs(problem, fn, policy="flash")
    results = compare_attention(problem, wrong, references=references)
    assert not results[0].passed, f"{mutation} passed the forward: {results[0]}"
    assert not all(c.passed for c in results[1:]), f"{mutation} passed the backward: {results[1:]}"


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_rule_rejects_a_backward_that_ignores_the_causal_mask(dtype: torch.dtype) -> None:
    """The forward is right, the gradients are those of non-causal attention: out passes, dq/dk/dv fail."""

    def causal_forward_noncausal_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Any,
                                          **kw: Any) -> torch.Tensor:
        right = sdpa_flash.attention(q, k, v, causal=causal, **kw)
        wrong = sdpa_flash.attention(q, k, v, causal=False, **kw)
        return right.detach() + (wrong - wrong.detach())

    problem = make(dtype, "mha", causal=True)
    assert failed(attention_outputs(problem, causal_forward_noncausal_backward, policy="math"), problem) == [
        "dq", "dk", "dv"]


@pytest.mark.parametrize(("dtype", "low"), [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                            (torch.float64, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=["f32-as-bf16", "f32-as-f16", "f64-as-f32", "f16-as-bf16"])
def test_rule_rejects_a_result_of_lower_precision(dtype: torch.dtype, low: torch.dtype) -> None:
    problem = make(dtype, "gqa_sq>sk")

    def in_low_precision(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: Any = None,
                         **kw: Any) -> torch.Tensor:
        return sdpa_flash.attention(q.to(low), k.to(low), v.to(low), **kw).to(dtype)

    assert "out" in failed(attention_outputs(problem, in_low_precision, policy="math", backward=False), problem)


def test_rule_needs_its_floor() -> None:
    """``K x`` the math backend's error alone rejects a correct kernel: PyTorch's CPU flash backward is 2-3x
    as far from float64 as math here (math keeps float32 intermediates that flash rounds). The floor admits it.
    (16 keys: fewer, unmasked, are not for CPU flash, pytorch/pytorch#141128.)"""
    problem = ProblemParams(torch.float16, heads_q=2, heads_kv=2, seqlen_q=16, seqlen_k=16, head_dim=16,
                            head_dim_v=16, causal=True, backward=True, seed=1).build()
    outputs, references = attention_outputs(problem, policy="flash"), attention_references(problem)
    assert failed(outputs, problem) == []
    floor_units = compare_module.FLOOR_UNITS  # patched where compare_to_reference reads it
    try:
        compare_module.FLOOR_UNITS = 0.0
        without_floor = compare_attention(problem, outputs, references=references)
    finally:
        compare_module.FLOOR_UNITS = floor_units
    assert [c.name for c in without_floor if not c.passed] == ["dq", "dk"]
    assert all(2.0 < c.ratio < 3.0 for c in without_floor if not c.passed)


# -------------------------------------------------------------------------------------- the bound, exactly
def _bound(problem: AttentionProblem, i: int) -> torch.Tensor:
    """The documented bound of tensor ``i``, element by element (the module docstring's formula)."""
    refs = attention_references(problem)
    eps = torch.finfo(problem.dtype).eps
    eps_acc = torch.finfo(torch.float32).eps
    math_err = (refs.same_dtype[i].double() - refs.ref64[i]).abs().max()
    m, ms = refs.magnitude[i], refs.score_magnitude[i]
    return K * math_err + FLOOR_UNITS * (eps * m + eps_acc * math.sqrt(refs.reduction) * (m + ms))


@pytest.mark.parametrize("dtype", list(HALF_AND_SINGLE.values()), ids=list(HALF_AND_SINGLE))
@pytest.mark.parametrize("i", range(4), ids=["out", "dq", "dk", "dv"])
def test_rule_is_sharp_at_its_bound(i: int, dtype: torch.dtype) -> None:
    """An error of 0.99x the bound everywhere passes (using 0.99 of it); 1.01x at one element fails there."""
    problem = make(dtype, "gqa_sq<sk", causal="bottom_right")
    refs = attention_references(problem)
    bound = _bound(problem, i)
    sign = torch.ones_like(bound).flatten()
    sign[1::2] = -1

    def compare(candidate: torch.Tensor) -> Any:
        return compare_to_reference(candidate, refs.same_dtype[i], refs.ref64[i], name="x", dtype=dtype,
                                    magnitude=refs.magnitude[i], score_magnitude=refs.score_magnitude[i],
                                    reduction=refs.reduction, include=refs.include[i])

    near = compare(refs.ref64[i] + 0.99 * bound * sign.view_as(bound))
    assert near.passed and near.usage == pytest.approx(0.99, rel=1e-6)
    worst = (0, 3, 1, 5)
    over = refs.ref64[i].clone()
    over[worst] += 1.01 * bound[worst]
    c = compare(over)
    assert not c.passed and c.worst_index == worst and c.usage == pytest.approx(1.01, rel=1e-6)
    assert c.share_over == pytest.approx(1 / c.compared)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_rule_accepts_one_ulp_off_the_correctly_rounded_result(dtype: torch.dtype) -> None:
    problem = make(dtype, "gqa_sq>sk", mask="bool")
    refs = attention_references(problem)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        rounded = refs.ref64[i].to(dtype)
        nudged = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
        nudged = torch.where(rounded == 0, rounded, nudged)  # an exact 0 (a key no query sees) has no floor
        c = compare_to_reference(nudged, refs.same_dtype[i], refs.ref64[i], name=name, magnitude=refs.magnitude[i],
                                 score_magnitude=refs.score_magnitude[i], reduction=refs.reduction,
                                 include=refs.include[i])
        assert c.passed, str(c)


# ------------------------------------------------------------------------------------------------ messages
def test_failure_message_names_the_worst_element_and_the_share_over() -> None:
    problem = make(torch.float32, "mha", causal=True)
    outputs = attention_outputs(problem, policy="math")
    outputs[2] = outputs[2].clone()
    outputs[2][1, 0, 4, 7] += 1.0  # dk
    outputs[2][0, 1, 2, 3] += 0.5
    with pytest.raises(AssertionError) as info:
        assert_close_to_reference(outputs, problem)
    message = str(info.value)
    n = outputs[2].numel()
    assert "FAIL dk" in message and "worst at (1, 0, 4, 7)" in message
    assert f"{2 / n:.2%} of {n} elements over their bound" in message
    assert problem.describe() in message
    assert "PASS" not in message and "FAIL out" not in message  # only failing tensors are listed


def test_failure_message_counts_nan_mismatches() -> None:
    problem = make(torch.float32, "mha", backward=False)
    out = attention_outputs(problem, policy="flash")[0].clone()
    out[0, 0, 0, 0] = math.nan
    c = compare_attention(problem, out)[0]
    assert not c.passed and c.nan_mismatch == 1 and "1 NaN mismatches" in str(c)
    assert c.error == math.inf  # an unmatched NaN is an infinite error, not the largest float


def test_shapes_and_dtypes_are_checked() -> None:
    problem = make(torch.float32, "gqa_sq>sk")
    out, dq, dk, dv = attention_outputs(problem, policy="math")
    with pytest.raises(ValueError, match="shape"):  # one batch entry only: broadcasting would compare it twice
        compare_attention(problem, [out[:1], dq, dk, dv])
    with pytest.raises(ValueError, match="dtype float32"):
        compare_attention(problem, [out.double(), dq, dk, dv])
    with pytest.raises(ValueError, match="at most 1"):
        compare_attention(problem, [out, dq], references=attention_references(problem, backward=False))


def test_lists_of_different_lengths_are_refused() -> None:
    """Every tensor given is compared: an extra candidate (here 100 off) is not dropped by a zip that stops early."""
    a = torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    assert_close_to_reference([a], [a], [a.double()])  # the rule itself passes a == reference
    with pytest.raises(ValueError, match="2 candidates, 1 same-dtype and 1 float64 references"):
        assert_close_to_reference([a, a + 100], [a], [a.double()])
    with pytest.raises(ValueError, match="1 candidates, 2 same-dtype and 2 float64 references"):
        assert_close_to_reference([a], [a, a], [a.double(), a.double()])
    with pytest.raises(ValueError, match="1 candidates, 1 same-dtype and 2 float64 references"):
        assert_close_to_reference(a, a, [a.double(), a.double()])
    with pytest.raises(ValueError, match="a name for each of the 5 tensors, but got 4 names"):
        assert_close_to_reference([a] * 5, [a] * 5, [a.double()] * 5)  # default names: out, dq, dk, dv
    named = assert_close_to_reference([a] * 5, [a] * 5, [a.double()] * 5, names=("out", "dq", "dk", "dv", "dbias"))
    assert [c.name for c in named] == ["out", "dq", "dk", "dv", "dbias"]


def test_compat_comparison_refuses_more_tensors_than_it_compares() -> None:
    from sdpa_flash.compat.testing import compare_flash

    q = torch.randn(1, 8, 2, 16, generator=torch.Generator().manual_seed(0))
    out = sdpa_flash.attention(q, q, q, layout="bshd")
    with pytest.raises(ValueError, match="got 5 tensors"):
        compare_flash([out, q, q, q, q + 100], q, q, q, grad_out=torch.ones_like(out))


def test_bad_input_rows_are_compared_as_what_they_are() -> None:
    """With a NaN key row the floor stays finite: the rows that cannot see it are still compared, and a row that
    hides the NaN (0 instead) fails."""
    problem = make(torch.float32, "mha", causal=True, backward=False)
    key = problem.key.clone()
    key[0, 1, 5] = math.nan
    poisoned = dataclasses.replace(problem, key=key)
    refs = attention_references(poisoned)
    assert all(bool(torch.isfinite(m).all()) for m in refs.magnitude + refs.score_magnitude)
    out = attention_outputs(poisoned, policy="flash")[0]
    assert out[0, 1, 5:].isnan().all() and out[0, 1, :5].isfinite().all()
    sq = problem.params.seqlen_q
    others = torch.ones(2, 2, sq, 1, dtype=torch.bool)
    others[0, 1] = False  # the reference adds the causal -inf to the NaN scores: the whole slice is NaN there
    ok = compare_to_reference(out, refs.same_dtype[0], refs.ref64[0], magnitude=refs.magnitude[0],
                              score_magnitude=refs.score_magnitude[0], reduction=refs.reduction, include=others)
    assert ok.passed and ok.compared == 3 * sq * 16, str(ok)
    hidden = out.nan_to_num(0.0)
    c = compare_attention(poisoned, hidden)[0]
    assert not c.passed and c.nan_mismatch > 0


# ------------------------------------------------------------------------------------------------ profiles
def test_property_profile_defaults_to_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDPA_FLASH_HYPOTHESIS_PROFILE", raising=False)
    assert property_profile().name == "ci"
    monkeypatch.setenv("SDPA_FLASH_HYPOTHESIS_PROFILE", "")
    assert property_profile().name == "ci"


@pytest.mark.parametrize("name", list(PROPERTY_PROFILES))
def test_property_profile_reads_the_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPA_FLASH_HYPOTHESIS_PROFILE", name)
    assert property_profile() is PROPERTY_PROFILES[name]


@pytest.mark.parametrize("value", ["CI", "fast", " ci", "gpu,ci"])
def test_property_profile_rejects_unknown_values(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPA_FLASH_HYPOTHESIS_PROFILE", value)
    with pytest.raises(AttentionInputError, match="SDPA_FLASH_HYPOTHESIS_PROFILE") as info:
        property_profile()
    assert repr(value) in str(info.value) and ", ".join(PROPERTY_PROFILES) in str(info.value)


def test_profiles_are_what_the_budget_needs() -> None:
    ci, gpu, dev = (PROPERTY_PROFILES[n] for n in ("ci", "gpu", "dev"))
    assert (ci.device, gpu.device, dev.device) == ("cpu", "cuda", "cpu")
    assert ci.derandomize and gpu.derandomize and not dev.derandomize
    assert gpu.max_examples >= 1000  # per fused backend and half-precision dtype
    assert ci.examples() == ci.max_examples and ci.examples(0.0) == 1
    assert ci.examples(ci.secondary) == round(ci.max_examples * ci.secondary)


def test_register_loads_the_selected_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    active = property_profile().name  # reload the session's own profile, so no other test is affected
    monkeypatch.setenv("SDPA_FLASH_HYPOTHESIS_PROFILE", active)
    chosen = testing.register_hypothesis_profiles()
    current = hypothesis.settings.default
    assert chosen.name == active == hypothesis.settings.get_current_profile_name()
    assert current.max_examples == chosen.max_examples and current.derandomize == chosen.derandomize
    assert current.print_blob and current.deadline is None
    if chosen.derandomize:
        assert current.database is None


# ------------------------------------------------------------------------------------------- ran_backends
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ran_backends_sees_the_forced_backend(backend: str) -> None:
    problem = make(torch.float32, "gqa_sq>sk", causal=True)
    assert ran_backends(attention_outputs, problem, policy=backend, backward=False) == {backend}
    assert ran_backends(attention_outputs, problem, policy=backend) == {backend}  # and its backward


def test_ran_backends_sees_every_kernel_and_nothing_else() -> None:
    q = torch.randn(1, 2, 8, 16)

    def two() -> None:
        sdpa_flash.attention(q, q, q, policy="math")
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # PyTorch's own pick on the CPU: flash

    assert ran_backends(two) == {"math", "flash"}
    assert ran_backends(lambda: q @ q.transpose(-1, -2)) == set()


def test_ran_backends_propagates_errors_and_reports_nothing_run() -> None:
    q = torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 8)  # Dv != D: CPU flash cannot run it
    with pytest.raises(sdpa_flash.BackendUnavailableError):
        ran_backends(sdpa_flash.attention, q, q, v, policy="flash")
    raised: list[Exception] = []

    def call() -> None:
        try:
            sdpa_flash.attention(q, q, v, policy="flash")
        except sdpa_flash.BackendUnavailableError as exc:
            raised.append(exc)

    assert ran_backends(call) == set() and raised


# --------------------------------------------------------------------------------------------- strategies
def test_attention_problems_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="dtypes"):
        testing.attention_problems("flash", dtypes=(torch.int8,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernels for"):
        testing.attention_problems("cudnn", device="cpu")


POOL = ((2, 4, 2, 5, 9, 8, 8), (1, 2, 2, 7, 3, 4, 4), (3, 4, 1, 1, 6, 8, 8))


def test_attention_problems_draws_sizes_from_a_shape_pool() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    seen: set[tuple[int, ...]] = set()

    @hypothesis.settings(max_examples=30, database=None)
    @hypothesis.given(testing.attention_problems("math", shapes=POOL, min_batch=2, min_group=2))
    def check(problem: AttentionProblem) -> None:
        p = problem.params
        shape = (p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim, p.head_dim_v)
        assert shape in POOL[::2]  # the pool, less the shape without GQA or with batch 1
        seen.add(shape)

    check()
    assert seen == set(POOL[::2])
    with pytest.raises(ValueError, match="shapes"):
        testing.attention_problems("flash", shapes=((1, 2, 2, 4, 4, 8, 4),))  # CPU flash needs Dv == D


def test_attention_problems_honours_batch_and_length_options() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    lengths: set[int] = set()

    @hypothesis.settings(max_examples=60, database=None)
    @hypothesis.given(testing.attention_problems("flash", min_batch=2, max_batch=3, max_seqlen=4, seqlens=(63, 64)))
    def check(problem: AttentionProblem) -> None:
        p = problem.params
        assert 2 <= p.batch <= 3 and {p.seqlen_q, p.seqlen_k} <= {1, 2, 3, 4, 63, 64}
        lengths.update((p.seqlen_q, p.seqlen_k))

    check()
    assert lengths & {63, 64} and lengths & {1, 2, 3, 4}
