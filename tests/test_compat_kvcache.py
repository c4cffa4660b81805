"""sdpa_flash.compat.flash_attn_with_kvcache: in-place appends, rotary, cache_batch_idx, left padding, paged caches,
and attention over the updated cache against the float64 reference of flash-attn's documented semantics."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
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


# Every feature on every path that has it. The masked path has no softcap (c * tanh(s / c) is a non-linear function
# of the scores, which no additive mask expresses; the planner says so, tests/test_compat.py checks that reason), so
# those pairs are not cases: a case that can only skip would hide nothing but a hole.
FEATURE_PATHS = [(case, path) for case in FEATURES for path in (None, "masked", "exact")
                 if not (path == "masked" and "softcap" in FEATURES[case])]


@pytest.mark.parametrize(("case", "path"), FEATURE_PATHS, ids=[f"{c}-{p}" for c, p in FEATURE_PATHS])
def test_features_with_per_row_lengths(case: str, path: str | None) -> None:
    kw = dict(FEATURES[case])
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


PAGE, BLOCKS = 4, 8


def _pool(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCKS, PAGE, HK, D, generator=g), torch.randn(BLOCKS, PAGE, HK, D, generator=g)


def _paged(table: list[list[int]], lens: int | Sequence[int] | None = (3, 9), append: bool = True,
           pool: tuple[torch.Tensor, ...] | None = None, device: str = "cpu") -> torch.Tensor:
    """A decode step against a paged pool of 8 blocks of 4 (3 blocks per row: capacity 12)."""
    pk, pv = pool if pool is not None else _pool()
    q, k, v = (t.to(device) for t in new(2, 1, 1, torch.float32))
    seqlens: Any = lens if lens is None or isinstance(lens, int) else torch.tensor(list(lens), dtype=torch.int32,
                                                                                   device=device)
    return C.flash_attn_with_kvcache(q, pk.to(device) if pool is None else pk, pv.to(device) if pool is None else pv,
                                     k if append else None, v if append else None, cache_seqlens=seqlens,
                                     block_table=torch.tensor(table, dtype=torch.int32, device=device))


def _paged_varlen(table: list[list[int]], cu: list[int]) -> torch.Tensor:
    pk, pv = _pool()
    q = torch.randn(cu[-1], HQ, D, generator=torch.Generator().manual_seed(3))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    longest = max(b - a for a, b in itertools.pairwise(cu))
    return C.flash_attn_varlen_func(q, pk, pv, cu_t, cu_t, longest, longest,
                                    block_table=torch.tensor(table, dtype=torch.int32))


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
    "seqlens-negative": (lambda: C.flash_attn_with_kvcache(*_kv(),
                                                           cache_seqlens=torch.tensor([3, -1], dtype=torch.int32)),
                         AttentionInputError, r"0 <= cache_seqlens .* cache_seqlens=\[3, -1\] \(min -1, max 3\)"),
    "seqlens-past-capacity-no-append": (lambda: C.flash_attn_with_kvcache(
        *_kv(), cache_seqlens=torch.tensor([3, S_CACHE + 1], dtype=torch.int32)), AttentionInputError,
        r"cache capacity 24, but got cache_seqlens=\[3, 25\]"),
    "seqlens-int-negative": (lambda: C.flash_attn_with_kvcache(*_kv(), cache_seqlens=-2), AttentionInputError,
                             r"0 <= cache_seqlens .* cache_seqlens=-2"),
    "batch-idx-negative": (lambda: C.flash_attn_with_kvcache(
        *_kv(), cache_seqlens=1, cache_batch_idx=torch.tensor([-1, 2], dtype=torch.int32)), AttentionInputError,
        r"cache_batch_idx in \[0, 4\) \(rows of k_cache\), but got \[-1, 2\]"),
    "paged-past-the-pool": (lambda: _paged(table=[[5, 0, 2], [7, 3, 8]]), AttentionInputError,
                            r"block_table entries that hold keys .* \[0, 8\), but got block_table\[1, 2\] = 8"),
    "paged-negative": (lambda: _paged(table=[[-1, 0, 2], [7, 3, 6]]), AttentionInputError,
                       r"block_table.* but got block_table\[0, 0\] = -1 \(min -1, max 7\)"),
    "paged-far-past-int-seqlens": (lambda: _paged(table=[[5, 0, 2], [7, 1000, 6]], lens=9), AttentionInputError,
                                   r"block_table\[1, 1\] = 1000"),
    "paged-whole-table-no-seqlens": (lambda: _paged(table=[[5, 0, 2], [7, 3, 99]], lens=None, append=False),
                                     AttentionInputError, r"block_table\[1, 2\] = 99"),
    "paged-seqlens-past-capacity": (lambda: _paged(table=[[5, 0, 2], [7, 3, 6]], lens=[3, 12]), AttentionInputError,
                                    r"cache capacity 12, but got cache_seqlens=\[3, 12\]"),
    "paged-no-blocks": (lambda: C.flash_attn_with_kvcache(
        _kv()[0], torch.zeros(0, 4, HK, D), torch.zeros(0, 4, HK, D), cache_seqlens=1,
        block_table=torch.zeros(2, 2, dtype=torch.int32)), AttentionInputError, r"at least one block"),
    "varlen-paged-past-the-pool": (lambda: _paged_varlen([[5, 0, 2], [7, 3, 8]], [0, 3, 12]), AttentionInputError,
                                   r"block_table entries that hold keys .* block_table\[1, 2\] = 8"),
    "varlen-paged-negative": (lambda: _paged_varlen([[5, 0, 2], [-7, 3, 6]], [0, 3, 9]), AttentionInputError,
                              r"block_table\[1, 0\] = -7"),
    "num-splits": (lambda: C.flash_attn_with_kvcache(*_kv(), num_splits=-1), AttentionInputError, r"num_splits"),
    "cache-dtype": (lambda: C.flash_attn_with_kvcache(_kv()[0], _kv()[1].double(), _kv()[2].double()),
                    AttentionInputError, r"one dtype"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case: str) -> None:
    call, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("lens", [[3, 12], [-1, 3]], ids=["past-capacity", "negative"])
@pytest.mark.parametrize("table", [[[5, 0, 2], [7, 3, 6]], [[5, 0, 2], [7, 3, 8]]], ids=["good-table", "bad-table"])
def test_bad_paged_indices_raise_before_anything_is_written(table: list[list[int]], lens: list[int]) -> None:
    pool = _pool()
    before = tuple(t.clone() for t in pool)
    with pytest.raises(AttentionInputError, match="cache_seqlens"):  # cache_seqlens is checked first
        _paged(table, lens, pool=pool)
    assert all(torch.equal(a, b) for a, b in zip(pool, before, strict=True)), "the error came after a write"


def test_block_table_entries_past_the_keys_are_never_read() -> None:
    """flash-attn reads only the blocks that hold keys: a table padded with -1 (or stale numbers) is valid."""
    pool = _pool()
    padded = _paged([[5, -1, -1], [7, 3, 1000]], [3, 7], pool=tuple(t.clone() for t in pool))
    tidy = _paged([[5, 0, 0], [7, 3, 0]], [3, 7], pool=tuple(t.clone() for t in pool))
    assert torch.equal(padded, tidy)
    one_len = _paged([[5, 0, -1], [7, 3, -1]], 7, pool=tuple(t.clone() for t in pool))
    assert one_len.shape == padded.shape and torch.isfinite(one_len).all()
    q = torch.randn(10, HQ, D, generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    a = C.flash_attn_varlen_func(q, *pool, cu, cu, 7, 7, block_table=torch.tensor([[5, -1, -1], [7, 3, -9]],
                                                                                   dtype=torch.int32))
    b = C.flash_attn_varlen_func(q, *pool, cu, cu, 7, 7, block_table=torch.tensor([[5, 0, 0], [7, 3, 0]],
                                                                                   dtype=torch.int32))
    assert torch.equal(a, b)


def test_range_checks_are_skipped_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """No host sync is possible while torch.compile traces or a CUDA graph is captured: the values are then the
    caller's responsibility (as in flash-attn). Shown here by pretending to trace: the bad index reaches the gather."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(IndexError):
        _paged([[5, 0, 2], [7, 3, 8]])
    monkeypatch.undo()
    with pytest.raises(AttentionInputError, match="block_table"):
        _paged([[5, 0, 2], [7, 3, 8]])


