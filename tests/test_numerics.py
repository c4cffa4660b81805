"""Numerics at the edges, on every CPU backend (flash, math, chunked): NaN/Inf in the inputs, query rows that
see no key, and float16 range.

What is guaranteed (and what these tests check):

* a non-finite input is never masked away: every output element whose inputs it can see is NaN/inf, in every
  backend, as in PyTorch's math backend;
* a finite output is always the right answer: where a backend's output is finite it equals the answer computed
  from the keys that row can see (within the tolerance rule of ``sdpa_flash.testing``);
* it never leaves its (batch, key/value head): other batch elements and heads are untouched.

PyTorch's CPU flash kernel has one exception (pytorch/pytorch#141128; torch 2.11.0, 2.13.0 and 2.14.1 measured by
``benchmarks/cpu_flash_nan_probe.py``): without an ``attn_mask`` and with a key block shorter than one SIMD vector
(fewer than 16 keys in float32/bfloat16/float16, 8 in float64, on AVX-512; half that on AVX2), a query row *all* of
whose visible scores are NaN gives 0 in the forward: the scalar tail of its fused max reduction skips NaN. sdpa_flash
cannot see that without reading the data, so the built-in denylist routes exactly those calls (tiny ones) to math.
``test_cpu_flash_nan_canary`` checks on every run, against the installed torch's own kernel, that the entry covers
every call the kernel gets wrong, and says so when a torch release fixes it.

Whether a NaN/inf also reaches rows of the same (batch, head) that cannot see it depends on the kernel: PyTorch's
math backend spreads it (it adds the mask to a NaN score, and multiplies a NaN value by a probability of 0),
the chunked backend does within one tile, and PyTorch's CPU flash kernel does not for keys that only the causal
flag hides (it overwrites those scores with -inf). That part is not guaranteed.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sdpa_flash
from sdpa_flash.planner import DenylistEntry
from sdpa_flash.testing import assert_close_to_reference, compare_to_reference, reference_attention

BACKENDS = ("flash", "math", "chunked")
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
B, HQ, HKV, S, D = 2, 4, 2, 16, 8  # 16 keys: CPU flash runs (fewer are denylisted, module docstring)


def _allowed(sq: int, sk: int, causal: bool | str, mask: torch.Tensor | None) -> torch.Tensor:
    allowed = torch.ones(B, HQ, sq, sk, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask != float("-inf"))
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    if causal is True:
        allowed = allowed & (j <= i)
    elif causal == "bottom_right":
        allowed = allowed & (j <= i + sk - sq)
    return allowed


def visible_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool | str,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """float64 attention in which each row reads only the keys and values it can see (written out, not SDPA).

    A row whose visible scores are all -inf (masked, or -inf by the data) gives 0, as every backend and PyTorch's
    math backend do.
    """
    q, k, v = q.double(), k.double().repeat_interleave(HQ // HKV, 1), v.double().repeat_interleave(HQ // HKV, 1)
    allowed = _allowed(q.shape[2], k.shape[2], causal, mask)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask.double().masked_fill(~allowed[0, 0], 0.0)
    scores = scores.masked_fill(~allowed, float("-inf"))  # a hidden score is -inf whatever it computed to
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead | ~allowed, 0.0)
    terms = torch.where(allowed[..., None], p[..., None] * v[:, :, None, :, :], 0.0)  # (B, H, Sq, Sk, D)
    return terms.sum(-2)


def all_nan_rows(q: torch.Tensor, k: torch.Tensor, causal: bool | str, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Hq, Sq): rows that see some key and whose every visible score is NaN."""
    scores = q.double() @ k.double().repeat_interleave(HQ // HKV, 1).transpose(-1, -2)
    allowed = _allowed(q.shape[2], k.shape[2], causal, mask)
    return allowed.any(-1) & (scores.isnan() | ~allowed).all(-1)


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, S, D, generator=g), torch.randn(B, HKV, S, D, generator=g),
            torch.randn(B, HKV, S, D, generator=g))


_MASK = torch.ones(S, S, dtype=torch.bool)
_MASK[:, 2] = False  # key 2 hidden from every row
_MASK[4, :] = False  # row 4 sees no key
_FLOAT_MASK = torch.zeros(S, S).masked_fill(~_MASK, float("-inf"))
MASKS = {"nomask": None, "boolmask": _MASK, "floatmask": _FLOAT_MASK}
POISON = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
WHERE = {"query-row-1": ("q", 1), "key-2": ("k", 2), "key-4": ("k", 4), "value-2": ("v", 2), "value-5": ("v", 5)}


