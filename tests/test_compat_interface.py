"""flash-attn 2.8's public interface, argument by argument, against sdpa_flash.compat.

Each row of the table in ``docs/flash_attn_compat.md`` has an id (first column); ``ROWS`` below maps every id to the
check that backs it, and ``test_every_row_of_the_doc_table_is_tested`` keeps the two in step. The signatures are
compared with flash-attn 2.8.3's (the parameter names, order and defaults of ``flash_attn/flash_attn_interface.py``
at tag v2.8.3, recorded below as data).
"""

from __future__ import annotations

import inspect
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import sdpa_flash.compat as C
from sdpa_flash import AttentionInputError
from sdpa_flash.compat.testing import assert_flash_close, flash_reference

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "flash_attn_compat.md"
_W = ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), \
    ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)
_E = inspect.Parameter.empty
# flash-attn 2.8.3: (name, default) in order; _E = required
FLASH_ATTN_283: dict[str, list[tuple[str, Any]]] = {
    "flash_attn_func": [("q", _E), ("k", _E), ("v", _E), *_W],
    "flash_attn_qkvpacked_func": [("qkv", _E), *_W],
    "flash_attn_kvpacked_func": [("q", _E), ("kv", _E), *_W],
    "flash_attn_varlen_func": [("q", _E), ("k", _E), ("v", _E), ("cu_seqlens_q", _E), ("cu_seqlens_k", _E),
                               ("max_seqlen_q", _E), ("max_seqlen_k", _E), *_W, ("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _E), ("cu_seqlens", _E), ("max_seqlen", _E), *_W],
    "flash_attn_varlen_kvpacked_func": [("q", _E), ("kv", _E), ("cu_seqlens_q", _E), ("cu_seqlens_k", _E),
                                        ("max_seqlen_q", _E), ("max_seqlen_k", _E), *_W],
    "flash_attn_with_kvcache": [("q", _E), ("k_cache", _E), ("v_cache", _E), ("k", None), ("v", None),
                                ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
                                ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
                                ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                                ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
                                ("num_splits", 0), ("return_softmax_lse", False)],
}


def qkv(b: int = 2, sq: int = 8, sk: int = 8, hq: int = 4, hk: int = 2, d: int = 16, dv: int | None = None,
        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, sq, hq, d, generator=g).to(dtype), torch.randn(b, sk, hk, d, generator=g).to(dtype),
            torch.randn(b, sk, hk, dv or d, generator=g).to(dtype))


def close(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> None:
    assert_flash_close([out], q, k, v, **kw)


def raises(pattern: str, fn: Callable[[], Any], exc: type[Exception] = AttentionInputError) -> None:
    with pytest.raises(exc, match=pattern):
        fn()


def packed(lens: list[int], h: int = 4, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, int]:
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
    return torch.randn(int(cu[-1]), h, d, generator=torch.Generator().manual_seed(1)), cu, max(lens)


# ------------------------------------------------------------------------------------------------ the rows
def sig(name: str) -> Callable[[], None]:
    def check() -> None:
        params = inspect.signature(getattr(C, name)).parameters.values()
        assert [(p.name, p.default) for p in params] == FLASH_ATTN_283[name]
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)  # positional use works too
    return check


def r_qkv_tensors() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        q, k, v = qkv(dtype=dtype)
        assert C.flash_attn_func(q, k, v).dtype == dtype
    raises(r"Expected q to be a floating-point tensor \(float16", lambda: C.flash_attn_func(*(t.long() for t in
                                                                                                   qkv())))
    raises(r"Expected q to be a 4-D tensor", lambda: C.flash_attn_func(qkv()[0][0], *qkv()[1:]))
    raises(r"Expected k to be a torch\.Tensor", lambda: C.flash_attn_func(qkv()[0], None, qkv()[2]))


def r_heads() -> None:
    q, k, v = qkv(hq=6, hk=2)
    close(C.flash_attn_func(q, k, v), q, k, v)
    raises(r"multiple of the key/value heads", lambda: C.flash_attn_func(*qkv(hq=5, hk=2)))


def r_head_dims() -> None:
    q, k, v = qkv(d=59, dv=24)  # not a multiple of 8, and Dv != D
    out = C.flash_attn_func(q, k, v, causal=True)
    assert out.shape == (2, 8, 4, 24)
    close(out, q, k, v, causal=True)
    raises(r"same head dim", lambda: C.flash_attn_func(qkv()[0], *qkv(d=8)[1:]))


def r_dropout() -> None:
    q, k, v = qkv()
    assert C.flash_attn_func(q, k, v, dropout_p=0.25).shape == q.shape
    for bad in (1.0, -0.1, "0.1"):
        raises(r"Expected dropout_p to be a float in \[0, 1\)", lambda bad=bad: C.flash_attn_func(q, k, v,
                                                                                                 dropout_p=bad))


def r_scale() -> None:
    q, k, v = qkv()
    assert torch.equal(C.flash_attn_func(q, k, v), C.flash_attn_func(q, k, v, softmax_scale=16 ** -0.5))
    close(C.flash_attn_func(q, k, v, softmax_scale=0.3), q, k, v, softmax_scale=0.3)
    raises(r"Expected softmax_scale", lambda: C.flash_attn_func(q, k, v, softmax_scale=float("nan")))


def r_causal() -> None:
    q, k, v = qkv(sq=3, sk=8)
    out = C.flash_attn_func(q, k, v, causal=True)
    close(out, q, k, v, causal=True)  # bottom-right: query i sees keys j <= i + 5
    ref, _ = flash_reference(q, k, v, causal=True)
    top_left, _ = flash_reference(q, k, v, window_size=(-1, -5))  # PyTorch's convention, for contrast
    assert not torch.allclose(ref, top_left)
    raises(r"Expected causal to be a bool", lambda: C.flash_attn_func(q, k, v, causal="yes"))


def r_window() -> None:
    q, k, v = qkv(sq=10, sk=10)
    want = C.flash_attn_func(q, k, v, window_size=(3, 1))
    close(want, q, k, v, window_size=(3, 1))
    for form in ([3, 1], torch.tensor([3, 1]), torch.tensor([3, 1], dtype=torch.int32),
                 (np.int64(3), np.int32(1)), (torch.tensor(3), 1)):
        assert torch.equal(C.flash_attn_func(q, k, v, window_size=form), want), form
    for bad in ((1.5, 2), 4, (True, 1), torch.tensor([1.0, 2.0]), (1, 2, 3), torch.tensor([1, 2, 3])):
        raises(r"Expected window_size to be a pair of ints", lambda bad=bad: C.flash_attn_func(q, k, v,
                                                                                              window_size=bad))


def r_softcap() -> None:
    q, k, v = qkv()
    close(C.flash_attn_func(q, k, v, softcap=2.0), q, k, v, softcap=2.0)
    assert torch.equal(C.flash_attn_func(q, k, v, softcap=0.0), C.flash_attn_func(q, k, v))
    raises(r"Expected softcap to be a finite float >= 0", lambda: C.flash_attn_func(q, k, v, softcap=-1.0))


def r_alibi() -> None:
    q, k, v = qkv()
    for slopes in (torch.rand(4), torch.rand(2, 4)):
        close(C.flash_attn_func(q, k, v, alibi_slopes=slopes), q, k, v, alibi_slopes=slopes)
    raises(r"alibi_slopes of shape", lambda: C.flash_attn_func(q, k, v, alibi_slopes=torch.rand(3)))
    raises(r"alibi_slopes to have dtype float32",
           lambda: C.flash_attn_func(q, k, v, alibi_slopes=torch.rand(4).double()))


def r_deterministic() -> None:
    q, k, v = (t.requires_grad_() for t in qkv())
    grads = [torch.autograd.grad(C.flash_attn_func(q, k, v, deterministic=True).sum(), (q, k, v)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    raises(r"Expected deterministic to be a bool", lambda: C.flash_attn_func(q, k, v, deterministic="yes"))


def r_return_attn_probs() -> None:
    q, k, v = qkv(sq=5, sk=8)
    assert isinstance(C.flash_attn_func(q, k, v), torch.Tensor)
    out, lse, s_dmask = C.flash_attn_func(q, k, v, return_attn_probs=True)
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32 and s_dmask.numel() == 0
    close(out, q, k, v, lse=lse)
    _, _, probs = C.flash_attn_func(q, k, v, dropout_p=0.5, return_attn_probs=True)
    assert probs.shape == (2, 4, 5, 8)


def r_qkvpacked() -> None:
    q, k, v = qkv(hk=4)
    one = C.flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2), causal=True)
    assert torch.equal(one, C.flash_attn_func(q, k, v, causal=True))
    assert len(C.flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2), return_attn_probs=True)) == 3
    raises(r"size 3 in dimension 2", lambda: C.flash_attn_qkvpacked_func(torch.stack((q, k), dim=2)))


