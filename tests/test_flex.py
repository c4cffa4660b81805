"""FlexAttention as one of the planner's backends (``sdpa_flash/backends/flex.py``).

What ``auto`` does with it (on synthetic CUDA profiles: the decision is data), and what its kernel computes: on the
CPU, FlexAttention runs unfused and forward-only (no backward there), which is enough to check the mask and score
functions this backend builds (window sides, the causal corner, softcap, GQA) against float64 math. The compiled
kernel on a GPU is covered by the CUDA tests at the end.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import sdpa_flash
from sdpa_flash import AttentionSpec, Capabilities, plan
from sdpa_flash.backends import BACKENDS, KernelCall, KernelOptions, ranked
from sdpa_flash.backends import flex as flex_mod
from sdpa_flash.backends.flash import packed_window_args
from sdpa_flash.errors import BackendUnavailableError
from sdpa_flash.policy import resolve_policy
from sdpa_flash.testing import compare_to_reference, reference_attention

A100 = Capabilities.synthetic("cuda", (8, 0))
H100 = Capabilities.synthetic("cuda", (9, 0))
H100_FA4 = Capabilities.synthetic("cuda", (9, 0), kernels={"fa4": "4.0.0b40"})
T4 = Capabilities.synthetic("cuda", (7, 5))


def spec(**kw: Any) -> AttentionSpec:
    base: dict[str, Any] = dict(device_type="cuda", dtype=torch.bfloat16, batch=2, heads_q=16, heads_kv=16,
                                seqlen_q=4096, seqlen_k=4096, head_dim=128, head_dim_v=128, causal="top_left",
                                needs_grad=True)
    base.update(kw)
    return AttentionSpec(**base)


# ------------------------------------------------------------------------------------------------- deciding
@pytest.mark.parametrize("caps", [A100, H100], ids=["sm80", "sm90"])
def test_softcap_without_fa4_runs_on_flex_not_on_a_loop_of_tiles(caps: Capabilities) -> None:
    p = plan(spec(softcap=50.0), caps)
    assert p.backend == "flex" and not p.fallback, p.explain()
    assert "logit softcap" in p.reasons["flash"][0] and "logit softcap" in p.reasons["cudnn"][0]
    assert p.order.index("flex") < p.order.index("math") < p.order.index("chunked")


def test_flex_stands_after_every_fused_sdpa_kernel_and_fa4() -> None:
    plain = plan(spec(), H100_FA4)
    assert plain.backend != "flex" and plain.order[-3:] == ("flex", "math", "chunked"), plain.order
    assert plan(spec(softcap=30.0), H100_FA4).backend == "fa4"  # FA4 takes softcap itself, and ranks first
    if packed_window_args():  # torch's flash kernel takes windows in this torch (feature-detected)
        assert plan(spec(window=(127, None)), A100).backend == "flash"
    # float32 windows: no fused SDPA kernel takes both (flash is half precision, efficient has no window)
    fp32 = plan(spec(dtype=torch.float32, window=(127, None)), A100)
    assert fp32.backend == "flex" and "window" in fp32.reasons["efficient"][0], fp32.explain()


def test_the_cpu_ranking_has_no_flex_and_the_policy_says_why() -> None:
    q = torch.randn(1, 2, 8, 16)
    p = sdpa_flash.explain(q, q, q, softcap=5.0)
    assert "flex" not in p.order and p.backend == "chunked"
    with pytest.raises(BackendUnavailableError, match="not available on device type 'cpu'"):
        sdpa_flash.explain(q, q, q, softcap=5.0, policy="flex")


@pytest.mark.parametrize(("change", "reason"), [
    ({"dropout": True}, "dropout_p > 0 is not supported"),
    ({"mask": "bool"}, "attn_mask is not supported"),
    ({"sinks": True}, "has no attention sinks"),
    ({"head_dim": 8, "head_dim_v": 8}, "head_dim=8 (supported: >= 16)"),
    ({"head_dim": 320, "head_dim_v": 320}, "head_dim=320 (supported: <= 256)"),
    ({"dtype": torch.float64}, "dtype=float64"),
])
def test_what_flex_refuses_it_says(change: dict[str, Any], reason: str) -> None:
    reasons = BACKENDS["flex"].not_supported_reasons(spec(softcap=30.0, **change), H100)
    assert any(reason in r for r in reasons), reasons


def test_flex_needs_ampere_and_is_not_trusted_under_deterministic_mode() -> None:
    assert any("compute capability >= (8, 0)" in r for r in plan(spec(softcap=30.0, dtype=torch.float16),
                                                                 T4).reasons["flex"])
    p = plan(spec(softcap=30.0), H100, deterministic="error")
    assert p.backend == "chunked" and any("not deterministic" in r for r in p.reasons["flex"]), p.explain()


def test_top_left_causal_reaches_flex_on_its_own_corner() -> None:
    short = BACKENDS["flex"].prep(spec(seqlen_q=100, seqlen_k=300, softcap=5.0), "cuda")
    assert short.truncate_keys and short.kernel_causal  # the first Sq keys: exact, no mask
    assert BACKENDS["flex"].not_supported_reasons(spec(seqlen_q=300, seqlen_k=100, softcap=5.0), H100)
    assert not BACKENDS["flex"].not_supported_reasons(
        spec(seqlen_q=300, seqlen_k=100, softcap=5.0, causal="bottom_right"), H100)


def test_top_left_causal_and_a_window_with_fewer_queries_is_refused_by_the_native_window_kernels() -> None:
    """attention() rejects the pair up front (windows are bottom-right); a spec planned directly gets the
    kernels that take the window themselves refused: cutting the keys past Sq (exact for top-left causal alone)
    would move the window onto the cut range's corner. Where both are masks the call is exact."""
    s = spec(seqlen_q=16, seqlen_k=48, window=(40, None), needs_grad=False)
    p = plan(s, H100_FA4)
    for name in ("fa4", "flash", "flex"):
        assert any("causal='bottom_right'" in r for r in p.reasons[name]), p.explain()
    assert p.prep.window_mask == (40, None) and p.prep.causal_mask == "top_left"
    q = torch.randn(1, 2, 16, 16)
    k = torch.randn(1, 2, 48, 16)
    with pytest.raises(sdpa_flash.AttentionInputError, match="pass causal='bottom_right'"):
        sdpa_flash.attention(q, k, k, causal="top_left", window=(40, None))