@pytest.mark.parametrize("where", WHERE.values(), ids=WHERE.keys())
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("poison", POISON.values(), ids=POISON.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_propagate_and_stay_contained(backend: str, poison: float, causal: bool,
                                                        mask: torch.Tensor | None, where: tuple[str, int]) -> None:
    q, k, v = _inputs(seed=2 * list(WHERE.values()).index(where) + causal)  # not hash(): str hashes vary by process
    tensor, pos = where
    {"q": q, "k": k, "v": v}[tensor][0, 0, pos, 1] = poison  # batch 0, (query or key/value) head 0
    out = sdpa_flash.attention(q, k, v, causal=causal, attn_mask=mask, policy=backend)
    ideal = visible_only(q, k, v, causal, mask)
    cand_bad, ideal_bad = torch.isfinite(out).logical_not(), torch.isfinite(ideal).logical_not()
    # never masked away
    assert not (ideal_bad & ~cand_bad).any(), f"{backend} gave finite outputs where the visible inputs are not"
    # contained in (batch 0, the query heads of key/value head 0)
    group = HQ // HKV if tensor != "q" else 1
    outside = torch.ones(B, HQ, dtype=torch.bool)
    outside[0, :group] = False
    assert torch.isfinite(out[outside]).all(), f"{backend} spread a non-finite value to another batch or head"
    # finite outputs are right
    same = reference_attention(q, k, v, causal=causal, attn_mask=mask, dtype=None)
    cmp = compare_to_reference(out, same, ideal, include=~cand_bad & torch.isfinite(ideal))
    assert cmp.passed, str(cmp)


_NAN_ENTRY = next(e for e in sdpa_flash.denylist() if e.source == "pytorch/pytorch#141128")


def _kernel_zeroes_the_nan_row(dtype: torch.dtype, sk: int, causal: bool, mask: bool) -> bool:
    """Whether the installed torch's CPU flash kernel itself (no sdpa_flash in between) answers 0 for a query row
    whose every visible score is NaN."""
    sq = min(sk, 4)
    g = torch.Generator().manual_seed(sk)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g).to(dtype) for n in (sq, sk, sk))
    q[0, 0, 0, 3] = float("nan")
    attn_mask = torch.ones(sq, sk, dtype=torch.bool) if mask else None
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    return bool((out[0, 0, 0] == 0).all())


def _spec(dtype: torch.dtype, sk: int, causal: bool, mask: bool) -> sdpa_flash.AttentionSpec:
    return sdpa_flash.AttentionSpec("cpu", dtype, 1, 2, 2, min(sk, 4), sk, 8, 8, causal="top_left" if causal else None,
                                    mask="bool" if mask else None)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cpu_flash_nan_canary(dtype: torch.dtype, record_property: pytest.RecordProperty) -> None:
    """Canary for pytorch/pytorch#141128, run against whatever torch is installed: every call its CPU flash kernel
    answers with 0 for an all-NaN row must be one the denylist entry vetoes (otherwise the NaN would vanish); and
    if the kernel no longer does it anywhere while the entry's torch range still includes this torch, the entry is
    vetoing flash for nothing: the test says so (a warning and a recorded property) so the range can be narrowed."""
    caps = sdpa_flash.capabilities("cpu")
    cases = [(sk, causal, mask) for sk in range(1, 25) for causal in (False, True) for mask in (False, True)
             if not (causal and mask)]
    zeroed = [c for c in cases if _kernel_zeroes_the_nan_row(dtype, *c)]
    vetoed = {c for c in cases if _NAN_ENTRY.matches(_spec(dtype, *c), caps)}
    unguarded = [c for c in zeroed if c not in vetoed]
    assert not unguarded, (f"torch {torch.__version__}'s CPU flash kernel zeroes a NaN row at (Sk, causal, mask) = "
                           f"{unguarded}, which the denylist entry for {_NAN_ENTRY.source} does not cover: widen it")
    finding = f"torch {torch.__version__}: kernel zeroes NaN rows at Sk={sorted({c[0] for c in zeroed})}"
    record_property("pytorch_141128", finding)
    if not zeroed and vetoed:
        warnings.warn(f"{_NAN_ENTRY.source} looks fixed in torch {torch.__version__} ({dtype}): the denylist entry "
                      f"(torch{_NAN_ENTRY.torch}) still vetoes CPU flash for {len(vetoed)} of these calls; narrow its "
                      "range", UserWarning, stacklevel=1)
    for sk, causal, mask in cases:  # what users get: the NaN is kept wherever the row sees it
        g = torch.Generator().manual_seed(sk)
        q, k, v = (torch.randn(1, 2, n, 8, generator=g).to(dtype) for n in (min(sk, 4), sk, sk))
        q[0, 0, 0, 3] = float("nan")
        out = sdpa_flash.attention(q, k, v, causal=causal, attn_mask=torch.ones(min(sk, 4), sk, dtype=torch.bool)
                                   if mask else None)
        assert out[0, 0, 0].isnan().all(), (sk, causal, mask)