def r_kvpacked() -> None:
    q, k, v = qkv()
    assert torch.equal(C.flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2)), C.flash_attn_func(q, k, v))
    assert len(C.flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2), return_attn_probs=True)) == 3
    raises(r"size 2 in dimension 2", lambda: C.flash_attn_kvpacked_func(q, torch.stack((k, v, k), dim=2)))


def r_cu_seqlens() -> None:
    x, cu, m = packed([3, 0, 5])
    out = C.flash_attn_varlen_func(x, x, x, cu, cu, m, m, causal=True)
    for a, b in ((0, 3), (3, 8)):
        close(out[a:b][None], x[a:b][None], x[a:b][None], x[a:b][None], causal=True)
    raises(r"cu_seqlens_q to have dtype int32", lambda: C.flash_attn_varlen_func(x, x, x, cu.long(), cu, m, m))
    raises(r"cu_seqlens_k to start at 0", lambda: C.flash_attn_varlen_func(x, x, x, cu, cu + 1, m, m))


def r_max_seqlen() -> None:
    x, cu, m = packed([3, 5])
    want = C.flash_attn_varlen_func(x, x, x, cu, cu, m, m)
    assert torch.equal(C.flash_attn_varlen_func(x, x, x, cu, cu, torch.tensor(m), np.int64(m)), want)
    assert torch.equal(C.flash_attn_varlen_func(x, x, x, cu, cu, 64, 64), want)  # larger is fine
    raises(r"max_seqlen_q >= the longest sequence", lambda: C.flash_attn_varlen_func(x, x, x, cu, cu, 4, m))


