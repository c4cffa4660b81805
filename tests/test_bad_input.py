"""Bad input: every class of invalid argument raises ``AttentionInputError`` (a ``ValueError``) with a message
naming the problem, from ``attention()`` and from ``explain()`` alike, and no bad call poisons the per-call
cache that ``attention()`` keeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import sdpa_flash
from sdpa_flash import AttentionInputError
from sdpa_flash.testing import reference_attention

B, H, S, D = 2, 4, 8, 16


def qkv(b: int = B, hq: int = H, hkv: int = H, sq: int = S, sk: int = S, d: int = D, dv: int = D,
        dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, dv, generator=gen, dtype=dtype))


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _with(**kwargs: Any) -> Callable[[], Call]:
    return lambda: (qkv(), kwargs)


def _args(make: Callable[[], tuple[Any, Any, Any]], **kwargs: Any) -> Callable[[], Call]:
    return lambda: (make(), kwargs)


def _mixed() -> tuple[Any, Any, Any]:
    q, k, v = qkv()
    return q, k.double(), v.double()


# id -> (builder of (args, kwargs), regex the message must match)
BAD: dict[str, tuple[Callable[[], Call], str]] = {
    "query-not-tensor": (_args(lambda: (qkv()[0].tolist(), *qkv()[1:])),
                         r"Expected query to be a torch\.Tensor, but got list"),
    "key-not-tensor": (_args(lambda: (qkv()[0], None, qkv()[2])),
                       r"Expected key to be a torch\.Tensor, but got NoneType"),
    "rank-3": (_args(lambda: (qkv()[0][0], *qkv()[1:])), r"Expected query to be 4-D .* but got a 3-D tensor"),
    "rank-5": (_args(lambda: (qkv()[0].unsqueeze(0), *qkv()[1:])), r"Expected query to be 4-D .* but got a 5-D tensor"),
    "batch-mismatch": (_args(lambda: (qkv()[0], *qkv(b=3)[1:])), r"one batch size, but got 2, 3, 3"),
    "kv-heads-mismatch": (_args(lambda: (*qkv()[:2], qkv(hkv=2)[2])),
                          r"key and value to have the same number of heads, but got 4 and 2"),
    "kv-seqlen-mismatch": (_args(lambda: (*qkv()[:2], qkv(sk=5)[2])),
                           r"key and value to have the same sequence length, but got 8 and 5"),
    "qk-head-dim-mismatch": (_args(lambda: (qkv()[0], *qkv(d=8)[1:])),
                             r"query and key to have the same head dim, but got 16 and 8"),
    "zero-head-dim": (_args(lambda: qkv(d=0, dv=0)), r"Expected non-zero head dims"),
    "zero-value-head-dim": (_args(lambda: qkv(dv=0)), r"Expected non-zero head dims.* value head dim 0"),
    "gqa-not-integral": (_args(lambda: qkv(hq=6, hkv=4)),
                         r"query heads \(6\) to be a multiple of the key/value heads \(4\)"),
    "integer-dtype": (_args(lambda: tuple(t.to(torch.int64) for t in qkv())),
                      r"Expected query to be a floating-point tensor .* dtype=int64"),
    "mixed-dtypes": (_args(_mixed), r"one dtype, but got float32, float64, float64"),
    "bad-layout": (_with(layout="bsdh"), r"Expected layout to be 'bhsd' .* got 'bsdh'"),
    "causal-sideways": (_with(causal="sideways"), r"Expected causal to be False, True, .* got 'sideways'"),
    "causal-2": (_with(causal=2), r"Expected causal to be .* but got 2 instead"),
    "dropout-negative": (_with(dropout_p=-0.1), r"Expected dropout_p to be a float in \[0, 1\), but got -0\.1"),
    "dropout-one": (_with(dropout_p=1.0), r"Expected dropout_p .* but got 1\.0"),
    "dropout-str": (_with(dropout_p="0.1"), r"Expected dropout_p .* but got '0\.1'"),
    "dropout-bool": (_with(dropout_p=True), r"Expected dropout_p .* but got True"),
    "scale-nan": (_with(scale=float("nan")), r"Expected scale to be None or a finite float, but got nan"),
    "scale-inf": (_with(scale=float("inf")), r"Expected scale to be None or a finite float, but got inf"),
    "scale-str": (_with(scale="0.3"), r"Expected scale to be None or a finite float"),
    "mask-int64": (_with(attn_mask=torch.ones(S, S, dtype=torch.int64)),
                   r"Expected attn_mask to be boolean or of the query's dtype float32, but got dtype=int64"),
    "mask-float64-for-float32": (_with(attn_mask=torch.zeros(S, S, dtype=torch.float64)),
                                 r"query's dtype float32, but got dtype=float64"),
    "mask-not-broadcastable": (_with(attn_mask=torch.ones(3, S, S, dtype=torch.bool)),
                               r"Expected attn_mask to broadcast to \(B, Hq, Sq, Sk\) = \(2, 4, 8, 8\), .*\(3, 8, 8\)"),
    "mask-wrong-key-len": (_with(attn_mask=torch.ones(S, S + 1, dtype=torch.bool)),
                           r"Expected attn_mask to broadcast .* \(8, 9\)"),
    "mask-rank-5": (_with(attn_mask=torch.ones(1, 1, 1, S, S, dtype=torch.bool)), r"Expected attn_mask to broadcast"),
    "mask-not-tensor": (_with(attn_mask=[[True] * S] * S),
                        r"Expected attn_mask to be a torch\.Tensor or None, but got list"),
    "policy-unknown": (_with(policy="fastest"), r"Expected policy to be one of .* but got 'fastest'"),
    "policy-duplicate-str": (_with(policy="flash,flash"), r"Expected each backend at most once"),
    "policy-duplicate-tuple": (_with(policy=("flash", "math", "flash")), r"Expected each backend at most once"),
    "policy-not-str": (_with(policy=3), r"Expected policy to be a Policy, a policy name"),
}


@pytest.mark.parametrize("build, match", BAD.values(), ids=BAD.keys())
def test_bad_input_raises(build: Callable[[], Call], match: str) -> None:
    args, kwargs = build()
    with pytest.raises(AttentionInputError, match=match) as info:
        sdpa_flash.attention(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, sdpa_flash.SdpaFlashError)
    with pytest.raises(AttentionInputError, match=match):
        sdpa_flash.explain(*args, **kwargs)
    # ... and the failed call left nothing behind: a valid call with the same shapes works and is right.
    q, k, v = qkv()
    torch.testing.assert_close(sdpa_flash.attention(q, k, v), reference_attention(q, k, v, dtype=None))


def test_policy_list_with_duplicate_explain() -> None:
    q, k, v = qkv()
    with pytest.raises(AttentionInputError, match=r"Expected each backend at most once .*\['flash', 'flash'\]"):
        sdpa_flash.explain(q, k, v, policy=["flash", "flash"])


def test_policy_list_with_duplicate_attention() -> None:
    q, k, v = qkv()
    with pytest.raises(AttentionInputError, match=r"Expected each backend at most once"):
        sdpa_flash.attention(q, k, v, policy=["flash", "flash"])


# --------------------------------------------------------------------------------- the cache stays clean
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("policy", ["auto", "math"])
@pytest.mark.parametrize("which", ["kv", "k", "v"])
def test_mixed_dtypes_raise_after_valid_call(which: str, policy: str, layout: str, grad: bool) -> None:
    """The fast path's cache key holds the query's properties only; mixed key/value dtypes must still raise."""
    q, k, v = qkv(hq=4, hkv=2, sq=6, sk=10)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    q.requires_grad_(grad)
    ok = sdpa_flash.attention(q, k, v, causal=True, layout=layout, policy=policy)  # fills the cache
    k2 = k.double() if which in ("kv", "k") else k
    v2 = v.double() if which in ("kv", "v") else v
    for _ in range(2):  # and the failure does not get cached as a success either
        with pytest.raises(AttentionInputError, match=r"Expected query, key and value to have one dtype"):
            sdpa_flash.attention(q, k2, v2, causal=True, layout=layout, policy=policy)
    torch.testing.assert_close(sdpa_flash.attention(q, k, v, causal=True, layout=layout, policy=policy), ok)


def test_valid_call_after_failures_with_same_shapes() -> None:
    q, k, v = qkv(seed=3)
    expected = reference_attention(q, k, v, causal=True, dtype=None)
    bad_calls: list[dict[str, Any]] = [
        {"causal": "sideways"}, {"dropout_p": 1.0}, {"scale": float("nan")}, {"layout": "bsdh"},
        {"attn_mask": torch.ones(S, S, dtype=torch.int64)}, {"policy": "fastest"},
    ]
    for kwargs in bad_calls:
        with pytest.raises(AttentionInputError):
            sdpa_flash.attention(q, k, v, **{"causal": True, **kwargs})
        torch.testing.assert_close(sdpa_flash.attention(q, k, v, causal=True), expected)
    with pytest.raises(AttentionInputError):
        sdpa_flash.attention(q, k.double(), v.double(), causal=True)
    torch.testing.assert_close(sdpa_flash.attention(q, k, v, causal=True), expected)
    assert sdpa_flash.explain(q, k, v, causal=True).backend == "flash"


# Validation must not depend on what was called before. The per-call cache is a dict keyed on the raw
# arguments, and Python's dict treats 1 == True == 1.0 and 0 == False == 0.0 as the same key; so these aliases
# are accepted as the numbers they equal (causal=1 is causal=True, dropout_p=False is 0.0, scale=True is 1.0),
# and a call gives the same result whether or not its alias is already cached.
# (canonical, alias, head dim): each case has a head dim no other test uses, so its cache starts cold.
HASH_ALIASES = {
    "causal-1-is-True": ({"causal": True}, {"causal": 1}, 20),
    "causal-0-is-False": ({"causal": False}, {"causal": 0}, 21),
    "dropout-False-is-0.0": ({"dropout_p": 0.0}, {"dropout_p": False}, 22),
    "scale-True-is-1.0": ({"scale": 1.0}, {"scale": True}, 23),
}


@pytest.mark.parametrize("order", ["alias-first", "canonical-first"])
@pytest.mark.parametrize("canonical, alias, d", HASH_ALIASES.values(), ids=HASH_ALIASES.keys())
def test_numeric_aliases_behave_alike_cold_and_cached(
    canonical: dict[str, Any], alias: dict[str, Any], d: int, order: str
) -> None:
    q, k, v = qkv(sq=7, sk=7, d=d, dv=d, seed=11 if order == "alias-first" else 12)
    calls = [alias, canonical] if order == "alias-first" else [canonical, alias]
    first, second = (sdpa_flash.attention(q, k, v, **kw) for kw in calls)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert sdpa_flash.explain(q, k, v, **alias).backend == sdpa_flash.explain(q, k, v, **canonical).backend


@pytest.mark.parametrize("sizes", [{"b": 0}, {"sk": 0}, {"sq": 0}], ids=["zero-batch", "zero-keys", "zero-queries"])
def test_mixed_dtypes_raise_after_valid_zero_size_call(sizes: dict[str, int]) -> None:
    """No kernel runs (or checks dtypes) on zero-size inputs, so the cache itself must tell the calls apart."""
    q, k, v = qkv(d=36, dv=36, **sizes)  # a shape no other test uses: the cache starts cold
    with pytest.raises(AttentionInputError, match="one dtype"):  # fresh
        sdpa_flash.attention(q, k.double(), v.double())
    sdpa_flash.attention(q, k, v)
    for _ in range(2):  # with the query's shape and dtype cached
        with pytest.raises(AttentionInputError, match="one dtype"):
            sdpa_flash.attention(q, k.double(), v.double())