# ---------------------------------------------------------------------------------------------- on a GPU
def _cuda_still_works() -> None:
    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    assert float((x * 2).sum().item()) == 999000.0  # a kernel and a sync after the error: the context is healthy
    torch.cuda.synchronize()


CUDA_BAD = {
    "block-table-past-the-pool": lambda: _paged([[5, 0, 2], [7, 3, 8]], device="cuda"),
    "block-table-negative": lambda: _paged([[-1, 0, 2], [7, 3, 6]], device="cuda"),
    "block-table-huge": lambda: _paged([[5, 0, 2], [7, 2**30, 6]], device="cuda"),
    "seqlens-past-capacity": lambda: _paged([[5, 0, 2], [7, 3, 6]], [3, 12], device="cuda"),
    "seqlens-negative": lambda: _paged([[5, 0, 2], [7, 3, 6]], [-4, 3], device="cuda"),
    "batch-idx": lambda: C.flash_attn_with_kvcache(*(t.cuda() for t in _kv()), cache_seqlens=1,
                                                   cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32,
                                                                                device="cuda")),
    "varlen-block-table": lambda: C.flash_attn_varlen_func(
        torch.randn(12, HQ, D, device="cuda"), *(t.cuda() for t in _pool()),
        torch.tensor([0, 3, 12], dtype=torch.int32, device="cuda"),
        torch.tensor([0, 3, 12], dtype=torch.int32, device="cuda"), 9, 9,
        block_table=torch.tensor([[5, 0, 2], [7, 3, 8]], dtype=torch.int32, device="cuda")),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CUDA_BAD), ids=list(CUDA_BAD))