def r_varlen_return() -> None:
    x, cu, m = packed([3, 5])
    assert isinstance(C.flash_attn_varlen_func(x, x, x, cu, cu, m, m), torch.Tensor)
    out, lse, s_dmask = C.flash_attn_varlen_func(x, x, x, cu, cu, m, m, return_attn_probs=True)
    assert out.shape == x.shape and lse.shape == (4, 8) and s_dmask.numel() == 0


def r_varlen_block_table() -> None:
    pool_k, pool_v = torch.randn(6, 4, 4, 16), torch.randn(6, 4, 4, 16)
    x, cu, m = packed([3, 6])
    table = torch.tensor([[4, -1], [0, 5]], dtype=torch.int32)  # -1: an entry that holds no key, never read
    out = C.flash_attn_varlen_func(x, pool_k, pool_v, cu, cu, m, m, block_table=table)
    keys = [pool_k[4, :3], torch.cat((pool_k[0], pool_k[5]))[:6]]
    vals = [pool_v[4, :3], torch.cat((pool_v[0], pool_v[5]))[:6]]
    for i, (a, b) in enumerate(((0, 3), (3, 9))):
        close(out[a:b][None], x[a:b][None], keys[i][None], vals[i][None])
    raises(r"block_table\[1, 1\] = 6", lambda: C.flash_attn_varlen_func(
        x, pool_k, pool_v, cu, cu, m, m, block_table=torch.tensor([[4, 0], [0, 6]], dtype=torch.int32)))


