"""Property-based verification: every backend against the float64 math reference, and the symmetries of attention.

Each property is its own test, parametrized over the backends that exist on the device of the active profile
(``SDPA_FLASH_HYPOTHESIS_PROFILE``: ``ci`` and ``dev`` run on the CPU, ``gpu`` on CUDA; see
:class:`sdpa_flash.testing.PropertyProfile`). Problems come from :func:`sdpa_flash.testing.attention_problems`,
which keeps only those the backend's own reasons accept, and every numerical comparison is the library's
tolerance rule (:func:`sdpa_flash.testing.compare_attention`), never a tolerance of this file.

Bitwise or within tolerance — which, and why:

* A permutation of batch entries or heads, a joint permutation of keys and values, the other layout and an
  explicit K/V repetition are compared *within tolerance*: they change data addresses and strides, hence the
  kernels' vector and GEMM code paths (and, for the key permutation, the order of every sum). Measured on the CPU
  (torch 2.13), forward only: the flash backend differed bitwise in 3% of layout swaps, 4% of batch permutations
  and 5% of explicit repetitions, the math backend in 3% of layout swaps; gradients differ more often. The
  transformed run, mapped back, must pass the tolerance rule against the float64 reference of the *original*
  problem.
* Perturbing keys/values that a row cannot see leaves that row *bitwise* unchanged in the forward, on every
  device: the addresses do not move, the hidden scores become ``-inf`` before ``exp`` in every kernel, so the
  perturbed entries add exact zeros to the same sums in the same order (and the row maximum is unchanged).
  The same holds for dQ on the CPU; on CUDA dQ is compared within tolerance, because the fused backward kernels
  accumulate dQ with atomic adds in no fixed order.
* Rows that do not see a NaN/Inf input are compared *bitwise* with the clean run, for the same reason.

Weakened properties (findings; each is also stated at its test):

* NaN/Inf in a key row reaches rows that cannot see it wherever the mask is applied by *adding* ``-inf`` to the
  scores (``NaN + -inf = NaN``): PyTorch's math backend (so the float64 reference itself), the chunked backend,
  and every backend given an explicit or materialised mask (sdpa_flash passes boolean masks as additive biases,
  as PyTorch does; cf. pytorch/pytorch#101967). Only kernels that select rather than add (the fused kernels'
  own causal masking) keep such rows untouched; elsewhere the test asserts that the bad key stays inside its
  (batch, key/value head) slice.
* PyTorch's CPU flash kernel returns a row of zeros instead of NaN for some rows that see NaN/Inf scores, where the
  float64 reference gives NaN: a silent masking of bad data (pytorch/pytorch#141128). Measured with
  ``benchmarks/cpu_flash_nan_probe.py`` on torch 2.11, 2.13 and 2.14.1 (AVX-512): a query row all of whose visible
  scores are NaN gives 0 when there is no mask, causal is off or top-left, and there are fewer than 16 keys (8 in
  float64; AVX2's bounds are half that). The built-in denylist reroutes exactly those calls to math (quietly: not a
  fallback), so the problems drawn for flash no longer include them (``test_cpu_flash_keeps_nan_of_a_query_row``
  checks the routing; ``tests/test_numerics.py`` checks the entry against the installed kernel). An infinite key
  element with longer rows still gives zeros, and the property tolerates exactly that pattern (whole row zero
  where the reference row is not finite) for CPU flash.
* NaN/Inf in a *value* row is not tested: it reaches every row of its tile in every backend, including rows that
  cannot see it, because the hidden probabilities are exact zeros and ``0 * NaN = NaN``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

import sdpa_flash
from sdpa_flash import BackendUnavailableError
from sdpa_flash.backends import BACKENDS
from sdpa_flash.planner import plan as dense_plan
from sdpa_flash.policy import resolve_policy
from sdpa_flash.spec import AttentionSpec, dtype_name
from sdpa_flash.testing import (
    AttentionProblem,
    ProblemParams,
    assert_close_to_reference,
    attention_outputs,
    attention_problems,
    attention_references,
    compare_to_reference,
    property_profile,
    ran_backends,
)

PROFILE = property_profile()
DEVICE = PROFILE.device
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []

# Examples per test and parameter, all from the profile (PropertyProfile.max_examples / .secondary):
SECONDARY = PROFILE.examples(PROFILE.secondary)  # every property but the accuracy headline
RAN = PROFILE.examples(PROFILE.secondary / 4)  # ran_backends runs a profiler per example: slow

# Problem sizes per device: tiny on the CPU; on CUDA across the fused kernels' tiles (64/128 rows, head dims to
# 256; 60 is not a multiple of 8, so sdpa_flash zero-pads it for the fused kernels).
_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"max_batch": 2, "max_heads": 4, "max_seqlen": 24, "max_head_dim": 16},
    "cuda": {"max_batch": 2, "max_heads": 4, "max_seqlen": 300, "seqlens": (63, 64, 65, 127, 128, 129, 255, 256, 257),
             "head_dims": (32, 60, 64, 80, 128, 256)},
}
# cuDNN builds an execution plan for every distinct shape (tens of milliseconds each, where a kernel call takes
# 0.1 ms), so on CUDA its problems repeat shapes from this pool, (B, Hq, Hkv, Sq, Sk, D, Dv), chosen across its
# tile edges, GQA/MQA, Sq != Sk both ways, the padded head dim 60 and a single query; the data, scale, mask,
# causal kind and layout still vary per example.
_SHAPE_POOLS: dict[tuple[str, str], tuple[tuple[int, int, int, int, int, int, int], ...]] = {
    ("cuda", "cudnn"): ((2, 4, 4, 64, 64, 64, 64), (1, 4, 2, 65, 129, 128, 128), (2, 2, 1, 127, 63, 80, 80),
                        (1, 4, 4, 128, 128, 256, 256), (2, 2, 2, 257, 255, 32, 32), (1, 4, 1, 300, 300, 60, 60),
                        (2, 4, 2, 17, 256, 128, 128), (2, 2, 2, 1, 129, 64, 64)),
    # FlashAttention-4 JIT-compiles every (dtype, head dims, GQA ratio, causal, training) it meets, and a query
    # that fits one tile gets its own kernel: 3-7 s each on the H200. Its pool keeps that set small — head dims
    # 64/128 (60 zero-padded to 64), GQA 1 and 2, multi-tile queries and one single-tile (decode-like) shape —
    # while lengths cross its 128-row tiles, Sq != Sk both ways.
    # FlexAttention compiles once per call structure (GQA or not, window, softcap, training) and again for a new
    # shape until dynamo marks the shapes dynamic: a small pool, GQA 1/2/4 (4 with a single query: its decoding
    # kernel), lengths off its 128-row blocks, Sq != Sk both ways.
    ("cuda", "flex"): ((2, 4, 4, 200, 200, 64, 64), (1, 4, 2, 129, 257, 128, 128), (2, 4, 4, 300, 100, 64, 64),
                       (1, 4, 1, 1, 300, 64, 64)),
    ("cuda", "fa4"): ((2, 4, 4, 200, 200, 64, 64), (1, 4, 2, 129, 257, 128, 128), (2, 2, 2, 300, 256, 128, 128),
                      (1, 4, 4, 256, 255, 60, 60), (2, 4, 2, 255, 129, 128, 128), (2, 4, 4, 40, 300, 128, 128)),
}
_HALF = (torch.float16, torch.bfloat16)
_STRICT_SELECTION = frozenset(n for n, b in BACKENDS.items() if b.fused)  # mask by selecting, not adding -inf


# --------------------------------------------------------------------------------------------- parameters
def _unavailable(backend: str, dtype: torch.dtype | None = None) -> str:
    """Why ``backend`` cannot run at all here (build, compute capability, dtype); '' when it can."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return ""  # the cuda marker skips every test of this module
    req = BACKENDS[backend].requirements(DEVICE)
    assert req is not None
    dt = dtype or min(req.dtypes, key=lambda d: (torch.finfo(d).bits, str(d)))
    spec = AttentionSpec(DEVICE, dt, 1, 1, 1, 16, 16, 64, 64)
    return "; ".join(BACKENDS[backend].not_supported_reasons(spec, sdpa_flash.capabilities(DEVICE)))


