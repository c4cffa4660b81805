"""On a CUDA GPU: every backend forced through attention() matches float64 math, forward and backward.

Skipped without a GPU (see conftest.py). Run on the H200 before calling GPU work done.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import required_backends, skip_unless_optional_missing

import sdpa_flash
from sdpa_flash import AttentionInputError, BackendUnavailableError
from sdpa_flash.testing import assert_close_to_reference, reference_attention

pytestmark = pytest.mark.cuda

BACKENDS = ["cudnn", "flash", "efficient", "math", "chunked"]
_NO_MASK = "^attn_mask is not supported"
# What a backend may refuse of a case wherever it runs (a regular expression over its reasons); any other refusal
# of a backend this machine must run fails the test (see conftest.skip_unless_optional_missing).
LIMITS = {("flash", "bool_mask"): _NO_MASK, ("flash", "float_mask_causal"): _NO_MASK}
CASES: dict[str, dict[str, Any]] = {
    "dense": {},
    "causal": {"causal": True},
    "gqa_causal": {"kv_heads": 2, "causal": True},
    "mqa": {"kv_heads": 1},
    "bottom_right_sq<sk": {"sq": 128, "sk": 384, "causal": "bottom_right"},
    "top_left_sq<sk": {"sq": 128, "sk": 384, "causal": True},
    "bool_mask": {"mask": "bool"},
    "float_mask_causal": {"mask": "float", "causal": True},
    "head_dim_60": {"d": 60},
    "bshd": {"layout": "bshd", "causal": True},
    "scale": {"scale": 0.05},
    "seq_not_multiple_of_64": {"sq": 200, "sk": 200, "causal": True},
}


def make(case: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, h, d = 2, 8, case.get("d", 64)
    sq, sk, hk = case.get("sq", 256), case.get("sk", 256), case.get("kv_heads", 8)
    layout = case.get("layout", "bhsd")

    def t(heads: int, s: int) -> torch.Tensor:
        x = torch.randn(b, heads, s, d, device="cuda", generator=g)
        return x.transpose(1, 2).contiguous() if layout == "bshd" else x

    q, k, v = t(h, sq), t(hk, sk), t(hk, sk)
    mask = None
    if case.get("mask") == "bool":
        mask = torch.rand(b, 1, sq, sk, device="cuda", generator=g) < 0.8
    elif case.get("mask") == "float":
        mask = torch.randn(sq, sk, device="cuda", generator=g).to(dtype)
    grad = torch.randn((*q.shape[:-1], d), device="cuda", generator=g)
    return {"qkv": (q, k, v), "mask": mask, "grad": grad,
            "kw": {"causal": case.get("causal", False), "layout": layout, "scale": case.get("scale")}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_backend_matches_float64_math(backend: str, case: str, dtype: torch.dtype) -> None:
    data = make(CASES[case], dtype)
    mask, kw = data["mask"], data["kw"]
    leaves = [x.to(dtype).requires_grad_() for x in data["qkv"]]
    try:
        plan = sdpa_flash.explain(*leaves, attn_mask=mask, policy=backend, **kw)
    except BackendUnavailableError as exc:
        skip_unless_optional_missing(backend, exc, limitation=LIMITS.get((backend, case)))
    assert plan.backend == backend
    out = sdpa_flash.attention(*leaves, attn_mask=mask, policy=backend, **kw)
    grad = data["grad"].to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.double().requires_grad_() for x in data["qkv"]]
    ref = reference_attention(*ref_leaves, attn_mask=mask, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    same_leaves = [x.to(dtype).requires_grad_() for x in data["qkv"]]
    same = reference_attention(*same_leaves, attn_mask=mask, dtype=None, **kw)
    same_grads = torch.autograd.grad(same, same_leaves, grad)
    assert_close_to_reference([out, *grads], [same, *same_grads], [ref, *ref_grads])


def test_every_backend_this_machine_must_run_is_planned() -> None:
    """The backends torch's own facts say this GPU has (conftest.required_backends: flash and cuDNN from sm80 with
    cuDNN 9, FA4 where installed on sm90-sm103, ...) each plan a plain causal training call, forward-only too."""
    required = required_backends()
    assert {"math", "chunked"} <= required
    dtype = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    q = torch.randn(2, 16, 1024, 128, device="cuda", dtype=dtype, requires_grad=True)
    for name in sorted(required):
        for x in (q, q.detach()):
            try:
                p = sdpa_flash.explain(x, x, x, causal=True, policy=name)
            except BackendUnavailableError as exc:
                raise AssertionError(f"{name} is required on this machine but refused a plain call:\n{exc}") from None
            assert p.backend == name


@pytest.mark.sm90
def test_hopper_availability_and_auto_choice() -> None:
    q = torch.randn(2, 16, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert {"cudnn", "flash", "efficient", "math", "chunked"} <= required_backends()  # a stock build on Hopper
    for name in sorted(required_backends()):  # fa4 too where it is installed
        assert sdpa_flash.explain(q, q, q, causal=True, policy=name).backend == name
    plan = sdpa_flash.explain(q, q, q, causal=True)
    # S=1024 training: cuDNN ranks first on Hopper (FA4 measured 0.96-1.03x there), with or without FA4
    assert plan.backend == "cudnn", plan.explain()
    big = torch.randn(1, 16, 8192, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    expected = "fa4" if sdpa_flash.capabilities("cuda").kernel_version("fa4") else "cudnn"
    assert sdpa_flash.explain(big, big, big, causal=True).backend == expected
    assert plan.route == "direct" and not plan.fallback
    assert sdpa_flash.require("flash").backend == "flash"


@pytest.mark.sm80
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_mixed_dtypes_and_devices_raise_typed_errors_after_warm_cache(backend: str) -> None:
    q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    sdpa_flash.attention(q, q, q, policy=backend)  # the fast-path cache now holds this query signature
    with pytest.raises(AttentionInputError, match="one dtype"):
        sdpa_flash.attention(q, q.half(), q.half(), policy=backend)
    with pytest.raises(AttentionInputError, match="one device"):
        sdpa_flash.attention(q, q.cpu(), q.cpu(), policy=backend)


@pytest.mark.sm80
def test_dropout_is_applied_and_reproducible() -> None:
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    plain = sdpa_flash.attention(q, q, q, policy="flash")
    torch.manual_seed(1)
    a = sdpa_flash.attention(q, q, q, dropout_p=0.3, policy="flash")
    torch.manual_seed(1)
    b = sdpa_flash.attention(q, q, q, dropout_p=0.3, policy="flash")
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain, atol=1e-2)
    assert torch.isfinite(a).all()


@pytest.mark.sm80
def test_compile_fullgraph_on_gpu() -> None:
    q = torch.randn(2, 8, 512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(x, x, x, causal=True) * 2

    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(q).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q), f(q), rtol=2e-2, atol=2e-2)
    compiled(q).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.sm80
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key_are_zero(backend: str) -> None:
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(8, 8, dtype=torch.bool, device="cuda")
    mask[2] = False
    try:
        out = sdpa_flash.attention(q, q, q, attn_mask=mask, policy=backend)
    except BackendUnavailableError as exc:
        if backend != "flash":
            skip_unless_optional_missing(backend, exc)
        assert all(r.startswith("attn_mask is not supported") for r in exc.reasons["flash"]), exc
        out = None  # flash takes no mask; its causal corner case is checked below
    if out is not None:
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
        out.sum().backward()
        assert torch.isfinite(q.grad).all()
    q6 = torch.randn(1, 2, 6, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 3, 64, device="cuda", dtype=torch.bfloat16)
    out = sdpa_flash.attention(q6, kv, kv, causal="bottom_right", policy=backend)  # rows 0-2 see no key
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isfinite(out).all()
