"""sdpa_flash.compat: flash-attn 2.8's API against a float64 reference written from flash-attn's documentation.

Every output, gradient and log-sum-exp is held to sdpa_flash.testing's rule (at most 2x the same-dtype reference's
error, plus the floor from the algorithm's error bound) through ``sdpa_flash.compat.testing.compare_flash``; every
path that can run a call on the CPU (sdpa, masked, exact) is forced in turn.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import pathlib
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import sdpa_flash
import sdpa_flash.compat as C
from sdpa_flash import AttentionInputError, BackendUnavailableError
from sdpa_flash.compat import bert_padding as bp
from sdpa_flash.compat._plan import CompatSpec, plan_call
from sdpa_flash.compat.testing import assert_flash_close, flash_reference, flash_varlen_reference
from sdpa_flash.policy import resolve_policy

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def make(b: int, sq: int, sk: int, hq: int, hk: int, d: int = 16, dv: int = 16, dtype: torch.dtype = torch.float32,
         seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, dv), (b, sq, hq, dv))
    return tuple(torch.randn(s, generator=g).to(dtype) for s in shapes)


def run_dense(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, path: str | None,
              **kw: Any) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with C.use_path(path), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention()'s math-fallback warnings (dropout, masks) are not the subject
        out, lse, _s_dmask = fn(*leaves, return_attn_probs=True, **kw)
    rows = torch.isfinite(lse).transpose(1, 2).unsqueeze(-1)
    grad = grad * rows  # rows that see no key pass no gradient (their output is a constant 0)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)], lse, grad


CASES = {  # id -> (Sq, Sk, flash-attn keyword arguments)
    "plain": (12, 12, {}),
    "causal-sq<sk": (9, 21, {"causal": True}),
    "causal-sq>sk": (21, 9, {"causal": True}),
    "window": (16, 16, {"window_size": (3, 2)}),
    "window-sq<sk": (9, 21, {"window_size": (4, 1)}),
    "window-causal-sq>sk": (21, 9, {"window_size": (2, -1), "causal": True}),
    "window-right-only": (16, 20, {"window_size": (-1, 3)}),
    "window-0-0": (10, 10, {"window_size": (0, 0)}),
    "softcap": (12, 18, {"softcap": 2.5}),
    "softcap-causal": (18, 12, {"softcap": 2.5, "causal": True}),
    "alibi-heads": (12, 16, {"alibi": "heads"}),
    "alibi-batch-causal": (16, 12, {"alibi": "batch_heads", "causal": True}),
    "everything": (14, 22, {"alibi": "batch_heads", "causal": True, "window_size": (5, -1), "softcap": 3.0,
                            "softmax_scale": 0.3}),
}


def _kwargs(kw: dict[str, Any], b: int, hq: int, seed: int = 1) -> dict[str, Any]:
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi:
        g = torch.Generator().manual_seed(seed)
        kw["alibi_slopes"] = torch.rand((hq,) if alibi == "heads" else (b, hq), generator=g)
    return kw


def _paths(kw: dict[str, Any], dtype: torch.dtype) -> list[str | None]:
    paths: list[str | None] = [None, "exact"]
    extra = kw.get("softcap") or kw.get("alibi") or kw.get("window_size", (-1, -1)) != (-1, -1)
    if not extra:
        paths.append("sdpa")
    elif not kw.get("softcap") and not (kw.get("alibi") and dtype == torch.bfloat16):
        paths.append("masked")
    return paths


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_flash_attn_func_matches_reference(case: str, heads: tuple[int, int], dtype: torch.dtype) -> None:
    sq, sk, kw0 = CASES[case]
    hq, hk = heads
    q, k, v, grad = make(2, sq, sk, hq, hk, 16, 8, dtype, seed=sq * 7 + sk)
    kw = _kwargs(kw0, 2, hq)
    for path in _paths(kw0, dtype):
        outs, lse, g = run_dense(C.flash_attn_func, q, k, v, grad, path, **kw)
        assert outs[0].shape == (2, sq, hq, 8) and outs[0].is_contiguous()
        assert lse.shape == (2, hq, sq) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_flash_close(outs, q, k, v, grad_out=g, lse=lse, **kw)


def test_rows_that_see_no_key_give_zero_and_lse_plus_inf() -> None:
    q, k, v, _ = make(1, 6, 3, 2, 2)
    for path in (None, "exact"):
        with C.use_path(path):
            out, lse, _ = C.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        # bottom-right causal, Sq=6 > Sk=3: query i sees keys j <= i - 3, so rows 0..2 see nothing
        assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
        assert torch.isposinf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    empty_k = k[:, :0]
    out, lse, _ = C.flash_attn_func(q, empty_k, v[:, :0], return_attn_probs=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()


def test_causal_is_bottom_right_as_documented() -> None:
    # flash-attn's docstring: Sq=2, Sk=5 -> [[1 1 1 1 0], [1 1 1 1 1]]; Sq=5, Sk=2 -> rows 0-2 empty, [1 0], [1 1]
    for sq, sk in ((2, 5), (5, 2)):
        q = torch.zeros(1, sq, 1, 16)
        k = torch.zeros(1, sk, 1, 16)
        v = torch.eye(sk).view(1, sk, 1, sk).expand(1, sk, 1, sk).contiguous()
        v = torch.nn.functional.pad(v, (0, 16 - sk))
        out = C.flash_attn_func(q, k, v, causal=True)[0, :, 0, :sk]
        seen = (out > 0).int().tolist()
        want = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]] if sq == 2 else [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
        assert seen == want


def test_dense_plain_calls_go_through_attention_with_no_copy() -> None:
    q, k, v, _ = make(2, 16, 24, 4, 2)
    plan = C.explain_flash_attn(C.flash_attn_func, q, k, v, causal=True)
    assert plan.path == "sdpa" and "causal='bottom_right'" in plan.notes[0]
    got = C.flash_attn_func(q, k, v, causal=True)
    want = sdpa_flash.attention(q, k, v, causal="bottom_right", layout="bshd")
    assert torch.equal(got, want)


def test_packed_layouts_match_the_unpacked_call() -> None:
    q, k, v, grad = make(2, 12, 12, 4, 4)
    qkv = torch.stack([q, k, v], 2).requires_grad_()
    out = C.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(3, -1))
    ref = C.flash_attn_func(q, k, v, causal=True, window_size=(3, -1))
    assert torch.equal(out, ref)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    assert dqkv.shape == qkv.shape
    kv = torch.stack([k[:, :, :2], v[:, :, :2]], 2)
    out = C.flash_attn_kvpacked_func(q, kv, softcap=4.0)
    assert torch.equal(out, C.flash_attn_func(q, k[:, :, :2], v[:, :, :2], softcap=4.0))
    _o, lse, s = C.flash_attn_qkvpacked_func(qkv, return_attn_probs=True)
    assert lse.shape == (2, 4, 12) and s.numel() == 0


def test_return_attn_probs_with_dropout_gives_the_dropout_pattern() -> None:
    q, k, v, grad = make(2, 10, 14, 4, 2, dtype=torch.float64)
    p = 0.3
    torch.manual_seed(0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, s_dmask = C.flash_attn_func(*leaves, dropout_p=p, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 10, 14) and s_dmask.dtype == q.dtype
    keep = s_dmask >= 0
    assert 0.55 < keep[s_dmask != 0].double().mean() < 0.85
    ref_out, ref_lse = flash_reference(q, k, v, causal=True, dropout_mask=keep.double() / (1 - p))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = flash_reference(*ref_leaves, causal=True, dropout_mask=keep.double() / (1 - p))
    for a, b in zip(grads, torch.autograd.grad(ref_out, ref_leaves, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # the backward redrew the same dropout masks
    torch.testing.assert_close(s_dmask.abs(), torch.softmax(
        (q.transpose(1, 2) @ k.transpose(1, 2).repeat_interleave(2, 1).transpose(-1, -2) * 16 ** -0.5)
        .masked_fill(~torch.ones(10, 14, dtype=torch.bool).tril(4), float("-inf")), -1))


def test_dropout_without_probs_runs_on_the_fast_path_and_is_unbiased() -> None:
    q, k, v, _ = make(1, 64, 64, 2, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = torch.stack([C.flash_attn_func(q, k, v, dropout_p=0.5) for _ in range(64)])
        assert C.explain_flash_attn(C.flash_attn_func, q, k, v, dropout_p=0.5).path == "sdpa"
    ref, _ = flash_reference(q, k, v)
    assert (outs.mean(0) - ref).abs().mean() < 0.05 < (outs[0] - ref).abs().mean()


# ------------------------------------------------------------------------------------------------- varlen
VARLEN = {  # id -> (q lengths, k lengths); zero-length sequences included
    "self": ([5, 0, 9, 3], [5, 0, 9, 3]),
    "cross": ([5, 2, 9, 3], [7, 4, 0, 11]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("lengths", list(VARLEN), ids=list(VARLEN))
@pytest.mark.parametrize("case", ["plain", "causal-sq>sk", "window-causal-sq>sk", "softcap", "alibi-batch-causal",
                                  "everything"])
def test_flash_attn_varlen_func_matches_reference(case: str, lengths: str, dtype: torch.dtype) -> None:
    lq, lk = VARLEN[lengths]
    kw0 = CASES[case][2]
    cq = [0, *itertools.accumulate(lq)]
    ck = [0, *itertools.accumulate(lk)]
    nseq, hq, hk = len(lq), 4, 2
    g = torch.Generator().manual_seed(len(case))
    tq = cq[-1] + 2  # two trailing rows past the last sequence: they must come back 0
    q = torch.randn(tq, hq, 16, generator=g).to(dtype)
    k = torch.randn(ck[-1], hk, 16, generator=g).to(dtype)
    v = torch.randn(ck[-1], hk, 8, generator=g).to(dtype)
    grad = torch.randn(tq, hq, 8, generator=g).to(dtype)
    kw = _kwargs(kw0, nseq, hq)
    cu_q, cu_k = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    for path in _paths(kw0, dtype):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with C.use_path(path), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, lse, s_dmask = C.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True,
                                                         **kw)
        assert out.shape == (tq, hq, 8) and lse.shape == (hq, tq) and s_dmask.numel() == 0
        assert torch.equal(out[cq[-1]:], torch.zeros_like(out[cq[-1]:]))
        gq = grad * torch.isfinite(lse).t().unsqueeze(-1)
        dq, dk, dv = torch.autograd.grad(out, leaves, gq)
        for b in range(nseq):  # sequences are independent: compare each with the dense reference
            qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
            if qe == qs:
                continue
            sl = kw.get("alibi_slopes")
            kwb = {**kw, "alibi_slopes": None if sl is None else sl[b:b + 1]}
            sub = [t[None] for t in (out[qs:qe], dq[qs:qe], dk[ks:ke], dv[ks:ke])]
            assert_flash_close(sub, q[qs:qe][None], k[ks:ke][None], v[ks:ke][None], grad_out=gq[qs:qe][None],
                               lse=lse[:, qs:qe][None], window_limit=max(lk), **kwb)
        _ref, ref_lse = flash_varlen_reference(q.double(), k.double(), v.double(), cq, ck, **kw)
        assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))


def test_varlen_packed_forms_and_window_limit_is_max_seqlen_k() -> None:
    lens = [4, 7, 1]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(12, 3, 2, 16, generator=g)
    out = C.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True, window_size=(2, 0))
    ref = C.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 7, 7, causal=True, window_size=(2, 0))
    assert torch.equal(out, ref)
    out = C.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 7, 7, softcap=2.0)
    assert torch.equal(out, C.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 7, 7, softcap=2.0))
    # a left side of 7 >= max_seqlen_k is unbounded (flash-attn's normalisation), like -1
    a = C.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, window_size=(7, 1))
    b = C.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, window_size=(-1, 1))
    assert torch.equal(a, b)


def test_varlen_with_a_paged_kv_block_table() -> None:
    _lens_q, lens_k, page, hk = [3, 2], [5, 9], 4, 2
    g = torch.Generator().manual_seed(5)
    cache_k = torch.randn(6, page, hk, 16, generator=g)
    cache_v = torch.randn(6, page, hk, 16, generator=g)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)  # pages of each sequence, in order
    packed_k = torch.cat([cache_k[table[b].long()].flatten(0, 1)[: lens_k[b]] for b in range(2)])
    packed_v = torch.cat([cache_v[table[b].long()].flatten(0, 1)[: lens_k[b]] for b in range(2)])
    q = torch.randn(5, 4, 16, generator=g)
    cq = torch.tensor([0, 3, 5], dtype=torch.int32)
    ck = torch.tensor([0, 5, 14], dtype=torch.int32)
    out = C.flash_attn_varlen_func(q, cache_k, cache_v, cq, ck, 3, 9, causal=True, block_table=table)
    ref = C.flash_attn_varlen_func(q, packed_k, packed_v, cq, ck, 3, 9, causal=True)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------- planning
def test_plan_on_a_cuda_profile_hands_variants_to_the_planner_then_flex() -> None:
    from sdpa_flash.backends import get_backend
    from sdpa_flash.backends.flex import environment_reasons
    from sdpa_flash.planner import plan
    from sdpa_flash.spec import AttentionSpec

    caps = sdpa_flash.Capabilities.synthetic("cuda", (9, 0), total_memory=140 * 2**30)
    spec = CompatSpec("dense", "cuda", torch.bfloat16, 1, 16, 16, 4096, 4096, 128, 128,
                      C.Features(causal=True, left=1024, right=0))
    # The kernel is the one planner's choice, as attention(window=...) would make it
    kernel = plan(AttentionSpec("cuda", torch.bfloat16, 1, 16, 16, 4096, 4096, 128, 128, "top_left",
                                window=(1024, None)), caps)
    p = plan_call(spec, caps)
    if get_backend(kernel.backend).fused:  # torch's flash op takes window sizes here (feature-detected)
        assert p.path == "sdpa" and not p.fallback and "window=" in p.explain()
    # Under a policy whose kernels have no window (cuDNN), FlexAttention is next, then the masked path
    cudnn = plan_call(spec, caps, policy=resolve_policy("cudnn"))
    assert "cudnn" in cudnn.reasons["sdpa"][0] and "window" in cudnn.reasons["sdpa"][0]
    if environment_reasons("cuda", (9, 0)):  # no Triton on this machine: the fallback is explained
        assert cudnn.path == "masked" and cudnn.fallback and "flex" in cudnn.reasons
        with pytest.raises(BackendUnavailableError, match="fall back"):
            plan_call(spec, caps, fallback_mode="error", policy=resolve_policy("cudnn"))
    else:
        assert cudnn.path == "flex" and not cudnn.fallback
    # Softcap: no SDPA kernel does it and no mask can say it; the planner runs it on FlexAttention (FA4 absent)
    softcap = CompatSpec("dense", "cuda", torch.bfloat16, 1, 16, 16, 4096, 4096, 128, 128, C.Features(softcap=30.0))
    sp = plan_call(softcap, caps)
    assert (sp.path, sp.kernel) == ("sdpa", "flex"), sp.explain()
    sp = plan_call(softcap, caps, policy=resolve_policy("cudnn,flash,efficient"))
    assert sp.path != "sdpa" and any("softcap" in r for r in sp.reasons["sdpa"])
    assert "softcap is a non-linear" in sp.reasons["masked"][0]
    dropout = CompatSpec("dense", "cuda", torch.bfloat16, 1, 16, 16, 4096, 4096, 128, 128,
                         C.Features(alibi="heads"), dropout=True)
    assert any("dropout" in r for r in plan_call(dropout, caps).reasons["flex"])
    det = CompatSpec("dense", "cuda", torch.bfloat16, 1, 16, 16, 512, 512, 128, 128, C.Features(causal=True),
                     needs_grad=True, deterministic=True)
    assert plan_call(det, caps).path == "exact"
    plain = CompatSpec("dense", "cuda", torch.bfloat16, 1, 16, 16, 512, 512, 128, 128, C.Features(causal=True))
    assert plan_call(plain, caps).path == "sdpa"


def test_varlen_windows_get_the_planners_packed_kernel_on_a_cuda_profile() -> None:
    from sdpa_flash.backends.flash import packed_window_args

    caps = sdpa_flash.Capabilities.synthetic("cuda", (8, 0), total_memory=80 * 2**30)  # an A100: no FA4
    window = CompatSpec("varlen", "cuda", torch.bfloat16, 6, 16, 4, 3000, 3000, 128, 128,
                        C.Features(causal=True, left=255, right=0), needs_grad=True)
    p = plan_call(window, caps)
    if packed_window_args():  # PyTorch's packed flash op takes the window itself
        assert (p.path, p.kernel) == ("sdpa", "flash") and "window=" in p.explain(), p.explain()
    else:
        assert p.path != "sdpa" and any("window_size_left/right" in r for r in p.reasons["sdpa"]), p.explain()
    # softcap: no packed kernel of this profile has it; the varlen engine runs it on FlexAttention, group by group
    softcap = dataclasses.replace(window, features=C.Features(causal=True, softcap=30.0))
    sp = plan_call(softcap, caps)
    assert (sp.path, sp.kernel) == ("sdpa", "flex"), sp.explain()


def test_cpu_plans_and_forced_paths() -> None:
    q, k, v, _ = make(1, 8, 8, 2, 2)
    assert C.explain_flash_attn(C.flash_attn_func, q, k, v, softcap=3.0).path == "exact"
    assert C.explain_flash_attn(C.flash_attn_func, q, k, v, window_size=(2, 2)).path == "masked"
    p = C.explain_flash_attn(C.flash_attn_func, q, k, v, alibi_slopes=torch.ones(2))
    assert p.path == "masked" and "how:" in p.explain()
    with C.use_path("sdpa"), pytest.raises(BackendUnavailableError, match="window_size"):
        C.flash_attn_func(q, k, v, window_size=(2, 2))
    with C.use_path("flex"), pytest.raises(BackendUnavailableError, match="not used on the CPU"):
        C.flash_attn_func(q, k, v, softcap=2.0)
    with pytest.raises(AttentionInputError, match="Expected path"):
        with C.use_path("cudnn"):
            pass
    with pytest.raises(AttentionInputError, match="Expected fn"):
        C.explain_flash_attn(sdpa_flash.attention, q, k, v)


def test_masked_path_steps_aside_when_the_mask_would_not_fit() -> None:
    q, k, v, _ = make(1, 64, 64, 2, 2)
    with sdpa_flash.use_policy("auto", memory_budget=1024):
        p = C.explain_flash_attn(C.flash_attn_func, q, k, v, window_size=(8, 8))
    assert p.path == "exact" and "memory budget" in p.reasons["masked"][-1]


def test_importing_sdpa_flash_does_not_import_compat_or_flex() -> None:
    code = ("import sys, sdpa_flash; bad = [m for m in sys.modules if m.startswith('sdpa_flash.compat') or "
            "m == 'torch.nn.attention.flex_attention']; assert not bad, bad")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------- bad input
def _qkv(**kw: Any) -> tuple[torch.Tensor, ...]:
    return make(2, 8, 8, 4, 2, **kw)[:3]


BAD: dict[str, tuple[Any, str]] = {
    "rank-3-q": (lambda: C.flash_attn_func(_qkv()[0][0], *_qkv()[1:]), r"Expected q to be a 4-D tensor"),
    "k-not-tensor": (lambda: C.flash_attn_func(_qkv()[0], None, _qkv()[2]), r"Expected k to be a torch\.Tensor"),
    "int-dtype": (lambda: C.flash_attn_func(_qkv()[0].long(), *_qkv()[1:]), r"q to be a floating-point tensor"),
    "dtype-mix": (lambda: C.flash_attn_func(_qkv()[0].double(), *_qkv()[1:]), r"one dtype"),
    "head-dim": (lambda: C.flash_attn_func(_qkv()[0], *_qkv(d=8)[1:]), r"same head dim, but got 16 and 8"),
    "heads-not-multiple": (lambda: C.flash_attn_func(*make(1, 4, 4, 3, 2)[:3]), r"multiple of the key/value heads"),
    "batch": (lambda: C.flash_attn_func(_qkv()[0][:1], *_qkv()[1:]), r"one batch size, but got 1, 2, 2"),
    "window-float": (lambda: C.flash_attn_func(*_qkv(), window_size=(1.5, 2)), r"Expected window_size to be a pair"),
    "window-int": (lambda: C.flash_attn_func(*_qkv(), window_size=4), r"Expected window_size to be a pair"),
    "softcap-negative": (lambda: C.flash_attn_func(*_qkv(), softcap=-1.0), r"Expected softcap to be a finite float"),
    "dropout-1": (lambda: C.flash_attn_func(*_qkv(), dropout_p=1.0), r"Expected dropout_p"),
    "scale-nan": (lambda: C.flash_attn_func(*_qkv(), softmax_scale=float("nan")), r"Expected softmax_scale"),
    "causal-str": (lambda: C.flash_attn_func(*_qkv(), causal="yes"), r"Expected causal to be a bool"),
    "alibi-shape": (lambda: C.flash_attn_func(*_qkv(), alibi_slopes=torch.ones(3)), r"alibi_slopes of shape"),
    "alibi-dtype": (lambda: C.flash_attn_func(*_qkv(), alibi_slopes=torch.ones(4, dtype=torch.float64)),
                    r"alibi_slopes to have dtype float32"),
    "qkv-rank": (lambda: C.flash_attn_qkvpacked_func(_qkv()[0]), r"Expected qkv to be a 5-D tensor"),
    "qkv-not-3": (lambda: C.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16)), r"size 3 in dimension 2"),
    "cu-int64": (lambda: C.flash_attn_varlen_func(*[t[0] for t in _qkv()], torch.tensor([0, 8]),
                                                  torch.tensor([0, 8], dtype=torch.int32), 8, 8),
                 r"cu_seqlens_q to have dtype int32"),
    "cu-start": (lambda: C.flash_attn_varlen_func(*[t[0] for t in _qkv()], torch.tensor([1, 8], dtype=torch.int32),
                                                  torch.tensor([0, 8], dtype=torch.int32), 8, 8),
                 r"cu_seqlens_q to start at 0"),
    "cu-decreasing": (lambda: C.flash_attn_varlen_func(*[t[0] for t in _qkv()],
                                                       torch.tensor([0, 5, 3], dtype=torch.int32),
                                                       torch.tensor([0, 4, 8], dtype=torch.int32), 8, 8),
                      r"non-decreasing"),
    "cu-past-total": (lambda: C.flash_attn_varlen_func(*[t[0] for t in _qkv()],
                                                       torch.tensor([0, 9], dtype=torch.int32),
                                                       torch.tensor([0, 8], dtype=torch.int32), 9, 8),
                      r"at most the number of packed tokens 8"),
    "max-seqlen-small": (lambda: C.flash_attn_varlen_func(*[t[0] for t in _qkv()],
                                                          torch.tensor([0, 8], dtype=torch.int32),
                                                          torch.tensor([0, 8], dtype=torch.int32), 4, 8),
                         r"max_seqlen_q >= the longest sequence"),
    "varlen-rank": (lambda: C.flash_attn_varlen_func(*_qkv(), torch.tensor([0, 8], dtype=torch.int32),
                                                     torch.tensor([0, 8], dtype=torch.int32), 8, 8),
                    r"Expected q to be a 3-D tensor"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_typed_errors_naming_the_argument(case: str) -> None:
    call, pattern = BAD[case]
    with pytest.raises(AttentionInputError, match=pattern):
        call()


# ------------------------------------------------------------------------------------------------- install
def test_install_resolves_flash_attn_only_while_installed() -> None:
    before = sys.modules.get("flash_attn")  # FA4's namespace package, where the fa4 backend has loaded it
    spec = importlib.util.find_spec("flash_attn") if before is None else before.__spec__
    real = spec is not None and spec.origin not in (None, "namespace")  # flash-attn 2 has an __init__.py
    if real and not C.installed():
        pytest.skip("the real flash-attn is installed here")  # (FA4 alone is a namespace package: tested too)
    try:
        assert C.install() and C.install()  # idempotent
        import flash_attn
        from flash_attn import flash_attn_func
        from flash_attn.bert_padding import pad_input, unpad_input
        from flash_attn.flash_attn_interface import flash_attn_varlen_func, flash_attn_with_kvcache

        assert flash_attn_func is C.flash_attn_func and flash_attn_varlen_func is C.flash_attn_varlen_func
        assert flash_attn_with_kvcache is C.flash_attn_with_kvcache
        assert unpad_input is bp.unpad_input and pad_input is bp.pad_input
        assert flash_attn.__version__ == C.FLASH_ATTN_VERSION
        assert importlib.util.find_spec("flash_attn") is not None
        if spec is not None:  # FlashAttention-4 is here: its flash_attn.cute is still found (the fa4 backend needs it)
            assert importlib.util.find_spec("flash_attn.cute") is not None  # (found, not imported: FA4 needs triton)
    finally:
        C.uninstall()
        C.uninstall()
    assert sys.modules.get("flash_attn") is before and not C.installed()  # as it was
    if spec is None:
        with pytest.raises(ImportError):
            import flash_attn


def test_submodules_compat_does_not_provide_say_what_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    before = sys.modules.get("flash_attn")
    spec = importlib.util.find_spec("flash_attn") if before is None else before.__spec__
    if spec is not None and spec.origin not in (None, "namespace") and not C.installed():
        pytest.skip("the real flash-attn is installed here")
    try:
        assert C.install()
        for stmt, missing in (("import flash_attn.layers.rotary", "flash_attn.layers"),
                              ("from flash_attn.ops.triton.rotary import apply_rotary", "flash_attn.ops"),
                              ("import flash_attn.modules.mha", "flash_attn.modules")):
            with pytest.raises(ModuleNotFoundError) as info:
                exec(stmt, {})
            assert isinstance(info.value, C.NotProvidedError) and info.value.name == missing
            assert str(info.value) == (
                f"No module named {missing!r}: flash_attn here is sdpa_flash's drop-in (sdpa_flash.compat.install(); "
                "the real flash-attn package is not installed), and it provides flash-attn 2.8's public attention "
                "API only: flash_attn (flash_attn_func, the qkvpacked/kvpacked and varlen variants, "
                "flash_attn_with_kvcache), flash_attn.flash_attn_interface and flash_attn.bert_padding. For "
                "flash_attn's layers, modules and ops (rotary, MHA, fused dense, ...) install flash-attn itself.")
        assert importlib.import_module("flash_attn.bert_padding").unpad_input is bp.unpad_input  # still imports
    finally:
        C.uninstall()
    assert sys.modules.get("flash_attn") is before


def _fake_fa4_tree(root: pathlib.Path) -> None:
    """FlashAttention-4's layout: flash_attn/cute/ with no flash_attn/__init__.py (a namespace package)."""
    (root / "flash_attn" / "cute").mkdir(parents=True)
    (root / "flash_attn" / "cute" / "__init__.py").write_text("WHO = 'fa4'\n")