def _backend_params() -> list[Any]:
    out = []
    for name, backend in BACKENDS.items():
        if backend.requirements(DEVICE) is None:
            continue
        why = _unavailable(name)
        out.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


def _headline(backend: str, dtype: torch.dtype) -> bool:
    """The accuracy tests that get the profile's full ``max_examples``: all on the CPU, the fused kernels in
    half precision on CUDA (the others get ``secondary``)."""
    return DEVICE == "cpu" or (BACKENDS[backend].fused and dtype in _HALF)


def _accuracy_params() -> list[Any]:
    out = []
    for name, backend in BACKENDS.items():
        req = backend.requirements(DEVICE)
        if req is None:
            continue
        for dt in sorted(req.dtypes, key=lambda d: (torch.finfo(d).bits, str(d))):
            why = _unavailable(name, dt)
            out.append(pytest.param(name, dt, id=f"{name}-{dtype_name(dt)}",
                                    marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


BACKEND_PARAMS = _backend_params()
ACCURACY_PARAMS = _accuracy_params()
POLICY_PARAMS = ["auto", "fused"]


def _budget(backend: str, dtype: torch.dtype) -> int:
    return PROFILE.examples(1.0 if _headline(backend, dtype) else PROFILE.secondary)


@functools.cache
def problems(backend: str | None, dtype: torch.dtype | None = None, *, backward: bool = False,
             **options: Any) -> SearchStrategy[AttentionProblem]:
    """``attention_problems`` for this device with this profile's sizes (``options`` override them)."""
    kwargs = {**_SIZES[DEVICE], **options}
    if (DEVICE, backend) in _SHAPE_POOLS:
        kwargs.setdefault("shapes", _SHAPE_POOLS[(DEVICE, backend)])
    if dtype is not None:
        kwargs["dtypes"] = (dtype,)
    return attention_problems(backend, device=DEVICE, backward=backward, **kwargs)


# ------------------------------------------------------------------------------------------------ helpers
def _seq_dim(problem: AttentionProblem) -> int:
    return 2 if problem.params.layout == "bhsd" else 1


def _head_dim(problem: AttentionProblem) -> int:
    return 1 if problem.params.layout == "bhsd" else 2


def _in_layout(rows: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
    """(B, Hq, Sq) row flags -> the problem's layout, to index out / dq with."""
    return rows if problem.params.layout == "bhsd" else rows.transpose(1, 2)


def _select(t: torch.Tensor | None, dim: int, index: torch.Tensor, size: int) -> torch.Tensor | None:
    """``t.index_select(dim, index)`` where ``t`` has that dimension at full ``size`` (masks may broadcast)."""
    if t is None or t.dim() <= (dim if dim >= 0 else -dim - 1) or t.shape[dim] != size or size == 1:
        return t
    return t.index_select(dim, index.to(t.device))


def _run(problem: AttentionProblem, backend: str, **options: Any) -> list[torch.Tensor]:
    return attention_outputs(problem, policy=backend, **options)


def _noise(shape: Sequence[int], seed: int, like: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=gen) * scale).to(dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------- accuracy (headline)
@pytest.mark.parametrize(("backend", "dtype"), ACCURACY_PARAMS)
def test_forward_matches_float64_reference(backend: str, dtype: torch.dtype, property_log: Any) -> None:
    @settings(max_examples=_budget(backend, dtype))
    @given(problem=problems(backend, dtype))
    def check(problem: AttentionProblem) -> None:
        comparisons = assert_close_to_reference(_run(problem, backend), problem)
        property_log.case("forward_matches_float64_reference", backend, dtype, comparisons, kind="forward")

    check()


@pytest.mark.parametrize(("backend", "dtype"), ACCURACY_PARAMS)
def test_backward_matches_float64_reference(backend: str, dtype: torch.dtype, property_log: Any) -> None:
    @settings(max_examples=_budget(backend, dtype))
    @given(problem=problems(backend, dtype, backward=True))
    def check(problem: AttentionProblem) -> None:
        comparisons = assert_close_to_reference(_run(problem, backend), problem)  # out, dq, dk, dv
        property_log.case("backward_matches_float64_reference", backend, dtype, comparisons, kind="backward")

    check()


# ---------------------------------------------------------------------------------------- what really ran
def _plan_and_ran(problem: AttentionProblem, policy: Any) -> tuple[str | None, set[str], bool]:
    """(explain()'s backend or None if it raised, the kernels that ran, whether attention() raised)."""
    try:
        planned: str | None = sdpa_flash.explain(*problem.leaves(), **problem.kwargs(), policy=policy).backend
    except BackendUnavailableError:
        planned = None
    raised = []

    def call() -> None:
        try:
            attention_outputs(problem, policy=policy)
        except BackendUnavailableError as exc:
            raised.append(exc)

    return planned, ran_backends(call), bool(raised)


@pytest.mark.parametrize("policy", POLICY_PARAMS)
@settings(max_examples=RAN)
@given(data=st.data(), backward=st.booleans())
def test_explain_names_the_kernel_that_ran(policy: str, data: st.DataObject, backward: bool,
                                           property_log: Any) -> None:
    problem = data.draw(problems(None, backward=backward), label="problem")  # any valid problem
    planned, ran, raised = _plan_and_ran(problem, resolve_policy(policy, fallback="silent"))
    if planned is None:  # explain() raised: so must attention(), before any kernel runs
        assert raised and ran == set(), f"explain() raised, but attention() raised={raised} and ran {ran}"
    else:
        assert not raised and ran == {planned}, f"explain() said {planned}, but {ran} ran"
    property_log.case("explain_names_the_kernel_that_ran", policy)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=RAN)
@given(data=st.data(), backward=st.booleans())
def test_strict_policy_never_runs_another_backend(backend: str, data: st.DataObject, backward: bool,
                                                  property_log: Any) -> None:
    problem = data.draw(problems(None, backward=backward), label="problem")  # whether the backend takes it or not
    planned, ran, raised = _plan_and_ran(problem, backend)
    if planned is None:
        assert raised and ran == set(), f"{backend} cannot run this, yet attention() raised={raised} and ran {ran}"
    else:
        assert planned == backend and not raised and ran == {backend}, f"policy {backend!r}: {ran} ran"
    property_log.case("strict_policy_never_runs_another_backend", backend)


# ------------------------------------------------------------------------------------------- symmetries
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data())
def test_batch_permutation_equivariance(backend: str, data: st.DataObject, property_log: Any) -> None:
    problem = data.draw(problems(backend, backward=True, min_batch=2, max_batch=3), label="problem")
    p = problem.params
    perm = torch.tensor(data.draw(st.permutations(range(p.batch)), label="perm"))
    mask = problem.attn_mask
    if mask is not None and mask.dim() == 4:  # a 2-D (Sq, Sk) mask has no batch dimension
        mask = _select(mask, 0, perm, p.batch)
    moved = dataclasses.replace(problem, query=_select(problem.query, 0, perm, p.batch),
                                key=_select(problem.key, 0, perm, p.batch),
                                value=_select(problem.value, 0, perm, p.batch), attn_mask=mask,
                                grad_out=_select(problem.grad_out, 0, perm, p.batch))
    inverse = torch.argsort(perm)
    back = [_select(t, 0, inverse, p.batch) for t in _run(moved, backend)]
    assert_close_to_reference(back, problem)  # within tolerance: see the module docstring
    property_log.case("batch_permutation_equivariance", backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data())
def test_head_permutation_equivariance(backend: str, data: st.DataObject, property_log: Any) -> None:
    """Permute key/value heads, and the query heads of each group with them (GQA: query head ``g * rep + r``
    reads key/value head ``g``), also permuting the queries inside each group."""
    problem = data.draw(problems(backend, backward=True), label="problem")
    p = problem.params
    assume(p.heads_q > 1)
    rep = p.heads_q // p.heads_kv
    groups = data.draw(st.permutations(range(p.heads_kv)), label="kv heads")
    within = [data.draw(st.permutations(range(rep)), label=f"query heads of group {g}") for g in range(p.heads_kv)]
    kv_perm = torch.tensor(groups)
    q_perm = torch.tensor([groups[g] * rep + within[g][r] for g in range(p.heads_kv) for r in range(rep)])
    hd = _head_dim(problem)

    def heads(t: torch.Tensor | None, perm: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.index_select(hd, perm.to(t.device))

    mask = problem.attn_mask
    if mask is not None and mask.dim() == 4:
        mask = _select(mask, 1, q_perm, p.heads_q)
    moved = dataclasses.replace(problem, query=heads(problem.query, q_perm), key=heads(problem.key, kv_perm),
                                value=heads(problem.value, kv_perm), attn_mask=mask,
                                grad_out=heads(problem.grad_out, q_perm))
    out, dq, dk, dv = _run(moved, backend)
    q_back, kv_back = torch.argsort(q_perm), torch.argsort(kv_perm)
    back = [heads(out, q_back), heads(dq, q_back), heads(dk, kv_back), heads(dv, kv_back)]
    assert_close_to_reference(back, problem)  # type: ignore[arg-type]
    property_log.case("head_permutation_equivariance", backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data())
def test_key_value_permutation_invariance(backend: str, data: st.DataObject, property_log: Any) -> None:
    """Non-causal attention is a function of the *set* of (key, value) pairs: permuting keys and values
    jointly (and a mask's key columns with them; unmasked problems are among those drawn) changes neither the
    output nor dQ, and permutes dK and dV."""
    problem = data.draw(problems(backend, backward=True, causal=(False,), min_seqlen=2), label="problem")
    p = problem.params
    perm = torch.tensor(data.draw(st.permutations(range(p.seqlen_k)), label="key order"))
    sd = _seq_dim(problem)

    def keys(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return t.index_select(sd, order.to(t.device))

    moved = dataclasses.replace(problem, key=keys(problem.key, perm), value=keys(problem.value, perm),
                                attn_mask=_select(problem.attn_mask, -1, perm, p.seqlen_k))
    out, dq, dk, dv = _run(moved, backend)
    back = torch.argsort(perm)
    assert_close_to_reference([out, dq, keys(dk, back), keys(dv, back)], problem)  # summation order changed
    property_log.case("key_value_permutation_invariance", backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_causal_rows_ignore_keys_past_their_limit(backend: str, data: st.DataObject, seed: int,
                                                  property_log: Any) -> None:
    """Replace every key and value from position ``c`` on with large new values: each row whose visible limit
    is before ``c`` (top-left: ``i < c``; bottom-right: ``i + Sk - Sq < c``; and whatever the mask hides) keeps
    its output bitwise, and its dQ bitwise on the CPU / within tolerance on CUDA (see the module docstring)."""
    problem = data.draw(problems(backend, backward=True, causal=(True, "bottom_right")), label="problem")
    p = problem.params
    offset = 0 if p.causal is True or p.causal == "top_left" else p.seqlen_k - p.seqlen_q
    first = 1 + max(0, offset)  # the first row that sees any key sees keys < first
    assume(first < p.seqlen_k)
    cut = data.draw(st.integers(first, p.seqlen_k - 1), label="cut")
    sd = _seq_dim(problem)
    key, value = problem.key.clone(), problem.value.clone()
    for t, s in ((key, seed), (value, seed + 1)):
        tail = t.narrow(sd, cut, p.seqlen_k - cut)
        tail.copy_(_noise(tail.shape, s, t))
    allowed = problem.allowed()
    rows = _in_layout(allowed.any(-1) & ~allowed[..., cut:].any(-1), problem)
    assume(bool(rows.any()))
    clean = _run(problem, backend)
    moved = _run(dataclasses.replace(problem, key=key, value=value), backend)
    assert torch.equal(moved[0][rows], clean[0][rows]), "a row's output changed with keys it cannot see"
    if DEVICE == "cpu":
        assert torch.equal(moved[1][rows], clean[1][rows]), "a row's dQ changed with keys it cannot see"
    else:  # fused backward kernels add dQ up atomically, in no fixed order
        refs = attention_references(problem)
        c = compare_to_reference(moved[1], refs.same_dtype[1], refs.ref64[1], name="dq", magnitude=refs.magnitude[1],
                                 score_magnitude=refs.score_magnitude[1], reduction=refs.reduction,
                                 include=rows.unsqueeze(-1), dtype=p.dtype)
        assert c.passed, str(c)
    property_log.case("causal_rows_ignore_keys_past_their_limit", backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data())
def test_layouts_agree(backend: str, data: st.DataObject, property_log: Any) -> None:
    """``layout="bshd"`` and ``"bhsd"`` are the same problem (the same values, other strides)."""
    problem = data.draw(problems(backend, backward=True), label="problem")
    other = "bshd" if problem.params.layout == "bhsd" else "bhsd"
    moved = dataclasses.replace(problem.params, layout=other).build(DEVICE)
    back = [t.transpose(1, 2) for t in _run(moved, backend)]
    assert_close_to_reference(back, problem)  # within tolerance: strides change the kernels' code paths
    property_log.case("layouts_agree", backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data())
def test_gqa_equals_explicit_repetition(backend: str, data: st.DataObject, property_log: Any) -> None:
    """GQA/MQA equals MHA on K/V repeated ``Hq / Hkv`` times with ``repeat_interleave`` (query head ``h`` reads
    key/value head ``h // rep``); autograd through the repetition folds dK/dV back to the key/value heads."""
    problem = data.draw(problems(backend, backward=True, min_group=2), label="problem")
    rep, hd = problem.params.heads_q // problem.params.heads_kv, _head_dim(problem)

    def repeated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        return sdpa_flash.attention(q, k.repeat_interleave(rep, dim=hd), v.repeat_interleave(rep, dim=hd), **kw)

    outputs = attention_outputs(problem, repeated, policy=backend)
    assert_close_to_reference(outputs, problem)  # within tolerance: dK/dV are summed in another order
    property_log.case("gqa_equals_explicit_repetition", backend)


# -------------------------------------------------------------------------------------- rows that see nothing
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY,  # most problems have no such row (Sq <= Sk and long rows): many are rejected
          suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.filter_too_much])
@given(data=st.data())
def test_rows_that_see_no_key_agree_with_reference(backend: str, data: st.DataObject, property_log: Any) -> None:
    """Rows of queries that see no key (a mask row of False, bottom-right causal with ``Sq > Sk``) are left out
    of the accuracy comparison; here every backend must give exactly what the float64 reference gives there
    (0 on torch 2.13), and dQ exactly the reference's (0)."""
    # bottom-right causal hides the first Sq - Sk rows whenever Sq > Sk; masks hide more (on short rows)
    problem = data.draw(problems(backend, backward=True, causal=("bottom_right",)), label="problem")
    hidden = ~problem.visible_rows()
    assume(bool(hidden.any()))
    out, dq, *_ = _run(problem, backend)
    refs = attention_references(problem)
    for name, got, ref in (("out", out, refs.ref64[0]), ("dq", dq, refs.ref64[1])):
        assert torch.equal(got[hidden].double(), ref[hidden]), (
            f"{name} on rows that see no key: {got[hidden].flatten()[:8].tolist()} (reference "
            f"{ref[hidden].flatten()[:8].tolist()})")
    property_log.case("rows_that_see_no_key_agree_with_reference", backend)


# ------------------------------------------------------------------------------------------------ bad data
@dataclasses.dataclass(frozen=True)
class BadInput:
    """One NaN or infinity written into a query or key row (in (B, H, S, D) terms), or into one element of it."""

    tensor: str
    batch: int
    head: int
    position: int
    element: int | None
    value: float

    def apply(self, problem: AttentionProblem) -> AttentionProblem:
        t = getattr(problem, self.tensor).clone()
        row = (self.batch, self.head, self.position) if problem.params.layout == "bhsd" else (
            self.batch, self.position, self.head)
        t[row if self.element is None else (*row, self.element)] = self.value
        return dataclasses.replace(problem, **{self.tensor: t})

    def rows(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows that see it, rows of its (batch, key/value head) slice), each (B, Hq, Sq)."""
        p = problem.params
        sees = torch.zeros(p.batch, p.heads_q, p.seqlen_q, dtype=torch.bool, device=problem.device)
        if self.tensor == "query":
            sees[self.batch, self.head, self.position] = True
            return sees, sees.clone()
        rep = p.heads_q // p.heads_kv
        heads = slice(self.head * rep, (self.head + 1) * rep)
        sees[self.batch, heads] = problem.allowed()[self.batch, heads, :, self.position]
        block = torch.zeros_like(sees)
        block[self.batch, heads] = True
        return sees, block


@st.composite
def bad_inputs(draw: Any, problem: AttentionProblem) -> BadInput:
    p = problem.params
    tensor = draw(st.sampled_from(("query", "key")))
    heads, length = (p.heads_q, p.seqlen_q) if tensor == "query" else (p.heads_kv, p.seqlen_k)
    return BadInput(tensor, draw(st.integers(0, p.batch - 1)), draw(st.integers(0, heads - 1)),
                    draw(st.integers(0, length - 1)), draw(st.one_of(st.none(), st.integers(0, p.head_dim - 1))),
                    draw(st.sampled_from((float("nan"), float("inf"), float("-inf")))))


# PyTorch's CPU flash kernel answers 0 for some rows whose scores are NaN/inf (see the module docstring).
_ZEROES_BAD_ROWS = {("cpu", "flash"): "pytorch/pytorch#141128"}


def _every_visible_score_is_minus_inf(problem: AttentionProblem) -> torch.Tensor:
    """``(B, Hq, Sq)``: rows that see at least one key and whose every visible float64 score ``q.k`` is ``-inf``."""
    q, k = (t.detach().double() for t in (problem.query, problem.key))
    if problem.params.layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    allowed = problem.allowed()
    scores = q @ k.transpose(-1, -2)
    return allowed.any(-1) & ((scores == float("-inf")) | ~allowed).all(-1)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data())
def test_bad_input_reaches_every_row_that_sees_it(backend: str, data: st.DataObject, property_log: Any) -> None:
    """A NaN/Inf in a query row or key row is not masked: each row that sees it gives what the float64
    reference gives there (NaN where it is NaN, the same infinity, a finite value within tolerance).

    Weakened for CPU flash (finding, pytorch/pytorch#141128): a whole row of zeros where the reference row is
    not finite is tolerated; any other difference fails.

    Weakened for every backend (finding, H200): a row whose every visible score is ``-inf`` *because of the bad
    value* (a ``-inf`` query element against positive key elements, the other keys hidden) has two defensible
    answers, and kernels differ: 0 (no key gets weight: the safe softmax) or NaN (a hidden key's score is
    ``-inf * negative = +inf``, and an additive mask makes it ``+inf + -inf = NaN``). The CUDA flash and efficient
    kernels answered NaN where the math reference gave 0; the chunked backend, which selects instead of adding
    the mask, 0 where the reference gave NaN. Neither hides bad data the row could see finitely, so such a row may
    be all NaN or all 0 (the README says so); any other value fails.
    """
    problem = data.draw(problems(backend), label="problem")
    bad = data.draw(bad_inputs(problem), label="bad")
    poisoned = bad.apply(problem)
    out = _run(poisoned, backend)[0]
    refs = attention_references(poisoned, backward=False)
    sees = _in_layout(bad.rows(problem)[0] & problem.visible_rows(layout="bhsd"), problem)
    if (DEVICE, backend) in _ZEROES_BAD_ROWS:
        zeroed = sees & (out == 0).all(-1) & ~torch.isfinite(refs.ref64[0]).all(-1)
        event(f"rows zeroed instead of non-finite ({_ZEROES_BAD_ROWS[(DEVICE, backend)]}): {bool(zeroed.any())}")
        sees = sees & ~zeroed
    swamped = sees & _in_layout(_every_visible_score_is_minus_inf(poisoned), problem)
    if swamped.any():
        as_nan, as_zero = swamped & torch.isnan(out).all(-1), swamped & (out == 0).all(-1)
        event(f"rows whose visible scores are all -inf: {'NaN' if as_nan.any() else ''}{'0' if as_zero.any() else ''}")
        sees = sees & ~as_nan & ~as_zero
    c = compare_to_reference(out, refs.same_dtype[0], refs.ref64[0], name="out", magnitude=refs.magnitude[0],
                             score_magnitude=refs.score_magnitude[0], reduction=refs.reduction,
                             include=sees.unsqueeze(-1), dtype=problem.dtype)
    assert c.passed, f"{bad}: {c}"
    property_log.case("bad_input_reaches_every_row_that_sees_it", backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=SECONDARY)
@given(data=st.data())
def test_bad_input_does_not_reach_rows_that_cannot_see_it(backend: str, data: st.DataObject,
                                                          property_log: Any) -> None:
    """Rows that do not see the NaN/Inf are bitwise what they are without it.

    Weakened (finding): for a bad *key* under an additive mask — the math and chunked backends always, any
    backend with an explicit or materialised mask — only rows outside the key's (batch, key/value head) slice
    are checked, because ``NaN + -inf = NaN`` carries it to the hidden rows of that slice (the float64 reference
    does the same).
    """
    # mostly unmasked: only there can a bad key stay out of the hidden rows of its own slice
    problem = data.draw(problems(backend, masks=("none", "none", "none", "bool", "float", "key_padding")),
                        label="problem")
    bad = data.draw(bad_inputs(problem), label="bad")
    sees, block = bad.rows(problem)
    strict = bad.tensor == "query"
    if not strict and backend in _STRICT_SELECTION and problem.attn_mask is None:
        plan = sdpa_flash.explain(*problem.leaves(), **problem.kwargs(), policy=backend)
        strict = plan.prep.causal_mask is None  # the kernel's own causal masking
    spared = _in_layout(problem.visible_rows(layout="bhsd") & ~(sees if strict else block), problem)
    assume(bool(spared.any()))
    event(f"{bad.tensor}: {'strict' if strict else 'outside its slice only'}")
    clean = _run(problem, backend)[0]
    out = _run(bad.apply(problem), backend)[0]
    assert torch.equal(out[spared], clean[spared]), (
        f"{bad} reached rows that cannot see it ({'strict' if strict else 'outside its slice'}): "
        f"{out[spared].flatten()[:8].tolist()}")
    property_log.case("bad_input_does_not_reach_rows_that_cannot_see_it", backend)


@pytest.mark.skipif(DEVICE != "cpu", reason="PyTorch's CPU flash kernel")
def test_cpu_flash_keeps_nan_of_a_query_row() -> None:
    """pytorch/pytorch#141128: the CPU flash kernel answers 0 for a NaN query row with few keys and no mask. The
    denylist reroutes such calls to math, which keeps the NaN, without a fallback warning; ``explain()`` names the
    issue, and a strict flash policy refuses with the same reason rather than hide the NaN. (tests/test_numerics.py
    holds the canary that checks the entry against the installed torch's kernel.)"""
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    q[0, 0, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reroute is not a fallback: no warning
        out = sdpa_flash.attention(q, k, v)
    assert out[0, 0, 1].isnan().all(), f"the NaN query row gave {out[0, 0, 1].tolist()}"
    assert torch.isfinite(out[0, 0, [0, 2]]).all() and torch.isfinite(out[1:]).all()
    plan = sdpa_flash.explain(q, k, v)
    assert plan.backend == "math" and not plan.fallback and "pytorch/pytorch#141128" in plan.reasons["flash"][0]
    with pytest.raises(sdpa_flash.BackendUnavailableError, match="pytorch/pytorch#141128"):
        sdpa_flash.attention(q, k, v, policy="flash")


# ------------------------------------------------------------------------------------------------- varlen
@pytest.fixture(scope="module")
def varlen() -> Any:
    return pytest.importorskip("sdpa_flash.varlen", reason="sdpa_flash.varlen has not landed yet")


def _per_sequence(module: Any, out: Any, lengths: Sequence[int]) -> list[torch.Tensor]:
    """varlen_attention's output as one ``(L_i, H, Dv)`` tensor per sequence."""
    if isinstance(out, torch.Tensor):
        return list(out.split(list(lengths)))
    unpack = getattr(out, "unpack", None)
    return list(unpack() if callable(unpack) else module.unpack(out))


@st.composite
def _sequences(draw: Any, backend: str) -> list[AttentionProblem]:
    """2 to 4 problems of one dtype, head counts (GQA too), head dim and causal kind, each of batch 1 in layout
    (1, L, H, D); query and key lengths may differ per sequence (cross-attention, a longer KV cache). Each is one
    the strict policy ``backend`` runs as a dense call, so the batch is one it must run (a batch with a sequence it
    cannot run raises, tested in tests/test_varlen.py)."""
    req = BACKENDS[backend].requirements(DEVICE)
    assert req is not None
    sizes = _SIZES[DEVICE]
    dims = sizes.get("head_dims") or range(1, sizes["max_head_dim"] + 1)
    heads_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from(list(dims)))
    base = ProblemParams(draw(st.sampled_from(sorted(req.dtypes, key=str))), heads_q=heads_kv * group,
                         heads_kv=heads_kv, head_dim=head_dim, head_dim_v=head_dim,
                         causal=draw(st.sampled_from((False, True, "bottom_right"))),
                         scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))), layout="bshd",
                         seed=draw(st.integers(0, 2**31 - 1)))
    shortest = _shortest_claimed(backend, base)
    assume(shortest is not None)
    length = st.integers(shortest, sizes["max_seqlen"])  # type: ignore[arg-type]
    lengths = draw(st.lists(st.tuples(length, length), min_size=2, max_size=4))
    pairs = []
    for lq, lk in lengths:  # each sequence one the backend claims (cuDNN: no L_k = 1; FLASH: no top-left L_q > L_k)
        pair = next((c for c in ((lq, lk), (min(lq, lk), max(lq, lk)), (lq, lq), (lq + 1, lq + 1))
                     if _claims(backend, dataclasses.replace(base, seqlen_q=c[0], seqlen_k=c[1]))), None)
        assume(pair is not None)
        pairs.append(pair)
    return [dataclasses.replace(base, seqlen_q=lq, seqlen_k=lk, seed=base.seed + i).build(DEVICE)
            for i, (lq, lk) in enumerate(pairs)]


def _shortest_claimed(backend: str, base: ProblemParams) -> int | None:
    """The shortest square sequence the strict policy ``backend`` runs with ``base``'s dtype and causal kind: 1 for
    most, 16 keys for CPU flash (8 in float64), whose shorter calls the denylist sends to math
    (pytorch/pytorch#141128); those are covered by the math backend's run of these properties."""
    return next((n for n in range(1, _SIZES[DEVICE]["max_seqlen"] + 1)
                 if _claims(backend, dataclasses.replace(base, seqlen_q=n, seqlen_k=n))), None)


def _claims(backend: str, params: ProblemParams) -> bool:
    """The strict policy ``backend`` plans this problem as a dense call."""
    try:
        dense_plan(params.spec(DEVICE), sdpa_flash.capabilities(DEVICE), resolve_policy(backend))
    except BackendUnavailableError:
        return False
    return True


def _varlen_run(module: Any, seqs: Sequence[AttentionProblem], backend: str) -> list[torch.Tensor]:
    p = seqs[0].params
    packed = [module.pack([getattr(s, name)[0] for s in seqs]) for name in ("query", "key", "value")]
    out = module.varlen_attention(*packed, causal=p.causal, scale=p.scale, policy=backend)
    return _per_sequence(module, out, [s.params.seqlen_q for s in seqs])


def _varlen_runs(module: Any, backend: str) -> None:
    """Skip when varlen_attention cannot run ``backend`` at all here (it may cover fewer backends), probed with two
    sequences of lengths the backend runs as dense calls (the shortest and two more)."""
    base = ProblemParams(min(BACKENDS[backend].requirements(DEVICE).dtypes, key=str),  # type: ignore[union-attr]
                         head_dim=32, head_dim_v=32, layout="bshd")
    shortest = _shortest_claimed(backend, base)
    if shortest is None:
        pytest.skip(f"{backend} runs no dense call of {dtype_name(base.dtype)} here")
    seqs = [dataclasses.replace(base, seqlen_q=n, seqlen_k=n).build(DEVICE) for n in (shortest, shortest + 2)]
    try:
        _varlen_run(module, seqs, backend)
    except BackendUnavailableError as exc:
        pytest.skip(f"varlen_attention does not run {backend} here: {str(exc).splitlines()[0]}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_varlen_equals_per_sequence_attention(backend: str, varlen: Any, property_log: Any) -> None:
    _varlen_runs(varlen, backend)

    @settings(max_examples=SECONDARY)
    @given(seqs=_sequences(backend))
    def check(seqs: list[AttentionProblem]) -> None:
        for i, (seq, out) in enumerate(zip(seqs, _varlen_run(varlen, seqs, backend), strict=True)):
            try:
                assert_close_to_reference(out.unsqueeze(0), seq)
            except AssertionError as exc:
                raise AssertionError(f"sequence {i} of {len(seqs)}: {exc}") from None
        property_log.case("varlen_equals_per_sequence_attention", backend)

    check()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_varlen_sequences_do_not_see_each_other(backend: str, varlen: Any, property_log: Any) -> None:
    """New values in one sequence leave every other sequence's output bitwise as it was: the packed positions do
    not move, and no kernel reads (or adds more than exact zeros from) another sequence's keys."""
    _varlen_runs(varlen, backend)

    @settings(max_examples=SECONDARY)
    @given(seqs=_sequences(backend), data=st.data())
    def check(seqs: list[AttentionProblem], data: st.DataObject) -> None:
        j = data.draw(st.integers(0, len(seqs) - 1), label="changed sequence")
        changed = list(seqs)
        changed[j] = dataclasses.replace(seqs[j].params, seed=seqs[j].params.seed + 7919).build(DEVICE)
        before, after = _varlen_run(varlen, seqs, backend), _varlen_run(varlen, changed, backend)
        for i in range(len(seqs)):
            if i != j:
                assert torch.equal(before[i], after[i]), f"sequence {i} changed when sequence {j} did"
        property_log.case("varlen_sequences_do_not_see_each_other", backend)

    check()
