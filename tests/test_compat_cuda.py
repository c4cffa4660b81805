"""sdpa_flash.compat on a CUDA GPU (skipped without one): every SDPA backend the dense path may be given, the
FlexAttention path for windows / softcap / ALiBi (dense, varlen, kvcache), bf16, forward and backward, against the
float64 reference of flash-attn's documented semantics, with sdpa_flash.testing's tolerance rule.

Run on the GPU machine with ``python -m pytest tests/test_compat_cuda.py -x -q`` (first flex compiles take seconds).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import pytest
import torch
from conftest import skip_unless_optional_missing

import sdpa_flash
import sdpa_flash.compat as C
from sdpa_flash import BackendUnavailableError
from sdpa_flash.compat.testing import assert_flash_close

pytestmark = pytest.mark.cuda
DEV = "cuda"
BF16 = torch.bfloat16


def make(b: int, sq: int, sk: int, hq: int, hk: int, d: int, dtype: torch.dtype = BF16, seed: int = 0
         ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, hq, d))
    return tuple(torch.randn(s, generator=g).to(dtype).to(DEV) for s in shapes)


def fwd_bwd(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, **kw: Any
            ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = fn(*leaves, return_attn_probs=True, **kw)
    g = grad * torch.isfinite(lse).transpose(1, 2).unsqueeze(-1)
    return [out.detach(), *torch.autograd.grad(out, leaves, g)], lse, g


SHAPES = [(2, 256, 256, 8, 8, 64), (2, 200, 328, 8, 2, 128), (1, 328, 200, 8, 1, 128)]


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_path_on_every_backend(backend: str, shape: tuple[int, ...], causal: bool) -> None:
    q, k, v, grad = make(*shape, seed=sum(shape))
    with sdpa_flash.use_policy(backend):
        try:
            sdpa_flash.explain(q, k, v, causal="bottom_right" if causal else False, layout="bshd")
        except BackendUnavailableError as exc:
            skip_unless_optional_missing(backend, exc)
        assert C.explain_flash_attn(C.flash_attn_func, q, k, v, causal=causal).path == "sdpa"
        outs, lse, g = fwd_bwd(C.flash_attn_func, q, k, v, grad, causal=causal)
    assert_flash_close(outs, q, k, v, grad_out=g, lse=lse, causal=causal)


FLEX = {
    "window-causal": {"causal": True, "window_size": (64, -1)},
    "window-both": {"window_size": (48, 16)},
    "softcap": {"softcap": 20.0},
    "softcap-causal": {"softcap": 20.0, "causal": True},
    "alibi-heads": {"alibi": "heads"},
    "alibi-batch-causal": {"alibi": "batch_heads", "causal": True},
    "everything": {"alibi": "batch_heads", "causal": True, "window_size": (96, -1), "softcap": 30.0,
                   "softmax_scale": 0.1},
}


def _kw(kw: dict[str, Any], b: int, hq: int) -> dict[str, Any]:
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi:
        kw["alibi_slopes"] = (torch.rand((hq,) if alibi == "heads" else (b, hq)) * 0.2).to(DEV)
    return kw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(FLEX), ids=list(FLEX))
def test_flex_path_bf16_forward_backward(case: str, shape: tuple[int, ...]) -> None:
    q, k, v, grad = make(*shape, seed=len(case))
    kw = _kw(FLEX[case], shape[0], shape[3])
    with C.use_path("flex"):  # FlexAttention itself, also where FA4 (installed) would take the call
        plan = C.explain_flash_attn(C.flash_attn_func, q, k, v, **kw)
        assert plan.path == "flex", plan.explain()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdpa_flash.compat")  # no fallback: flex must have run
            outs, lse, g = fwd_bwd(C.flash_attn_func, q, k, v, grad, **kw)
    assert_flash_close(outs, q, k, v, grad_out=g, lse=lse, **kw)
    auto = C.explain_flash_attn(C.flash_attn_func, q, k, v, **kw)
    fa4 = sdpa_flash.capabilities(DEV).kernel_version("fa4") and torch.cuda.get_device_capability() >= (9, 0)
    if "alibi" in FLEX[case]:  # no fused kernel has ALiBi
        assert auto.path == "flex", auto.explain()
    elif fa4:  # the planner's kernel for windows and softcap: FA4 (bf16, head dim 64 here)
        assert (auto.path, auto.kernel) == ("sdpa", "fa4"), auto.explain()
    else:  # windows: PyTorch's flash kernel where its ops take window sizes; softcap: FlexAttention
        assert auto.path == ("sdpa" if auto.kernel else "flex"), auto.explain()
        assert auto.kernel in (None, "flash") and not ("softcap" in FLEX[case] and auto.kernel)


@pytest.mark.sm90
@pytest.mark.skipif(not (torch.cuda.is_available() and sdpa_flash.capabilities("cuda").kernel_version("fa4")),
                    reason="needs flash-attn-4 (pip install 'sdpa_flash[fa4]')")
@pytest.mark.parametrize("case", [c for c in FLEX if "alibi" not in FLEX[c]])
def test_windows_and_softcap_on_the_planners_fa4_bf16_forward_backward(case: str) -> None:
    shape = SHAPES[0]
    q, k, v, grad = make(*shape, seed=len(case))
    kw = _kw(FLEX[case], shape[0], shape[3])
    plan = C.explain_flash_attn(C.flash_attn_func, q, k, v, **kw)
    assert (plan.path, plan.kernel) == ("sdpa", "fa4"), plan.explain()
    outs, lse, g = fwd_bwd(C.flash_attn_func, q, k, v, grad, **kw)
    assert_flash_close(outs, q, k, v, grad_out=g, lse=lse, **kw)


# The masked path has no softcap (non-linear in the scores: no additive mask expresses it), so those pairs are not
# cases (tests/test_compat.py checks the planner's reason).
MASKED_EXACT = [(case, path) for case in ("window-causal", "softcap", "alibi-heads", "everything")
                for path in ("masked", "exact") if not (path == "masked" and "softcap" in FLEX[case])]


@pytest.mark.parametrize(("case", "path"), MASKED_EXACT, ids=[f"{c}-{p}" for c, p in MASKED_EXACT])
def test_masked_and_exact_paths_on_cuda(case: str, path: str) -> None:
    kw0 = FLEX[case]
    dtype = torch.float32 if path == "masked" and "alibi" in kw0 else BF16  # bf16 ALiBi has no exact masked form
    q, k, v, grad = make(2, 200, 328, 8, 2, 64, dtype)
    kw = _kw(kw0, 2, 8)
    with C.use_path(path):
        outs, lse, g = fwd_bwd(C.flash_attn_func, q, k, v, grad, **kw)
    assert_flash_close(outs, q, k, v, grad_out=g, lse=lse, **kw)


def test_flex_varlen_bf16_forward_backward() -> None:
    lq, lk = [130, 0, 257, 64, 300], [200, 50, 257, 0, 128]
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    hq, hk, d = 8, 2, 128
    g = torch.Generator().manual_seed(3)
    q = torch.randn(cq[-1], hq, d, generator=g).to(BF16).to(DEV)
    k = torch.randn(ck[-1], hk, d, generator=g).to(BF16).to(DEV)
    v = torch.randn(ck[-1], hk, d, generator=g).to(BF16).to(DEV)
    grad = torch.randn(cq[-1], hq, d, generator=g).to(BF16).to(DEV)
    kw = _kw({"causal": True, "window_size": (100, -1), "softcap": 30.0, "alibi": "batch_heads"}, len(lq), hq)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEV) for c in (cq, ck))
    plan = C.explain_flash_attn(C.flash_attn_varlen_func, q, k, v, cu_q, cu_k, max(lq), max(lk), **kw)
    assert plan.path == "flex", plan.explain()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = C.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True, **kw)
    gq = grad * torch.isfinite(lse).t().unsqueeze(-1)
    dq, dk, dv = torch.autograd.grad(out, leaves, gq)
    for b in range(len(lq)):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        kwb = {**kw, "alibi_slopes": kw["alibi_slopes"][b:b + 1]}
        assert_flash_close([t[None] for t in (out[qs:qe], dq[qs:qe], dk[ks:ke], dv[ks:ke])], q[qs:qe][None],
                           k[ks:ke][None], v[ks:ke][None], grad_out=gq[qs:qe][None], lse=lse[:, qs:qe][None],
                           window_limit=max(lk), **kwb)


@pytest.mark.parametrize("case", ["plain", "window-causal", "softcap-causal", "everything"])
def test_kvcache_decode_bf16(case: str) -> None:
    b, cap, hq, hk, d = 4, 1024, 8, 2, 128
    kw = {} if case == "plain" else _kw(FLEX[case], b, hq)
    kw.setdefault("causal", True)
    g = torch.Generator().manual_seed(9)
    kc = torch.randn(b, cap, hk, d, generator=g).to(BF16).to(DEV)
    vc = torch.randn(b, cap, hk, d, generator=g).to(BF16).to(DEV)
    q = torch.randn(b, 1, hq, d, generator=g).to(BF16).to(DEV)
    kn = torch.randn(b, 1, hk, d, generator=g).to(BF16).to(DEV)
    vn = torch.randn(b, 1, hk, d, generator=g).to(BF16).to(DEV)
    lens = torch.tensor([0, 17, 700, 1023], dtype=torch.int32, device=DEV)
    plan = C.explain_flash_attn(C.flash_attn_with_kvcache, q, kc, vc, kn, vn, cache_seqlens=lens, **kw)
    assert plan.path == ("sdpa" if case == "plain" else "flex"), plan.explain()
    out, lse = C.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, return_softmax_lse=True, **kw)
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(kc[i, n], kn[i, 0]) and torch.equal(vc[i, n], vn[i, 0])
    start = torch.zeros(b, dtype=torch.long, device=DEV)
    assert_flash_close([out], q, kc, vc, lse=lse, key_range=(start, lens.long() + 1), window_limit=cap, **kw)


def test_flex_does_not_recompile_per_shape() -> None:
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for s in (192, 320, 448, 576, 704, 832, 960, 1088):
        q, k, v, _ = make(1, s, s + 64, 8, 8, 64, seed=s)
        with torch.no_grad():
            C.flash_attn_func(q, k, v, softcap=10.0, causal=True)
    assert counters["stats"]["unique_graphs"] - before <= 3, "a new graph per shape: a recompile storm"


def test_deterministic_backward_is_bitwise_repeatable() -> None:
    q, k, v, grad = make(2, 256, 256, 8, 2, 64)
    assert C.explain_flash_attn(C.flash_attn_func, *(t.requires_grad_() for t in (q, k, v)),
                                deterministic=True, causal=True).path == "exact"
    runs = [fwd_bwd(C.flash_attn_func, q.detach(), k.detach(), v.detach(), grad, causal=True,
                    deterministic=True)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