@pytest.fixture
def fa4_namespace(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if importlib.util.find_spec("flash_attn") is not None or "flash_attn" in sys.modules:
        pytest.skip("a flash_attn package is installed here")
    _fake_fa4_tree(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    C.uninstall()
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


@pytest.mark.parametrize("cute_imported_first", [False, True], ids=["install_first", "fa4_first"])
def test_install_alongside_flashattention4_keeps_flash_attn_cute(fa4_namespace: None,
                                                                 cute_imported_first: bool) -> None:
    # FA4 alone is not "the real flash-attn": installing must work, and must not hide flash_attn.cute (the fa4
    # backend imports it), whichever was imported first
    if cute_imported_first:
        import flash_attn.cute
    assert C.install() and C.installed()
    import flash_attn
    import flash_attn.cute
    from flash_attn import flash_attn_func

    assert flash_attn_func is C.flash_attn_func and flash_attn.__version__ == C.FLASH_ATTN_VERSION
    assert flash_attn.cute.WHO == "fa4" and flash_attn.cute is sys.modules["flash_attn.cute"]
    C.uninstall()
    import flash_attn as after

    assert not hasattr(after, "flash_attn_func") and getattr(after, "__file__", None) is None  # FA4's namespace


def test_install_leaves_a_real_flash_attn_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert C.install() is False and not C.installed()


# ------------------------------------------------------------------------------------------------- bert_padding
def test_unpad_pad_roundtrip_and_arity() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    unused = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3, 4, 2, 5, requires_grad=True)
    res = bp.unpad_input(x, mask)
    assert len(res) == 5
    packed, indices, cu, max_len, used = res
    assert packed.shape == (8, 2, 5) and cu.dtype == torch.int32 and cu.tolist() == [0, 2, 6, 8]
    assert max_len == 4 and isinstance(max_len, int) and used.tolist() == [2, 4, 2] and used.dtype == torch.int32
    assert indices.tolist() == [0, 1, 4, 5, 6, 7, 9, 10]
    back = bp.pad_input(packed, indices, 3, 4)
    assert torch.equal(back, x * mask[..., None, None])
    (gx,) = torch.autograd.grad(back.sum(), x)
    assert torch.equal(gx, mask[..., None, None].float().expand_as(x))
    packed2, _, cu2, max2, used2 = bp.unpad_input(x, mask, unused)
    assert cu2.tolist() == [0, 3, 7, 9] and max2 == 4 and used2.tolist() == [2, 4, 2] and packed2.shape[0] == 9
    assert torch.equal(bp.index_first_axis(x.flatten(0, 1), indices), packed)
    put = bp.index_put_first_axis(packed, indices, 12)
    assert torch.equal(put.view(3, 4, 2, 5), back)
    _p3, idx3, cu3, max3 = bp.unpad_input_for_concatenated_sequences(x, torch.tensor([[2, 1, 0, 0], [4, 0, 0, 0],
                                                                                     [1, 0, 0, 0]]))
    assert cu3.tolist() == [0, 2, 3, 7, 8] and max3 == 4 and idx3.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    with pytest.raises(AttentionInputError, match="attention_mask of shape"):
        bp.unpad_input(x, mask[:, :3])


def test_unpad_feeds_varlen_and_pad_restores_the_batch() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q, k, v, _ = make(2, 5, 5, 2, 2)
    qu, idx, cu, mx, _ = bp.unpad_input(q, mask)
    ku, vu = bp.unpad_input(k, mask)[0], bp.unpad_input(v, mask)[0]
    out = bp.pad_input(C.flash_attn_varlen_func(qu, ku, vu, cu, cu, mx, mx, causal=True), idx, 2, 5)
    ref0 = C.flash_attn_func(q[:1, :3], k[:1, :3], v[:1, :3], causal=True)
    torch.testing.assert_close(out[:1, :3], ref0)
    assert torch.equal(out[0, 3:], torch.zeros_like(out[0, 3:]))


# ------------------------------------------------------------------------------------------------- flex (CPU)
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "docs", "ranges"])
def test_flex_score_and_mask_functions_on_the_cpu(mode: str) -> None:
    """FlexAttention's score/mask functions of each call structure, forward, against the exact path.

    The CPU is not a flex device for the planner (see sdpa_flash.backends.flex), so this calls the flex runner
    directly, at lengths where the CPU kernel is right (multiples of 128); one compile (~10 s) per structure.
    """
    from sdpa_flash.backends import flex as _flex
    from sdpa_flash.compat._common import features
    from sdpa_flash.compat._exact import Geometry

    g = torch.Generator().manual_seed(11)
    b, hq, hk, d = (2, 4, 2, 16) if mode != "docs" else (1, 4, 2, 16)
    sq, sk = {"dense": (256, 128), "docs": (128, 256), "ranges": (2, 128)}[mode]
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h, s in ((hq, sq), (hk, sk), (hk, sk)))
    feats = features(True, (37, -1), 5.0, "batch_heads", sk)
    slopes = torch.rand(b if mode != "docs" else 3, hq, generator=g)
    kw = {"causal": True, "window_size": (37, -1), "softcap": 5.0, "softmax_scale": 0.25}
    bshd = [t.transpose(1, 2) for t in (q, k, v)]
    with torch.no_grad():
        if mode == "dense":  # Sq > Sk: the first 128 rows see no key and must come back 0
            out, _ = _flex.flex_run(q, k, v, feats, 0.25, slopes, want_lse=False)
            assert_flash_close([out.transpose(1, 2)], *bshd, alibi_slopes=slopes, **kw)
            assert torch.equal(out[:, :, :128], torch.zeros_like(out[:, :, :128]))
        elif mode == "ranges":  # row 1 sees no key at all
            start, end = torch.tensor([0, 3]), torch.tensor([40, 3])
            geo = Geometry.ranges(sq, start, end, sk)
            out, _ = _flex.flex_run(q, k, v, feats, 0.25, slopes, want_lse=False,
                                    ranges=(geo.q_eff, geo.k_pos, geo.k_valid))  # type: ignore[arg-type]
            assert_flash_close([out.transpose(1, 2)], *bshd, alibi_slopes=slopes, key_range=(start, end), **kw)
            assert torch.equal(out[1], torch.zeros_like(out[1]))
        else:  # three documents of (q, k) lengths (50, 100), (0, 60), (78, 96)
            from sdpa_flash.compat._run import _varlen_flex

            lq, lk = [0, 50, 50, 128], [0, 100, 160, 256]
            packed = [t[0] for t in bshd]
            out, _, _ = _varlen_flex(*packed, lq, lk, feats, 0.25, slopes, False)
            for n in (0, 2):
                assert_flash_close([out[lq[n]:lq[n + 1]][None]], packed[0][lq[n]:lq[n + 1]][None],
                                   *(t[lk[n]:lk[n + 1]][None] for t in packed[1:]), alibi_slopes=slopes[n:n + 1],
                                   window_limit=256, **kw)
    assert not torch.isnan(out).any()