def test_the_nan_entry_is_the_reason_explain_gives() -> None:
    """Under auto the entry reroutes tiny unmasked CPU calls to math quietly (``reroute=True``: not a fallback),
    and ``explain()`` names it; 16 keys, or a mask, run on flash."""
    assert isinstance(_NAN_ENTRY, DenylistEntry) and _NAN_ENTRY.device_type == "cpu" and _NAN_ENTRY.reroute
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16, generator=g) for _ in range(3))
    p = sdpa_flash.explain(q, k, v)
    assert p.backend == "math" and not p.fallback
    reason = p.reasons["flash"][0]
    assert reason.startswith("denylisted: PyTorch's CPU flash kernel gives 0 instead of NaN"), reason
    assert reason.endswith(" [pytorch/pytorch#141128]"), reason
    assert sdpa_flash.explain(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool)).backend == "flash"
    q, k, v = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    assert sdpa_flash.explain(q, k, v).backend == "flash"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_row_whose_visible_scores_are_all_minus_inf_gives_zero(backend: str) -> None:
    """-inf in a query whose every visible key makes its score -inf: the softmax has nothing to weigh, and every
    backend (PyTorch's math one included) gives 0 for the row, as for a row that a mask hides everything from."""
    q, k, v = _inputs(seed=3)
    k = k.abs() + 0.1
    q[0, 0, 1, 0] = float("-inf")
    for causal in (False, True):
        out = sdpa_flash.attention(q, k, v, causal=causal, policy=backend)
        assert torch.equal(out[0, 0, 1], torch.zeros(D))
        torch.testing.assert_close(out, reference_attention(q, k, v, causal=causal, dtype=None))