def test_tune_does_not_time_flex() -> None:
    from sdpa_flash.bench._timing import Settings
    from sdpa_flash.tuning._grid import grid
    from sdpa_flash.tuning._measure import derive_rule, measure_class

    assert BACKENDS["flex"].TUNED is False
    cpu = sdpa_flash.capabilities(torch.device("cpu"))
    c = grid(cpu, quick=True)[0]
    rows = measure_class(c, cpu, torch.device("cpu"), Settings.for_device("cpu", rounds=1, budget_s=0.05))
    assert rows and "flex" not in {r["backend"] for r in rows}
    # a tuned rule leaves it out, and the planner puts it back in its place: after the fused kernels, before math
    timed = [{"backend": n, "status": "measured", "median_ms": t, "samples_ms": [t]}
             for n, t in (("cudnn", 1.0), ("flash", 1.2), ("math", 5.0), ("chunked", 6.0))]
    derived = derive_rule(c, timed, H100, "2026-12-08")
    assert derived is not None and "flex" not in derived[0].order
    order = ranked(derived[0].order, "cuda")
    assert order[:4] == ("cudnn", "flash", "flex", "math"), order


# ------------------------------------------------------------------------------------------------- computing
@pytest.fixture
def unfused(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """FlexAttention without torch.compile (its reference implementation, forward only on the CPU)."""
    def entry(key: tuple[Any, ...]) -> Any:
        flex_mod._load()
        return flex_mod._entry

    monkeypatch.setattr(flex_mod, "compiled_for", entry)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.nn.attention.flex_attention")
        yield


CASES = [  # (hq, hkv, sq, sk, causal, window, softcap)
    (4, 4, 24, 24, "top_left", None, 5.0),
    (4, 2, 20, 36, "bottom_right", (7, None), None),
    (6, 2, 3, 40, None, (5, 2), 8.0),  # decode-like rows, a GQA group of 3 (repeated for FlexAttention's decoder)
    (4, 1, 30, 18, "bottom_right", (4, 0), 3.0),  # rows before the first key see nothing: zeros
    (2, 2, 16, 48, "top_left", None, 6.0),  # top-left with Sq < Sk: the first Sq keys
]


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize(("hq", "hkv", "sq", "sk", "causal", "window", "softcap"), CASES)
def test_flex_kernel_matches_the_reference(unfused: None, traced: bool, hq: int, hkv: int, sq: int, sk: int,
                                           causal: str | None, window: tuple[int | None, int | None] | None,
                                           softcap: float | None) -> None:
    g = torch.Generator().manual_seed(sq * 7 + sk)
    q = torch.randn(2, hq, sq, 16, generator=g)
    k, v = (torch.randn(2, hkv, sk, 16, generator=g) for _ in range(2))
    s = AttentionSpec("cuda", torch.float32, 2, hq, hkv, sq, sk, 16, 16, causal, needs_grad=False, window=window,
                      softcap=softcap)
    p = plan(s, A100, resolve_policy("flex"))
    run = BACKENDS["flex"].runner(s, p.prep, traced=traced)
    with torch.no_grad():
        out = run(q, k, v, None, 0.0, 0.3)
    kw = dict(causal=causal or False, window=window, softcap=softcap, scale=0.3)
    same, ref = (reference_attention(q, k, v, dtype=dt, **kw) for dt in (None, torch.float64))
    comparison = compare_to_reference(out, same, ref)
    assert comparison.passed, str(comparison)


def test_flex_traced_into_a_users_graph_has_no_break() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    kernel = BACKENDS["flex"].kernel("cuda", traced=True)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernel(KernelCall(q, k, v, None, 0.0, None,
                                 KernelOptions(causal=True, window=(5, None), softcap=4.0)))

    q = torch.randn(1, 4, 24, 16)
    k, v = (torch.randn(1, 2, 24, 16) for _ in range(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(fn)(q, k, v)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    ref = reference_attention(q, k, v, causal="bottom_right", window=(5, None), softcap=4.0, dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- CUDA
CUDA_FLEX = torch.cuda.is_available() and not flex_mod.environment_reasons(
    "cuda", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)


@pytest.mark.skipif(not CUDA_FLEX, reason="needs a CUDA GPU (compute capability >= 8.0) with Triton")
@pytest.mark.parametrize("window", [None, (255, None)])
def test_cuda_softcap_runs_on_flex_forward_and_backward(window: tuple[int | None, int | None] | None) -> None:
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sdpa_flash.attention(*leaves, causal=True, window=window, softcap=30.0, policy="flex")
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, leaves, grad)]
    refs = []
    for dtype in (None, torch.float64):
        ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*ins, causal=True, window=window, softcap=30.0, dtype=dtype)
        refs.append([ref, *torch.autograd.grad(ref, ins, grad.to(ref.dtype))])
    sdpa_flash.testing.assert_close_to_reference(got, refs[0], refs[1], names=["out", "dq", "dk", "dv"])