def test_bad_indices_on_cuda_raise_typed_errors_and_no_device_assert(case: str) -> None:
    with pytest.raises(AttentionInputError):
        CUDA_BAD[case]()
    _cuda_still_works()
    out = _paged([[5, 0, 2], [7, 3, 6]], device="cuda")  # and a valid call right after gives the CPU's answer
    torch.testing.assert_close(out.cpu(), _paged([[5, 0, 2], [7, 3, 6]]), rtol=1e-5, atol=1e-5)
    _cuda_still_works()


@pytest.mark.cuda
def test_paged_decode_captures_in_a_cuda_graph_without_the_check() -> None:
    pk, pv = (t.cuda() for t in _pool())
    q, k, v = (t.cuda() for t in new(2, 1, 1, torch.float32))
    lens = torch.tensor([3, 9], dtype=torch.int32, device="cuda")
    table = torch.tensor([[5, 0, 2], [7, 3, 6]], dtype=torch.int32, device="cuda")
    want = C.flash_attn_with_kvcache(q, pk.clone(), pv.clone(), k, v, cache_seqlens=lens, block_table=table)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (plans, caches)
        C.flash_attn_with_kvcache(q, pk.clone(), pv.clone(), k, v, cache_seqlens=lens, block_table=table)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync here would raise: the range check must be skipped
        out = C.flash_attn_with_kvcache(q, pk, pv, k, v, cache_seqlens=lens, block_table=table)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want)


def test_num_splits_does_not_change_the_result() -> None:
    q, kc, vc = _kv()
    a = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7, num_splits=0)
    b = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7, num_splits=4)
    assert torch.equal(a, b) and not math.isnan(float(a.sum()))