def r_varlen_qkvpacked() -> None:
    x, cu, m = packed([3, 5])
    out = C.flash_attn_varlen_qkvpacked_func(torch.stack((x, x, x), dim=1), cu, m, causal=True)
    assert torch.equal(out, C.flash_attn_varlen_func(x, x, x, cu, cu, m, m, causal=True))
    assert len(C.flash_attn_varlen_qkvpacked_func(torch.stack((x, x, x), dim=1), cu, m, return_attn_probs=True)) == 3


def r_varlen_kvpacked() -> None:
    x, cu, m = packed([3, 5])
    out = C.flash_attn_varlen_kvpacked_func(x, torch.stack((x, x), dim=1), cu, cu, m, m)
    assert torch.equal(out, C.flash_attn_varlen_func(x, x, x, cu, cu, m, m))
    raises(r"size 2 in dimension 1", lambda: C.flash_attn_varlen_kvpacked_func(x, torch.stack((x, x, x), dim=1), cu,
                                                                               cu, m, m))


def kv_cache(b: int = 2, s: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 1, 4, 16, generator=g), torch.randn(b, s, 2, 16, generator=g), torch.randn(b, s, 2, 16,
                                                                                                     generator=g)


def r_kv_cache() -> None:
    q, kc, vc = kv_cache()
    out = C.flash_attn_with_kvcache(q, kc, vc)  # no cache_seqlens: the whole cache is valid
    assert torch.equal(out, C.flash_attn_func(q, kc, vc))
    raises(r"Expected k_cache to be a 4-D tensor", lambda: C.flash_attn_with_kvcache(q, kc[0], vc))


def r_kv_append() -> None:
    q, kc, vc = kv_cache()
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    C.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([3, 7], dtype=torch.int32))
    assert torch.equal(kc[0, 3], k[0, 0]) and torch.equal(vc[1, 7], v[1, 0])  # written in place
    raises(r"k and v to be given together", lambda: C.flash_attn_with_kvcache(q, kc, vc, k, cache_seqlens=1))


def r_kv_rotary() -> None:
    q, kc, vc = kv_cache()
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cos, sin = torch.cos(torch.rand(12, 4)), torch.sin(torch.rand(12, 4))
    kc2 = kc.clone()
    C.flash_attn_with_kvcache(q, kc2, vc.clone(), k, v, cos, sin, cache_seqlens=5)
    x1, x2 = k[0, 0, :, 0:8:2], k[0, 0, :, 1:8:2]  # interleaved (the default): pairs (0, 1), (2, 3), ...
    torch.testing.assert_close(kc2[0, 5, :, 0:8:2], x1 * cos[5] - x2 * sin[5])
    torch.testing.assert_close(kc2[0, 5, :, 8:], k[0, 0, :, 8:])  # past rotary_dim: unchanged
    raises(r"rotary_cos and rotary_sin to be given together", lambda: C.flash_attn_with_kvcache(
        q, kc, vc, k, v, cos, cache_seqlens=1))


def r_kv_interleaved() -> None:
    q, kc, vc = kv_cache()
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cos, sin = torch.cos(torch.rand(12, 4)), torch.sin(torch.rand(12, 4))
    kc2 = kc.clone()
    C.flash_attn_with_kvcache(q, kc2, vc.clone(), k, v, cos, sin, cache_seqlens=5, rotary_interleaved=False)
    x1, x2 = k[0, 0, :, 0:4], k[0, 0, :, 4:8]  # GPT-NeoX: pairs (i, i + rotary_dim / 2)
    torch.testing.assert_close(kc2[0, 5, :, 4:8], x1 * sin[5] + x2 * cos[5])
    raises(r"Expected rotary_interleaved to be a bool", lambda: C.flash_attn_with_kvcache(
        q, kc, vc, k, v, cos, sin, cache_seqlens=1, rotary_interleaved="no"))