def test_a_failing_flex_falls_back_once_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdpa_flash.backends import flex as _flex
    from sdpa_flash.compat import _plan

    calls = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(_plan, "_order", lambda spec, caps: ("flex", "masked", "exact") if spec.features.extra
                        else ("sdpa", "exact"))
    monkeypatch.setattr(_flex, "not_supported_reasons", lambda spec, caps: [])
    monkeypatch.setattr(_flex, "flex_run", broken)
    _plan.plan_call.cache_clear()
    try:
        q, k, v, _ = make(1, 12, 12, 2, 2, seed=42)
        with pytest.warns(UserWarning, match="FlexAttention failed"):
            out = C.flash_attn_func(q, k, v, window_size=(3, 1))
        out2 = C.flash_attn_func(q, k, v, window_size=(3, 1))
        assert len(calls) == 1 and torch.equal(out, out2)
        assert_flash_close([out], q, k, v, window_size=(3, 1))
        with C.use_path("flex"), pytest.raises(RuntimeError, match="simulated"):
            C.flash_attn_func(q, k, v, window_size=(3, 1))
    finally:
        _plan.plan_call.cache_clear()


def test_output_follows_the_query_layout_as_flash_attn_does() -> None:
    # flash-attn 2 allocates out with empty_like(q): a (B, S, H, D) view of a (B, H, S, D) tensor gives an output
    # of that memory order, not a contiguous copy; a contiguous q gives a contiguous output.
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 4, 24, 16, generator=gen) for _ in range(3)]
    views = [t.transpose(1, 2) for t in base]
    out = C.flash_attn_func(*views, causal=True)
    assert out.shape == (2, 24, 4, 16) and not out.is_contiguous()
    assert out.transpose(1, 2).is_contiguous()
    dense = C.flash_attn_func(*(t.contiguous() for t in views), causal=True)
    assert dense.is_contiguous()
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
