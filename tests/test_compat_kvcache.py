"""sdpa_flash.compat.flash_attn_with_kvcache: in-place appends, rotary, cache_batch_idx, left padding, paged caches,
and attention over the updated cache against the float64 reference of flash-attn's documented semantics."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

import sdpa_flash.compat as C
from sdpa_flash import AttentionInputError
from sdpa_flash.compat.testing import assert_flash_close

B_CACHE, S_CACHE, HQ, HK, D = 4, 24, 4, 2, 16


def rotary_reference(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     interleaved: bool) -> torch.Tensor:
    """The rotation from its definition, in float64: pairs (2i, 2i+1) (interleaved) or (i, i + rd/2) of the first
    rotary_dim features turn by the angle whose cosine/sine are cos[pos, i] / sin[pos, i]."""
    rd = 2 * cos.shape[1]
    x = x.double().clone()
    out = x.clone()
    c, s = cos.double()[pos], sin.double()[pos]  # (B, S, rd/2)
    for i in range(rd // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
        ci, si = c[..., i, None], s[..., i, None]  # (B, S, 1): broadcast over heads
        out[..., a] = x[..., a] * ci - x[..., b] * si
        out[..., b] = x[..., a] * si + x[..., b] * ci
    return out


def tables(rd: int, n: int = S_CACHE) -> tuple[torch.Tensor, torch.Tensor]:
    theta = torch.arange(n).double()[:, None] * (10000.0 ** (-torch.arange(rd // 2).double() / (rd // 2)))
    return torch.cos(theta), torch.sin(theta)


def cache(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B_CACHE, S_CACHE, HK, D, generator=g).to(dtype),
            torch.randn(B_CACHE, S_CACHE, HK, D, generator=g).to(dtype))


def new(b: int, sq: int, snew: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g).to(dtype) for s in ((b, sq, HQ, D), (b, snew, HK, D), (b, snew, HK, D)))


def check(b: int, sq: int, snew: int, lens: list[int], dtype: torch.dtype, *, path: str | None = None,
          rotary: str | None = None, rd: int = 8, batch_idx: list[int] | None = None,
          leftpad: list[int] | None = None, as_int: bool = False, **kw: Any) -> None:
    kc, vc = cache(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    q, k, v = new(b, sq, snew, dtype)
    cos = sin = None
    if rotary:
        cos64, sin64 = tables(rd)
        cos, sin = cos64.to(dtype), sin64.to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    args: dict[str, Any] = {"cache_seqlens": lens[0] if as_int else lens_t}
    if batch_idx is not None:
        args["cache_batch_idx"] = torch.tensor(batch_idx, dtype=torch.int32)
    if leftpad is not None:
        args["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32)
    if "alibi" in kw:
        kw["alibi_slopes"] = torch.rand((HQ,) if kw.pop("alibi") == "heads" else (b, HQ),
                                        generator=torch.Generator().manual_seed(2))
    with C.use_path(path), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = C.explain_flash_attn(C.flash_attn_with_kvcache, q, kc, vc, k if snew else None,
                                      v if snew else None, cos, sin, **args, rotary_interleaved=rotary != "neox", **kw)
        assert torch.equal(kc, kc0), "explain_flash_attn must not touch the cache"
        out, lse = C.flash_attn_with_kvcache(q, kc, vc, k if snew else None, v if snew else None, cos, sin, **args,
                                             rotary_interleaved=rotary != "neox", return_softmax_lse=True, **kw)
    assert before.path
    assert out.shape == (b, sq, HQ, D) and lse.shape == (b, HQ, sq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rows = batch_idx if batch_idx is not None else list(range(b))
    # the cache after the call: the new keys/values (rotated) at lens[b] .. lens[b] + snew - 1, nothing else changed
    want_k, want_v = kc0.clone(), vc0.clone()
    pos_k = torch.tensor(lens)[:, None] + torch.arange(snew)
    k_in = k
    if rotary and snew:
        k_in = rotary_reference(k, pos_k, cos, sin, rotary != "neox").to(dtype)
    for i, r in enumerate(rows):
        want_k[r, lens[i]: lens[i] + snew] = k_in[i]
        want_v[r, lens[i]: lens[i] + snew] = v[i]
    if rotary and dtype != torch.float64:
        torch.testing.assert_close(kc, want_k, rtol=0, atol=2 * torch.finfo(dtype).eps * 4)
    else:
        assert torch.equal(kc, want_k)
    assert torch.equal(vc, want_v)
    # attention over the updated cache, against the reference (q rotated at cache_seqlens [+ i])
    q_in = q
    if rotary:
        local = kw.get("causal") or kw.get("window_size", (-1, -1)) != (-1, -1)
        pos_q = torch.tensor(lens)[:, None] + (torch.arange(sq) if local else torch.zeros(sq, dtype=torch.long))
        q_in = rotary_reference(q, pos_q, cos, sin, rotary != "neox").to(dtype)
    start = torch.tensor(leftpad or [0] * b)
    end = torch.tensor(lens) + snew
    keys, values = kc[rows], vc[rows]
    assert_flash_close([out], q_in, keys, values, lse=lse, key_range=(start, end), window_limit=S_CACHE, **kw)


DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("path", [None, "exact"], ids=["auto", "exact"])
def test_decode_appends_in_place_and_attends_to_the_updated_cache(path: str | None, dtype: torch.dtype) -> None:
    check(3, 1, 1, [5, 0, 17], dtype, path=path, causal=True)
    check(3, 1, 1, [5, 0, 17], dtype, path=path)
    check(3, 1, 1, [9, 9, 9], dtype, path=path, causal=True, as_int=True)  # one int length: sliced append
    check(2, 2, 2, [0, 0], dtype, path=path, as_int=True)


@pytest.mark.parametrize("rotary", ["interleaved", "neox"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_rotary_both_modes(rotary: str, dtype: torch.dtype, causal: bool) -> None:
    check(2, 3, 3, [4, 11], dtype, rotary=rotary, rd=8, causal=causal)  # rotary_dim 8 of headdim 16
    check(2, 3, 3, [4, 4], dtype, rotary=rotary, rd=16, causal=causal, as_int=True)


FEATURES = {
    "window": {"causal": True, "window_size": (4, -1)},
    "window-both": {"window_size": (3, 2)},
    "softcap": {"softcap": 2.0, "causal": True},
    "alibi-heads": {"alibi": "heads", "causal": True},
    "alibi-batch": {"alibi": "batch_heads"},
    "everything": {"alibi": "batch_heads", "causal": True, "window_size": (6, -1), "softcap": 3.0,
                   "softmax_scale": 0.2},
}


@pytest.mark.parametrize("path", [None, "masked", "exact"])
@pytest.mark.parametrize("case", list(FEATURES), ids=list(FEATURES))
def test_features_with_per_row_lengths(case: str, path: str | None) -> None:
    kw = dict(FEATURES[case])
    if path == "masked" and "softcap" in kw:
        pytest.skip("softcap has no masked form")
    check(3, 2, 2, [6, 1, 14], torch.float32, path=path, **kw)
    check(2, 4, 4, [9, 9], torch.float32, path=path, as_int=True, **kw)


def test_bf16_decode() -> None:
    check(3, 1, 1, [5, 0, 17], torch.bfloat16, causal=True)
    check(3, 2, 2, [5, 0, 17], torch.bfloat16, path="exact", causal=True, softcap=4.0, window_size=(5, -1))


def test_cache_batch_idx_and_leftpad() -> None:
    check(2, 1, 1, [7, 3], torch.float64, batch_idx=[3, 1], causal=True)
    check(2, 2, 2, [7, 3], torch.float64, batch_idx=[2, 0], rotary="interleaved", causal=True)
    check(3, 2, 1, [9, 6, 12], torch.float64, leftpad=[2, 0, 5], causal=True)
    check(3, 2, 1, [9, 6, 12], torch.float64, leftpad=[2, 0, 5], path="exact", alibi="batch_heads",
          window_size=(3, 1))


def test_no_new_keys_and_rows_that_see_nothing() -> None:
    kc, vc = cache(torch.float32)
    q = new(2, 3, 0, torch.float32)[0]
    out, lse = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                                         causal=True, return_softmax_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isposinf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()  # row 1: Sk=5 >= Sq=3, every query sees keys
    full = C.flash_attn_with_kvcache(q, kc, vc)  # cache_seqlens=None: the whole cache is valid
    ref = C.flash_attn_func(q, kc[:2], vc[:2])
    assert torch.equal(full, ref)


def test_paged_cache_matches_the_contiguous_one() -> None:
    page = 4  # three pages: capacity 12 per sequence
    g = torch.Generator().manual_seed(7)
    pool_k = torch.randn(8, page, HK, D, generator=g)
    pool_v = torch.randn(8, page, HK, D, generator=g)
    table = torch.tensor([[5, 0, 2], [7, 3, 6]], dtype=torch.int32)
    q, k, v = new(2, 2, 2, torch.float32)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    flat_k = pool_k[table.long()].flatten(1, 2).clone()
    flat_v = pool_v[table.long()].flatten(1, 2).clone()
    cos, sin = (t.float() for t in tables(8, 12))
    out = C.flash_attn_with_kvcache(q, pool_k, pool_v, k, v, cos, sin, cache_seqlens=lens, block_table=table,
                                    causal=True)
    ref = C.flash_attn_with_kvcache(q, flat_k, flat_v, k, v, cos, sin, cache_seqlens=lens, causal=True)
    assert torch.equal(out, ref)
    assert torch.equal(pool_k[table.long()].flatten(1, 2), flat_k)  # written through the block table
    assert torch.equal(pool_v[table.long()].flatten(1, 2), flat_v)


def _kv() -> tuple[torch.Tensor, ...]:
    kc, vc = cache(torch.float32)
    return (new(2, 1, 1, torch.float32)[0], kc, vc)


BAD: dict[str, tuple[Any, type[Exception], str]] = {
    "k-without-v": (lambda: C.flash_attn_with_kvcache(*_kv(), k=new(2, 1, 1, torch.float32)[1],
                                                      cache_seqlens=1), AttentionInputError, r"k and v to be given"),
    "append-without-seqlens": (lambda: C.flash_attn_with_kvcache(*_kv(), *new(2, 1, 1, torch.float32)[1:]),
                               AttentionInputError, r"Expected cache_seqlens"),
    "past-capacity": (lambda: C.flash_attn_with_kvcache(*_kv(), *new(2, 1, 1, torch.float32)[1:],
                                                        cache_seqlens=S_CACHE), AttentionInputError,
                      r"cache capacity 24"),
    "past-capacity-tensor": (lambda: C.flash_attn_with_kvcache(*_kv(), *new(2, 1, 2, torch.float32)[1:],
                                                               cache_seqlens=torch.tensor([1, 23], dtype=torch.int32)),
                             AttentionInputError, r"cache capacity 24"),
    "seqlens-int64": (lambda: C.flash_attn_with_kvcache(*_kv(), cache_seqlens=torch.tensor([1, 2])),
                      AttentionInputError, r"cache_seqlens to be an int32 tensor"),
    "rotary-without-k": (lambda: C.flash_attn_with_kvcache(*_kv(), rotary_cos=torch.ones(S_CACHE, 4),
                                                           rotary_sin=torch.ones(S_CACHE, 4), cache_seqlens=1),
                         AttentionInputError, r"Expected k and v when rotary"),
    "rotary-too-wide": (lambda: C.flash_attn_with_kvcache(*_kv(), *new(2, 1, 1, torch.float32)[1:],
                                                          rotary_cos=torch.ones(S_CACHE, 9),
                                                          rotary_sin=torch.ones(S_CACHE, 9), cache_seqlens=1),
                        AttentionInputError, r"rotary_dim"),
    "rotary-short": (lambda: C.flash_attn_with_kvcache(*_kv(), *new(2, 1, 1, torch.float32)[1:],
                                                       rotary_cos=torch.ones(4, 4), rotary_sin=torch.ones(4, 4),
                                                       cache_seqlens=1), AttentionInputError, r"cache capacity"),
    "batch-idx-out-of-range": (lambda: C.flash_attn_with_kvcache(
        *_kv(), cache_seqlens=1, cache_batch_idx=torch.tensor([0, 9], dtype=torch.int32)), AttentionInputError,
        r"cache_batch_idx in \[0, 4\)"),
    "paged-with-batch-idx": (lambda: C.flash_attn_with_kvcache(
        _kv()[0], torch.zeros(4, 4, HK, D), torch.zeros(4, 4, HK, D), cache_seqlens=1,
        block_table=torch.zeros(2, 2, dtype=torch.int32), cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)),
        C.UnsupportedArgumentError, r"cache_batch_idx cannot be combined with block_table"),
    "num-splits": (lambda: C.flash_attn_with_kvcache(*_kv(), num_splits=-1), AttentionInputError, r"num_splits"),
    "cache-dtype": (lambda: C.flash_attn_with_kvcache(_kv()[0], _kv()[1].double(), _kv()[2].double()),
                    AttentionInputError, r"one dtype"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case: str) -> None:
    call, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_num_splits_does_not_change_the_result() -> None:
    q, kc, vc = _kv()
    a = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7, num_splits=0)
    b = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7, num_splits=4)
    assert torch.equal(a, b) and not math.isnan(float(a.sum()))