def r_kv_seqlens() -> None:
    q, kc, vc = kv_cache()
    a = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=7)
    b = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([7, 7], dtype=torch.int32))
    torch.testing.assert_close(a, b)
    close(a, q, kc[:, :7], vc[:, :7])
    raises(r"cache capacity 12, but got cache_seqlens=\[7, 13\]", lambda: C.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=torch.tensor([7, 13], dtype=torch.int32)))
    raises(r"int32 tensor of shape \(batch_size,\)", lambda: C.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=torch.tensor([7, 7])))


def r_kv_batch_idx() -> None:
    q, kc, vc = kv_cache(b=2)
    kc4, vc4 = torch.cat((kc, kc.flip(0))), torch.cat((vc, vc.flip(0)))  # rows 2, 3 = rows 1, 0
    out = C.flash_attn_with_kvcache(q, kc4, vc4, cache_seqlens=6, cache_batch_idx=torch.tensor([2, 3],
                                                                                                dtype=torch.int32))
    assert torch.equal(out, C.flash_attn_with_kvcache(q, kc.flip(0), vc.flip(0), cache_seqlens=6))
    raises(r"cache_batch_idx in \[0, 4\)", lambda: C.flash_attn_with_kvcache(
        q, kc4, vc4, cache_seqlens=6, cache_batch_idx=torch.tensor([3, 4], dtype=torch.int32)))


def r_kv_leftpad() -> None:
    q, kc, vc = kv_cache()
    out = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([9, 9], dtype=torch.int32),
                                    cache_leftpad=torch.tensor([2, 2], dtype=torch.int32))
    close(out, q, kc[:, 2:9], vc[:, 2:9])
    raises(r"cache_leftpad cannot be combined with block_table", lambda: C.flash_attn_with_kvcache(
        q, torch.randn(4, 4, 2, 16), torch.randn(4, 4, 2, 16), cache_seqlens=1,
        cache_leftpad=torch.zeros(2, dtype=torch.int32), block_table=torch.zeros(2, 1, dtype=torch.int32)),
        C.UnsupportedArgumentError)


def r_kv_block_table() -> None:
    q, kc, vc = kv_cache()
    pool_k, pool_v = kc.reshape(6, 4, 2, 16), vc.reshape(6, 4, 2, 16)  # row b = blocks 3b, 3b + 1, 3b + 2
    table = torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32)  # row 1 holds 6 keys: its third entry unused
    lens = torch.tensor([10, 6], dtype=torch.int32)
    out = C.flash_attn_with_kvcache(q, pool_k, pool_v, cache_seqlens=lens, block_table=table)
    assert torch.equal(out, C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens))
    raises(r"block_table\[1, 1\] = 6", lambda: C.flash_attn_with_kvcache(
        q, pool_k, pool_v, cache_seqlens=lens, block_table=torch.tensor([[0, 1, 2], [3, 6, 5]], dtype=torch.int32)))
    raises(r"cache_batch_idx cannot be combined with block_table", lambda: C.flash_attn_with_kvcache(
        q, pool_k, pool_v, cache_seqlens=lens, block_table=table, cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
        C.UnsupportedArgumentError)


def r_kv_features() -> None:
    q, kc, vc = kv_cache()
    q = torch.randn(2, 3, 4, 16)
    slopes = torch.rand(4)
    kw: dict[str, Any] = {"causal": True, "softcap": 3.0, "alibi_slopes": slopes}
    out = C.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=9, window_size=torch.tensor([4, 0]), **kw)
    close(out, q, kc[:, :9], vc[:, :9], window_size=(4, 0), window_limit=12, **kw)
    raises(r"Expected window_size", lambda: C.flash_attn_with_kvcache(q, kc, vc, window_size=(0.5, 0)))