# ------------------------------------------------------------------------------- rows that see no key
FULLY_MASKED = {
    "bool-row": lambda sq, sk: (torch.ones(B, 1, sq, sk, dtype=torch.bool).index_fill_(2, torch.tensor([2]), False),
                                False),
    "float-row": lambda sq, sk: (torch.zeros(sq, sk).index_fill_(0, torch.tensor([2]), float("-inf")), False),
    "bool-row-and-causal": lambda sq, sk: (torch.rand(B, HQ, sq, sk, generator=torch.Generator().manual_seed(0))
                                           .lt(0.7).index_fill_(2, torch.tensor([2]), False), True),
    "bottom-right-sq-gt-sk": lambda sq, sk: (None, "bottom_right"),
}


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", FULLY_MASKED.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_finite_gradients(backend: str, kind: str, dtype: torch.dtype,
                                                               layout: str) -> None:
    """The defined output for a query row that sees no key: 0 (PyTorch's math backend on torch 2.13 gives 0
    too), with dQ 0 for that row and every gradient finite — on every backend, dtype and layout."""
    sq, sk = (7, 4) if kind == "bottom-right-sq-gt-sk" else (7, 7)
    mask, causal = FULLY_MASKED[kind](sq, sk)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    g = torch.Generator().manual_seed(1)
    shape = (lambda h, s: (B, h, s, D)) if layout == "bhsd" else (lambda h, s: (B, s, h, D))
    q = torch.randn(shape(HQ, sq), generator=g).to(dtype).requires_grad_()
    k = torch.randn(shape(HKV, sk), generator=g).to(dtype).requires_grad_()
    v = torch.randn(shape(HKV, sk), generator=g).to(dtype).requires_grad_()
    out = sdpa_flash.attention(q, k, v, attn_mask=mask, causal=causal, layout=layout, policy=backend)
    out.backward(torch.randn(out.shape, generator=g).to(dtype))
    dead = ~_allowed(sq, sk, causal, mask).any(-1)  # (B, Hq, Sq)
    if layout == "bshd":
        dead = dead.transpose(1, 2)
    assert dead.any()
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert torch.equal(q.grad[dead], torch.zeros_like(q.grad[dead]))  # type: ignore[index]
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------------------- float16 range
def _fp16_case(dtype: torch.dtype, qs: float = 1.0, ks: float = 1.0, vs: float = 1.0, gs: float = 1.0,
               scale: float | None = None, limit: float = 6e4) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inputs drawn at the given scales, clamped to +-limit and rounded to ``dtype``, and an upstream gradient."""
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 2, 48, 32, generator=g) * s for s in (qs, ks, vs)]
    grad = (torch.randn(2, 2, 48, 32, generator=g) * gs).clamp(-limit, limit).to(dtype)
    return [x.clamp(-limit, limit).to(dtype) for x in t], grad


FP16_CASES = {
    "normal": {},
    "large-logits": {"qs": 100.0, "ks": 100.0},  # |q.k| ~ 1e5
    "huge-logits": {"qs": 3e4, "ks": 3e4},  # q, k at the float16 limit: |q.k| ~ 1e10
    "huge-scale": {"scale": 1e4},
    "values-at-limit": {"vs": 3e4},  # |v| up to 6e4
    "grad-at-limit": {"gs": 3e4},
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", FP16_CASES.values(), ids=FP16_CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_forward_never_overflows(backend: str, case: dict[str, float], dtype: torch.dtype) -> None:
    """Scores and the softmax are computed in float32 and max-subtracted, and the output is a convex combination
    of value rows: for finite inputs the forward is finite and within tolerance on every CPU backend."""
    (q, k, v), _ = _fp16_case(dtype, **case)
    scale = case.get("scale")
    out = sdpa_flash.attention(q, k, v, scale=scale, policy=backend)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, reference_attention(q, k, v, scale=scale, dtype=None),
                              reference_attention(q, k, v, scale=scale))


_F16_MAX = torch.finfo(torch.float16).max


@pytest.mark.parametrize("backend", ["math", "chunked"])
@pytest.mark.parametrize("case", [{"vs": 3e4}, {"gs": 3e4}, {"vs": 1e3, "gs": 1e3}],
                         ids=["values-at-limit", "grad-at-limit", "gradient-beyond-range"])
def test_float16_gradients_overflow_only_where_the_true_gradient_does(backend: str, case: dict[str, float]) -> None:
    """math and chunked keep the backward in float32 and round once: a gradient is inf exactly where its true
    value is beyond float16's range (65504), and finite elsewhere."""
    (q, k, v), grad = _fp16_case(torch.float16, **case)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(sdpa_flash.attention(*leaves, policy=backend), leaves, grad)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    refs = torch.autograd.grad(reference_attention(*leaves64), leaves64, grad.double())
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs, strict=True):
        assert torch.isfinite(g[r.abs() < 0.95 * _F16_MAX]).all(), f"{name}: inf where the true gradient fits"
        assert not torch.isfinite(g[r.abs() > 1.05 * _F16_MAX]).any(), f"{name}: finite where it cannot be"


def test_cpu_flash_float16_backward_overflows_only_where_its_intermediate_does() -> None:
    """PyTorch's CPU flash kernel stores dS = P o (dP - rowsum(dO o O)) in float16 before the dQ and dK
    products: where |dS| exceeds 65504 (large |V| with unit dO suffices) dQ/dK of that (batch, head) become
    inf/NaN, though math's are finite. Checked here as that implication: non-finite flash gradients only in
    (batch, head) pairs whose exact dS, or exact gradient, is beyond float16's range."""
    (q, k, v), grad = _fp16_case(torch.float16, vs=3e4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dq, dk, dv = torch.autograd.grad(sdpa_flash.attention(*leaves, policy="flash"), leaves, grad)
    q64, k64, v64, g64 = (t.double() for t in (q, k, v, grad))
    p = torch.softmax(q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    o = p @ v64
    ds = p * (g64 @ v64.transpose(-1, -2) - (g64 * o).sum(-1, keepdim=True))
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    refs = torch.autograd.grad(reference_attention(*leaves64), leaves64, g64)
    beyond = ds.abs().amax((-1, -2)) > _F16_MAX
    beyond |= torch.stack([r.abs().amax((-1, -2)) > _F16_MAX for r in refs]).any(0)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        bad = torch.isfinite(g).logical_not().any(-1).any(-1)  # (B, H)
        assert not (bad & ~beyond).any(), f"{name}: non-finite in a (batch, head) whose dS and gradient fit"