def r_kv_num_splits() -> None:
    q, kc, vc = kv_cache()
    assert torch.equal(C.flash_attn_with_kvcache(q, kc, vc, num_splits=0), C.flash_attn_with_kvcache(q, kc, vc,
                                                                                                    num_splits=8))
    raises(r"num_splits to be an int >= 0", lambda: C.flash_attn_with_kvcache(q, kc, vc, num_splits=-1))


def r_kv_return() -> None:
    q, kc, vc = kv_cache()
    assert isinstance(C.flash_attn_with_kvcache(q, kc, vc), torch.Tensor)
    out, lse = C.flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True)
    assert lse.shape == (2, 4, 1) and lse.dtype == torch.float32
    close(out, q, kc, vc, lse=lse)


def r_private_names() -> None:
    assert C.install()
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]

        assert flash_attn_func is C.flash_attn_func
        for name in ("flash_attn_gpu", "_flash_attn_varlen_forward", "_flash_attn_forward", "_get_block_size_n"):
            with pytest.raises(C.NotProvidedError, match=rf"flash_attn\.flash_attn_interface\.{name} is .* public API"):
                exec(f"from flash_attn.flash_attn_interface import {name}", {})
        with pytest.raises(ImportError):
            exec("from flash_attn.flash_attn_interface import no_such_name", {})
        with pytest.raises(ModuleNotFoundError):
            exec("import flash_attn.layers.rotary", {})
    finally:
        C.uninstall()
        for name in [m for m in sys.modules if m.startswith("flash_attn")]:
            del sys.modules[name]


ROWS: dict[str, Callable[[], None]] = {
    **{f"sig.{name}": sig(name) for name in FLASH_ATTN_283},
    "dense.q/k/v": r_qkv_tensors,
    "dense.heads": r_heads,
    "dense.head_dim": r_head_dims,
    "dense.dropout_p": r_dropout,
    "dense.softmax_scale": r_scale,
    "dense.causal": r_causal,
    "dense.window_size": r_window,
    "dense.softcap": r_softcap,
    "dense.alibi_slopes": r_alibi,
    "dense.deterministic": r_deterministic,
    "dense.return_attn_probs": r_return_attn_probs,
    "qkvpacked.qkv": r_qkvpacked,
    "kvpacked.kv": r_kvpacked,
    "varlen.cu_seqlens": r_cu_seqlens,
    "varlen.max_seqlen": r_max_seqlen,
    "varlen.return_attn_probs": r_varlen_return,
    "varlen.block_table": r_varlen_block_table,
    "varlen_qkvpacked.qkv": r_varlen_qkvpacked,
    "varlen_kvpacked.kv": r_varlen_kvpacked,
    "kvcache.k_cache/v_cache": r_kv_cache,
    "kvcache.k/v": r_kv_append,
    "kvcache.rotary_cos/sin": r_kv_rotary,
    "kvcache.rotary_interleaved": r_kv_interleaved,
    "kvcache.cache_seqlens": r_kv_seqlens,
    "kvcache.cache_batch_idx": r_kv_batch_idx,
    "kvcache.cache_leftpad": r_kv_leftpad,
    "kvcache.block_table": r_kv_block_table,
    "kvcache.causal/window/softcap/alibi": r_kv_features,
    "kvcache.num_splits": r_kv_num_splits,
    "kvcache.return_softmax_lse": r_kv_return,
    "install.private_names": r_private_names,
}


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_row(row: str) -> None:
    ROWS[row]()


def test_every_row_of_the_doc_table_is_tested() -> None:
    ids = re.findall(r"^\| `([\w./]+)` \|", DOC.read_text(), flags=re.M)
    assert len(ids) == len(set(ids)), "an id appears twice in the doc table"
    assert set(ids) == set(ROWS), (f"doc only: {sorted(set(ids) - set(ROWS))}; "
                                   f"tests only: {sorted(set(ROWS) - set(ids))}")
