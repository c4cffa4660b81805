"""The optional FlashAttention-4 backend (``fa4``).

On the CPU: the plan and its reasons for constructed GPU profiles with and without FA4, the measured ranking's
shape classes, that nothing imports FA4 eagerly, and — with ``tests/fa4_fake.py`` standing in for FA4's
interface module — how sdpa_flash calls it: layouts, causal corners, GQA, the window mapping, the custom ops'
autograd and ``torch.compile``, and the varlen engine's packed FA4 path. On a GPU with ``flash-attn-4``
installed: the real kernel against the float64 reference (the project's tolerance rule), autograd, varlen,
``torch.compile(fullgraph=True)`` and CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import subprocess
import sys

import fa4_fake  # tests/ is on sys.path (pytest rootdir-relative imports)
import pytest
import torch

import sdpa_flash
from sdpa_flash import AttentionSpec, Capabilities, plan, varlen
from sdpa_flash.backends import BACKENDS, KernelCall, KernelOptions
from sdpa_flash.backends import fa4 as fa4_mod
from sdpa_flash.planner import RANKING, RankingRule
from sdpa_flash.policy import resolve_policy

AUTO = resolve_policy("auto")
SM90 = Capabilities.synthetic("cuda", (9, 0))
SM90_FA4 = Capabilities.synthetic("cuda", (9, 0), kernels={"fa4": "4.0.0b36"})
SM100_FA4 = Capabilities.synthetic("cuda", (10, 0), kernels={"fa4": "4.0.0b36"})
SM80_FA4 = Capabilities.synthetic("cuda", (8, 0), kernels={"fa4": "4.0.0b36"})
HAVE_FA4 = torch.cuda.is_available() and fa4_mod.installed_version() is not None


def spec(**kw: object) -> AttentionSpec:
    base = dict(device_type="cuda", dtype=torch.bfloat16, batch=2, heads_q=16, heads_kv=16, seqlen_q=4096,
                seqlen_k=4096, head_dim=128, head_dim_v=128, causal=None, needs_grad=True)
    base.update(kw)
    return AttentionSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def fake_fa4(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """FA4's interface replaced by the CPU stand-in (and reported installed)."""
    monkeypatch.setattr(fa4_mod, "_module", fa4_fake)
    monkeypatch.setattr(fa4_mod, "installed_version", lambda: "4.0.0b36")
    fa4_fake.CALLS.clear()
    yield fa4_fake


# ------------------------------------------------------------------------------------ nothing at import
def test_importing_sdpa_flash_imports_no_fa4() -> None:
    code = ("import sys, sdpa_flash, sdpa_flash.varlen, sdpa_flash.compat; "
            "print(sorted(m for m in sys.modules if m.startswith(('flash_attn', 'cutlass'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_missing_package_reads_like_an_install_hint() -> None:
    p = plan(spec(), SM90, AUTO)
    assert p.backend == "cudnn"
    assert p.reasons["fa4"] == ("flash-attn-4 is not installed (pip install 'sdpa_flash[fa4]')",)
    with pytest.raises(sdpa_flash.BackendUnavailableError, match=r"pip install 'sdpa_flash\[fa4\]'"):
        plan(spec(), SM90, resolve_policy("fa4"))


def test_installed_version_is_read_from_metadata_not_by_import(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {m for m in sys.modules if m.startswith("flash_attn")}  # (FA4 itself, where other tests ran it here)
    v = fa4_mod.installed_version()
    assert v is None or v.startswith("4.")
    # a distribution's metadata and file list are enough; nothing of it is imported
    info = tmp_path / "flash_attn_4-4.0.0b99.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn-4\nVersion: 4.0.0b99\n")
    (info / "RECORD").write_text("flash_attn/cute/interface.py,,\nflash_attn_4-4.0.0b99.dist-info/METADATA,,\n")
    # Python >= 3.12 lists only the recorded files that exist; this one fails loudly if anything imports it
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "interface.py").write_text("raise AssertionError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert fa4_mod.installed_version() == "4.0.0b99"
    assert {m for m in sys.modules if m.startswith("flash_attn")} == before


# ---------------------------------------------------------------------------------------- the decision
def test_auto_prefers_fa4_for_training_and_long_sequences_on_hopper() -> None:
    p = plan(spec(), SM90_FA4, AUTO)
    assert p.backend == "fa4" and not p.fallback
    assert p.reasons["cudnn"] == ("ranked below fa4 for sm90 by the policy",)
    assert str(p).startswith("fa4 via flash_attn.cute")
    assert "FlashAttention-4's own function" in p.explain()


def test_forward_only_short_sequences_stay_on_cudnn_with_the_evidence() -> None:
    p = plan(spec(seqlen_q=1024, seqlen_k=1024, needs_grad=False), SM90_FA4, AUTO)
    assert p.backend == "cudnn"
    assert p.evidence.startswith("Sk 0-2048, forward only:") and "0.55-0.90" in p.evidence
    assert plan(spec(seqlen_q=4096, seqlen_k=4096, needs_grad=False), SM90_FA4, AUTO).backend == "fa4"


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"seqlen_q": 1024, "seqlen_k": 1024}, "cudnn"),  # training, short: a tie
     ({"seqlen_q": 2048, "seqlen_k": 2048}, "fa4"),
     ({"seqlen_q": 2048, "seqlen_k": 2048, "heads_kv": 4}, "cudnn"),  # GQA training up to 2k keys
     ({"seqlen_q": 4096, "seqlen_k": 4096, "heads_kv": 4}, "fa4"),
     ({"seqlen_q": 1, "seqlen_k": 4096, "needs_grad": False}, "cudnn"),  # decode: FA4's host cost
     ({"head_dim": 256, "head_dim_v": 256}, "cudnn"),  # hd256 training: FA4's backward is slow there
     ({"head_dim": 256, "head_dim_v": 256, "needs_grad": False}, "fa4")],
)
def test_measured_shape_classes(change: dict[str, object], expected: str) -> None:
    p = plan(spec(**change), SM90_FA4, AUTO)
    assert p.backend == expected, p.explain()
    assert p.evidence
    # without FA4 the same calls all run on cuDNN
    assert plan(spec(**change), SM90, AUTO).backend == "cudnn"


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"dtype": torch.float32}, "dtype=float32 (supported: bfloat16, float16)"),
     ({"dropout": True}, "dropout_p > 0 is not supported"),
     ({"mask": "bool"}, "attn_mask is not supported"),
     ({"head_dim": 288, "head_dim_v": 288}, "head_dim=288 (supported: <= 256)"),
     ({"causal": "top_left", "seqlen_q": 512, "seqlen_k": 256}, "aligns causal to the bottom-right corner")],
)
def test_reasons_name_the_value_and_the_limit(change: dict[str, object], reason: str) -> None:
    p = plan(spec(**change), SM90_FA4, AUTO)
    assert p.backend != "fa4"
    assert any(reason in r for r in p.reasons["fa4"]), p.reasons["fa4"]


def test_adaptations_follow_the_kernels_data() -> None:
    p = plan(spec(heads_kv=4), SM90_FA4, resolve_policy("fa4"))
    assert p.prep.repeat_kv == 1  # GQA read in place
    p = plan(spec(causal="top_left", seqlen_q=256, seqlen_k=1024), SM90_FA4, resolve_policy("fa4"))
    assert p.prep.truncate_keys and p.prep.kernel_causal  # top-left with Sq < Sk: a square call on Sq keys
    p = plan(spec(causal="bottom_right", seqlen_q=1024, seqlen_k=256), SM90_FA4, resolve_policy("fa4"))
    assert p.prep.kernel_causal and not p.prep.truncate_keys  # FA4's own corner
    p = plan(spec(head_dim=60, head_dim_v=60), SM90_FA4, resolve_policy("fa4"))
    assert p.prep.pad_qk_to == 64 and p.prep.pad_v_to == 64
    assert plan(spec(head_dim=192, head_dim_v=128), SM90_FA4, resolve_policy("fa4")).backend == "fa4"


def test_architecture_limits() -> None:
    with pytest.raises(sdpa_flash.BackendUnavailableError, match=r"requires compute capability >= \(9, 0\)"):
        plan(spec(), SM80_FA4, resolve_policy("fa4"))
    assert plan(spec(), SM80_FA4, AUTO).backend == "flash"  # Ampere's ranking does not include FA4
    with pytest.raises(sdpa_flash.BackendUnavailableError, match=r"head dims \(160, 160\) on sm100"):
        plan(spec(head_dim=160, head_dim_v=160), SM100_FA4, resolve_policy("fa4"))
    assert plan(spec(head_dim=256, head_dim_v=256), SM100_FA4, resolve_policy("fa4")).backend == "fa4"
    assert plan(spec(), SM100_FA4, AUTO).backend == "cudnn"  # not measured on Blackwell: second there
    rocm = dataclasses.replace(SM90_FA4, hip_version="6.2")
    assert plan(spec(), rocm, resolve_policy("fused")).backend != "fa4"


def test_deterministic_mode_keeps_fa4() -> None:
    p = plan(spec(), SM90_FA4, AUTO, deterministic="error")
    assert p.backend == "fa4"  # its backward takes deterministic=True; cuDNN's cannot
    assert any("not deterministic" in r for r in plan(spec(), SM90_FA4, resolve_policy("cudnn,flash"),
                                                      deterministic="error").reasons["cudnn"])


def test_ranking_rules_match_their_shape_class() -> None:
    rule = RankingRule("cuda", ("cudnn",), "x", min_cc=(9, 0), head_dim=(1, 128), seqlen_q=(1, 1),
                       training=False)
    assert rule.shape_class and rule.describe() == "head dim 1-128, Sq 1-1, forward only"
    assert rule.matches(SM90, spec(seqlen_q=1, needs_grad=False))
    assert not rule.matches(SM90, spec(seqlen_q=1, needs_grad=True))
    assert not rule.matches(SM90, spec(seqlen_q=2, needs_grad=False))
    assert not rule.matches(SM90, None)  # without a call, only device-wide rules apply
    assert sdpa_flash.planner.ranking(SM90).order[0] == "fa4"
    for r in RANKING:
        assert r.evidence and len(set(r.order)) == len(r.order) and set(r.order) <= set(BACKENDS)


def test_explain_on_this_machine_says_why_not_fa4() -> None:
    q = torch.randn(1, 2, 8, 16)
    p = sdpa_flash.explain(q, q, q)
    assert p.reasons["fa4"][0].startswith("not available on device type 'cpu'")


# ------------------------------------------------------------------------- calling FA4 (CPU stand-in)
def _runner(s: AttentionSpec, caps: Capabilities = SM90_FA4):  # type: ignore[no-untyped-def]
    p = plan(s, caps, resolve_policy("fa4"))
    return BACKENDS["fa4"].runner(s, p.prep)


def _assert_rule(outs: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool | str | None,
                 scale: float | None = None, grad: torch.Tensor | None = None, layout: str = "bhsd",
                 window: tuple[int, int] | None = None, softcap: float | None = None) -> None:
    """``outs`` (``[out]``, or ``[out, dq, dk, dv]`` for the output gradient ``grad``) pass the tolerance rule against
    float64 math, PyTorch's math backend in the inputs' dtype setting the allowance."""
    refs = []
    for dtype in (None, torch.float64):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_(grad is not None) for t in (q, k, v)]
        ref = sdpa_flash.testing.reference_attention(*leaves, causal=causal or False, scale=scale, layout=layout,
                                                     dtype=dtype, window=window, softcap=softcap)
        refs.append([ref, *(torch.autograd.grad(ref, leaves, grad.to(ref.dtype)) if grad is not None else ())])
    sdpa_flash.testing.assert_close_to_reference(outs, refs[0], refs[1])


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "sk", "d", "causal"),
    [(2, 4, 4, 16, 16, 32, None), (1, 4, 2, 8, 24, 16, "bottom_right"), (2, 2, 1, 12, 20, 60, "top_left"),
     (1, 2, 2, 20, 6, 16, "bottom_right")],
)
def test_runner_passes_bshd_views_and_the_right_corner(fake_fa4, b, hq, hkv, sq, sk, d, causal) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    q = torch.randn(b, hq, sq, d, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, sk, d, dtype=torch.bfloat16) for _ in range(2))
    s = spec(batch=b, heads_q=hq, heads_kv=hkv, seqlen_q=sq, seqlen_k=sk, head_dim=d, head_dim_v=d, causal=causal,
             needs_grad=False)
    out = _runner(s)(q, k, v, None, 0.0, None)
    assert out.shape == (b, hq, sq, d)
    _assert_rule([out], q, k, v, causal)
    name, call = fake_fa4.CALLS[-1]
    assert name == "_flash_attn_fwd" and call["causal"] == (causal is not None)
    assert not call["return_lse"]  # inference: no LSE written, as FA4's own function does without grad
    if d % 8 == 0 and not (causal == "top_left" and sq < sk):
        # a (B, H, S, D) tensor reaches FA4 as a (B, S, H, D) view of the same memory
        assert call["q_stride"] == q.transpose(1, 2).stride()


def test_window_minus_one_means_unbounded_per_side(fake_fa4) -> None:  # type: ignore[no-untyped-def]
    assert fa4_mod.window_arg(-1, 0) == (None, 0)
    assert fa4_mod.window_arg(-1, -1) == (None, None)
    assert fa4_mod.window_arg(16, -1) == (16, None)
    q, k, v = (torch.randn(1, 24, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    out, _ = fa4_mod.fa4_fwd(q, k, v, None, False, -1, 0, 0.0)
    causal, _ = fake_fa4.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(out, causal)
    naive, _ = fake_fa4.flash_attn_func(q, k, v, window_size=(-1, 0))  # what passing -1 through would give
    assert naive.abs().max() == 0


def test_custom_ops_autograd_matches_the_reference(fake_fa4) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 12, 4, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out, _ = fa4_mod.fa4_fwd(q, k, v, 0.3, True, -1, -1, 0.0)
    grad = torch.randn(2, 4, 12, 16, dtype=torch.bfloat16).transpose(1, 2)  # as a (B, H, S, D) model's grad comes
    out.backward(grad)
    assert fake_fa4.CALLS[-1][1]["dout_stride"] == grad.stride()  # handed over as it is: FA4 reads this layout
    assert q.grad is not None and k.grad is not None and v.grad is not None
    _assert_rule([out, q.grad, k.grad, v.grad], q, k, v, True, 0.3, grad, layout="bshd")
    assert [c[0] for c in fake_fa4.CALLS] == ["_flash_attn_fwd", "_flash_attn_bwd"]


def test_traced_kernel_compiles_without_graph_breaks(fake_fa4) -> None:  # type: ignore[no-untyped-def]
    import torch._dynamo

    torch._dynamo.reset()
    kernel = BACKENDS["fa4"].kernel("cuda", traced=True)

    def fn(q, k, v):  # type: ignore[no-untyped-def]
        call = KernelCall(q, k, v, None, 0.0, None, KernelOptions(causal=True, needs_lse=True))
        return kernel(call).sum()

    q, k, v = (torch.randn(1, 2, 12, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    explained = torch._dynamo.explain(fn)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


def test_deterministic_mode_reaches_fa4s_backward(fake_fa4) -> None:  # type: ignore[no-untyped-def]
    s = spec(batch=1, heads_q=2, heads_kv=2, seqlen_q=8, seqlen_k=8, head_dim=32, head_dim_v=32)
    q, k, v = (torch.randn(1, 2, 8, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.use_deterministic_algorithms(True)
    try:
        _runner(s)(q, k, v, None, 0.0, None).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert fake_fa4.CALLS[-1][0] == "_flash_attn_bwd" and fake_fa4.CALLS[-1][1]["deterministic"] is True


@pytest.mark.parametrize("sinks", [False, True])
def test_a_training_call_is_one_autograd_node(fake_fa4, sinks: bool) -> None:  # type: ignore[no-untyped-def]
    """(B, H, S, D) inputs reach FA4 as views made inside one autograd.Function: no TransposeBackward0 for q, k,
    v or the output (four of them cost ~0.19 ms of host time per call on an H100), and the gradients, the sinks'
    included, are FA4's backward's, checked against the reference."""
    torch.manual_seed(2)
    b, h, hkv, sq, sk, d = 2, 4, 2, 10, 14, 32
    s = spec(batch=b, heads_q=h, heads_kv=hkv, seqlen_q=sq, seqlen_k=sk, head_dim=d, head_dim_v=d,
             causal="bottom_right", sinks=sinks)
    q = torch.randn(b, h, sq, d, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, hkv, sk, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    sink = torch.randn(h, dtype=torch.bfloat16, requires_grad=True) if sinks else None
    out = _runner(s)(q, k, v, None, 0.0, None, *([sink] if sinks else []))
    assert type(out.grad_fn).__name__ == "_BHSDFunctionBackward"
    parents = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
    assert parents == ({"AccumulateGrad", "ToCopyBackward0"} if sinks else {"AccumulateGrad"}), parents
    fwd = fake_fa4.CALLS[-1][1]
    assert fwd["q_stride"] == q.transpose(1, 2).stride() and fwd["return_lse"]  # a view, no copy; LSE kept
    grad = torch.randn_like(out)
    out.backward(grad)
    name, bwd = fake_fa4.CALLS[-1]
    assert name == "_flash_attn_bwd" and bwd["dout_stride"] == grad.transpose(1, 2).stride()  # no copy of dout
    leaves = [q, k, v, *([sink] if sinks else [])]
    got = [out, *(t.grad for t in leaves)]
    refs = []
    for dtype in (None, torch.float64):
        ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in leaves]
        ref = sdpa_flash.testing.reference_attention(*ins[:3], causal="bottom_right", dtype=dtype,
                                                     sinks=ins[3] if sinks else None)
        refs.append([ref, *torch.autograd.grad(ref, ins, grad.to(ref.dtype))])
    names = ["out", "dq", "dk", "dv", *(["dsinks"] if sinks else [])]
    sdpa_flash.testing.assert_close_to_reference(got, refs[0], refs[1], names=names)


# ------------------------------------------------------------------------- the denylist: FA4's sm90 dQ tail
# Dao-AILab/flash-attention#2896, measured on the H200 with benchmarks/fa4_bwd_head_dims.py (4.0.0b36): dQ wrong at
# head dims 16, 40, 48, 72, 80, 104, 112; right at 24, 32, 56, 64, 88, 96, 120, 128, 160, 192, 256
@pytest.mark.parametrize("head_dim", [16, 40, 48, 72, 80, 104, 112, 36, 100])
def test_fa4_training_on_hopper_skips_head_dims_with_a_wrong_dq(head_dim: int) -> None:
    s = spec(head_dim=head_dim, head_dim_v=head_dim)
    p = plan(s, SM90_FA4, AUTO)
    assert p.backend != "fa4" and not p.fallback  # rerouted quietly: the next backend is exact
    assert any("Dao-AILab/flash-attention#2896" in r for r in p.reasons["fa4"]), p.reasons
    assert plan(dataclasses.replace(s, needs_grad=False), SM90_FA4, AUTO).backend == "fa4"  # the forward is right
    with pytest.raises(sdpa_flash.BackendUnavailableError, match="2896"):
        plan(s, SM90_FA4, resolve_policy("fa4"))  # asked for by name: refused, with the entry as the reason


@pytest.mark.parametrize("head_dim", [24, 32, 56, 60, 64, 88, 96, 120, 128, 160, 192, 256])
def test_fa4_training_on_hopper_keeps_the_head_dims_measured_right(head_dim: int) -> None:
    p = plan(spec(head_dim=head_dim, head_dim_v=head_dim), SM90_FA4, AUTO)
    assert not any("2896" in r for r in p.reasons.get("fa4", ()))
    assert p.backend == ("fa4" if head_dim <= 128 else "cudnn")  # (above 128, training ranks cuDNN first)


def test_the_fa4_entry_follows_the_installed_release_and_the_gpu() -> None:
    s = spec(head_dim=80, head_dim_v=80)
    fixed = Capabilities.synthetic("cuda", (9, 0), kernels={"fa4": "4.1.0"})  # outside the entry's range
    assert plan(s, fixed, AUTO).backend == "fa4"
    assert not any("2896" in r for r in plan(s, SM100_FA4, AUTO).reasons.get("fa4", ()))  # Hopper only
    nightly = Capabilities.synthetic("cuda", (9, 0), kernels={"fa4": "4.0.1.dev3"})  # pre-releases are in range
    assert plan(s, nightly, AUTO).backend != "fa4"


@pytest.mark.parametrize(("torch_version", "denied"), [("2.11.0", True), ("2.12.0.dev20261101+cu130", True),
                                                       ("2.11.0a0+ecf3bae.nv26.01", True), ("2.10.0", False)])
def test_torch_nightlies_and_vendor_builds_count_as_their_release(torch_version: str, denied: bool) -> None:
    # pytorch/pytorch#196678 (torch >= 2.11, sm90): an NGC or nightly build of 2.11+ has the bug too
    caps = dataclasses.replace(SM90, torch_version=torch_version)
    s = spec(seqlen_q=4032, seqlen_k=4032, mask="bool", head_dim=64, head_dim_v=64)
    reasons = plan(s, caps, resolve_policy(["cudnn", "math"])).reasons.get("cudnn", ())
    assert any("196678" in r for r in reasons) == denied, reasons


def test_the_packed_fa4_call_obeys_the_denylist_and_head_dim_multiples() -> None:
    from sdpa_flash._varlen import VarlenSpec, plan_varlen

    lens = (5000, 300, 1200, 64, 17, 2048, 900, 4096)
    for d, training in ((80, True), (60, False), (60, True)):
        vs = VarlenSpec("cuda", torch.bfloat16, 16, 16, d, d, lens, lens, "bottom_right", False, training)
        p = plan_varlen(vs, SM90_FA4, AUTO)
        assert p.varlen_backend != "fa4", (d, training, str(p))
    vs = VarlenSpec("cuda", torch.bfloat16, 16, 16, 80, 80, lens, lens, "bottom_right", False, False)
    assert plan_varlen(vs, SM90_FA4, AUTO).varlen_backend == "fa4"  # forward only: FA4's forward is right


@pytest.mark.parametrize(("head_dim", "training", "on_fa4"), [(80, True, False), (80, False, True),
                                                               (59, False, True), (64, True, True)])
def test_compat_windows_get_the_planners_kernel_and_its_denylist(head_dim: int, training: bool,
                                                                 on_fa4: bool) -> None:
    # flash-attn 2.8's own suite found dQ off by O(1) at head dims 40/80 on the H200 (the denylist keeps FA4's
    # backward off them); head dim 59 is padded to 64 by the dense route, as for attention()
    from sdpa_flash.compat._common import Features
    from sdpa_flash.compat._plan import CompatSpec, plan_call

    cs = CompatSpec("dense", "cuda", torch.bfloat16, 2, 8, 8, 512, 512, head_dim, head_dim,
                    Features(causal=True, left=64, right=0), needs_grad=training)
    p = plan_call(cs, SM90_FA4)
    assert (p.kernel == "fa4") == on_fa4, p.explain()
    if not on_fa4:  # the planner's next kernel with a window of its own (CUDA flash), else FlexAttention
        kernel = plan(spec(head_dim=80, head_dim_v=80, seqlen_q=512, seqlen_k=512, window=(64, None),
                           needs_grad=True), SM90_FA4)
        assert any("2896" in r for r in kernel.reasons["fa4"])
        assert p.kernel == (kernel.backend if p.path == "sdpa" else None)


# ------------------------------------------------------------------------------------------------ varlen
def test_varlen_plan_uses_one_fa4_call_when_installed() -> None:
    from sdpa_flash._varlen import VarlenSpec, plan_varlen

    lens = (5000, 300, 1200, 64, 17, 2048, 900, 4096)
    vs = VarlenSpec("cuda", torch.bfloat16, 16, 16, 128, 128, lens, lens, "top_left", False, True)
    with_fa4 = plan_varlen(vs, SM90_FA4, AUTO)
    assert with_fa4.path == "flash_varlen" and with_fa4.varlen_backend == "fa4" and with_fa4.backend == "fa4"
    assert "in one fa4 varlen call" in str(with_fa4)
    without = plan_varlen(vs, SM90, AUTO)
    assert without.varlen_backend in ("flash", "") and "fa4" not in str(without).split("(")[0]
    with pytest.raises(sdpa_flash.BackendUnavailableError):
        plan_varlen(dataclasses.replace(vs, dtype=torch.float32), SM90_FA4, resolve_policy("fa4"))


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_varlen_attention_runs_fa4s_packed_call(fake_fa4, monkeypatch: pytest.MonkeyPatch, request, causal) -> None:  # type: ignore[no-untyped-def]
    from sdpa_flash import _varlen
    from sdpa_flash._varlen import execution

    monkeypatch.setattr(execution, "capabilities", lambda device: SM90_FA4)
    # dense groups would run on this machine's (CPU) kernels: make the one packed call the cheapest path
    model = _varlen.COST_MODELS["cuda"]
    monkeypatch.setitem(_varlen.COST_MODELS, "cuda", dataclasses.replace(model, call_us=1e9, call_us_bwd=1e9))
    _varlen.clear_caches()
    request.addfinalizer(_varlen.clear_caches)
    torch.manual_seed(2)
    lens_q = [5, 9, 1, 7]
    lens_k = lens_q if causal is True else [6, 9, 3, 7]
    qs = [torch.randn(n, 4, 16, dtype=torch.bfloat16) for n in lens_q]
    ks = [torch.randn(n, 2, 16, dtype=torch.bfloat16) for n in lens_k]
    vs = [torch.randn(n, 2, 16, dtype=torch.bfloat16) for n in lens_k]
    out = varlen.varlen_attention(varlen.pack(qs), varlen.pack(ks), varlen.pack(vs), causal=causal,
                                  policy="fa4").unpack()
    assert fake_fa4.CALLS and fake_fa4.CALLS[-1][0] == "flash_attn_varlen_func"
    assert fake_fa4.CALLS[-1][1]["max_seqlen_q"] == max(lens_q)
    kind = "bottom_right" if causal == "bottom_right" else ("top_left" if causal else None)
    for o, q, k, v in zip(out, qs, ks, vs, strict=True):
        _assert_rule([o[None]], q[None], k[None], v[None], kind, layout="bshd")


# -------------------------------------------------------------------------------- warmup and the cache
def test_cache_setting_is_parsed_in_one_place(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SDPA_FLASH_FA4_CACHE", "0")
    assert fa4_mod._cache_setting() == (False, None)
    monkeypatch.setenv("SDPA_FLASH_FA4_CACHE", str(tmp_path))
    assert fa4_mod._cache_setting() == (True, tmp_path)
    monkeypatch.setenv("SDPA_FLASH_FA4_CACHE", "sometimes")
    with pytest.raises(sdpa_flash.AttentionInputError, match="SDPA_FLASH_FA4_CACHE"):
        fa4_mod._cache_setting()


def test_cache_is_configured_before_fa4_reads_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for var in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SDPA_FLASH_FA4_CACHE", str(tmp_path / "c"))
    fa4_mod._configure_cache()
    import os

    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path / "c")
    (tmp_path / "c" / "fp" / "fwd").mkdir(parents=True)
    (tmp_path / "c" / "fp" / "fwd" / "k.o").write_bytes(b"x" * 10)
    monkeypatch.setattr(fa4_mod, "_module", None)
    info = fa4_mod.cache_info()
    assert info.enabled and info.entries == 1 and info.bytes == 10
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")  # the user's own setting wins
    monkeypatch.setenv("SDPA_FLASH_FA4_CACHE", "1")
    fa4_mod._configure_cache()
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "0"


# ------------------------------------------------------------------------------------------ on the GPU
needs_fa4 = pytest.mark.skipif(not HAVE_FA4, reason="needs a CUDA GPU and flash-attn-4 (pip install "
                                                    "'sdpa_flash[fa4]')")
sm90 = pytest.mark.sm90


def _problem(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, grad=True, layout="bhsd"):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(b * 1000 + sq)
    shape = (lambda h, s: (b, h, s, d)) if layout == "bhsd" else (lambda h, s: (b, s, h, d))
    mk = lambda h, s: torch.randn(shape(h, s), device="cuda", dtype=dtype, generator=g).requires_grad_(grad)  # noqa: E731
    return mk(hq, sq), mk(hkv, sk), mk(hkv, sk)


@pytest.mark.cuda
@sm90
@needs_fa4
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "sk", "d", "causal", "layout"),
    [(2, 8, 8, 1024, 1024, 128, True, "bhsd"), (2, 8, 2, 777, 1500, 128, "bottom_right", "bshd"),
     (1, 4, 4, 300, 300, 64, False, "bshd"), (2, 8, 8, 512, 2048, 128, True, "bhsd")],
)
def test_cuda_fa4_matches_the_reference(b, hq, hkv, sq, sk, d, causal, layout) -> None:  # type: ignore[no-untyped-def]
    from sdpa_flash.testing import assert_close_to_reference

    q, k, v = _problem(b, hq, hkv, sq, sk, d, layout=layout)
    p = sdpa_flash.explain(q, k, v, causal=causal, layout=layout, policy="fa4")
    assert p.backend == "fa4" and not any("copied" in n for n in p.notes)
    out = sdpa_flash.attention(q, k, v, causal=causal, layout=layout, policy="fa4")
    go = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    same = sdpa_flash.testing.reference_attention(q, k, v, causal=causal, layout=layout, dtype=None)
    ref = sdpa_flash.testing.reference_attention(q, k, v, causal=causal, layout=layout)
    same_g = torch.autograd.grad(same, (q, k, v), go)
    ref_g = torch.autograd.grad(ref, (q, k, v), go.double())
    assert_close_to_reference([out, dq, dk, dv], [same, *same_g], [ref, *ref_g])


@pytest.mark.cuda
@sm90
@needs_fa4
def test_cuda_auto_picks_fa4_and_counts_it() -> None:
    q, k, v = _problem(1, 16, 16, 4096, 4096, 128)
    sdpa_flash.reset_stats()
    out = sdpa_flash.attention(q, k, v, causal=True)
    out.sum().backward()
    assert sdpa_flash.explain(q, k, v, causal=True).backend == "fa4"
    assert sdpa_flash.stats().calls.get(("fa4", "direct"), 0) >= 1 or "fa4" in str(sdpa_flash.stats())


@pytest.mark.cuda
@sm90
@needs_fa4
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_varlen_and_key_padding_run_on_fa4(causal: bool) -> None:
    torch.manual_seed(3)
    lens = [700, 33, 1, 2048, 129]
    qs = [torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in lens]
    ks, vs = ([torch.randn(n, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in lens]
              for _ in range(2))
    batch_q, batch_k, batch_v = varlen.pack(qs), varlen.pack(ks), varlen.pack(vs)
    p = varlen.explain_varlen(batch_q, batch_k, batch_v, causal=causal)
    assert p.varlen_backend == "fa4" and p.path == "flash_varlen", p.explain()
    out = varlen.varlen_attention(batch_q, batch_k, batch_v, causal=causal)
    grads = [torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16) for n in lens]
    got = torch.autograd.grad(out.values, qs + ks + vs, torch.cat(grads))
    n = len(lens)
    for i, o in enumerate(out.unpack()):  # output and gradients of each sequence: the rule against float64 math
        _assert_rule([o[None], got[i][None], got[n + i][None], got[2 * n + i][None]], qs[i][None], ks[i][None],
                     vs[i][None], causal, grad=grads[i][None], layout="bshd")
    # the same through attention(key_padding_mask=...): the packed route (forward only here)
    padded, mask = batch_q.to_padded()
    pk, _ = batch_k.to_padded()
    pv, _ = batch_v.to_padded()
    pq, pk, pv = (t.detach().transpose(1, 2) for t in (padded, pk, pv))  # (B, H, S, D)
    out_kpm = sdpa_flash.attention(pq, pk, pv, causal=causal, key_padding_mask=mask)  # (B, H, S, D)
    for i, m in enumerate(lens):
        _assert_rule([out_kpm[i:i + 1, :, :m]], qs[i].transpose(0, 1)[None], ks[i].transpose(0, 1)[None],
                     vs[i].transpose(0, 1)[None], causal)
    assert (out_kpm[0, :, lens[0]:] == 0).all()  # padded query rows are zeros


@pytest.mark.cuda
@sm90
@needs_fa4
def test_cuda_fa4_compiles_fullgraph_and_captures_in_a_cuda_graph() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = _problem(2, 8, 8, 1024, 1024, 128)

    def step(q, k, v):  # type: ignore[no-untyped-def]
        return sdpa_flash.attention(q, k, v, causal=True, policy="fa4")

    explained = torch._dynamo.explain(step)(q, k, v)
    assert explained.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, k, v)
    grad = torch.randn_like(out)
    out.backward(grad)
    _assert_rule([out, q.grad, k.grad, v.grad], q, k, v, True, grad=grad)
    # CUDA graph capture after warm-up (FA4 compiles its kernels on the first call, outside the capture)
    qs, ks, vs = (t.detach().clone() for t in (q, k, v))
    step(qs, ks, vs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(qs, ks, vs)
    qs.copy_(torch.randn_like(qs))
    graph.replay()
    torch.cuda.synchronize()
    assert (static_out - step(qs, ks, vs)).abs().max() == 0


@pytest.mark.cuda
@sm90
@needs_fa4
def test_cuda_window_minus_one_is_causal_not_empty() -> None:
    q, k, v = (t.detach().transpose(1, 2).contiguous() for t in _problem(1, 4, 4, 512, 512, 64, grad=False))
    out, _ = fa4_mod.fa4_fwd(q, k, v, None, False, -1, 0, 0.0)
    causal, _ = fa4_mod.fa4_fwd(q, k, v, None, True, -1, -1, 0.0)
    assert out.abs().max() > 0 and (out - causal).abs().max() == 0


def test_fa4_module_is_importable_spec_only_when_installed() -> None:
    if fa4_mod.installed_version() is None:
        assert importlib.util.find_spec("flash_attn") is None or fa4_mod.installed_version() is None
    else:
        assert importlib.util.find_spec("flash_attn.cute") is not None


# ------------------------------------------------------------------------- PyTorch's own flash registry
def test_torch_registry_activation_is_explicit_and_says_why_not() -> None:
    from sdpa_flash.integrations import torch_fa4

    assert not torch_fa4.active()  # importing sdpa_flash activated nothing
    if HAVE_FA4:
        pytest.skip("covered by the CUDA test below")
    with pytest.raises(sdpa_flash.BackendUnavailableError, match=r"flash-attn-4|registry|CUDA"):
        torch_fa4.activate()
    assert not torch_fa4.active()


@pytest.mark.cuda
@sm90
@needs_fa4
def test_cuda_torch_registry_works_or_restores_fa2() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdpa_flash.integrations import torch_fa4

    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    try:
        torch_fa4.activate()
    except sdpa_flash.BackendUnavailableError as exc:
        assert "190212" in str(exc) and not torch_fa4.active()
    else:
        assert torch_fa4.active() and sdpa_flash.capabilities("cuda").flash_impl == "FA4"
        torch_fa4.restore()
    assert not torch_fa4.active()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # FA2 is back and works
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)


# ------------------------------------------------------------------------------------- flash-attn compat
@pytest.fixture
def compat_on_fa4(fake_fa4, monkeypatch: pytest.MonkeyPatch, request):  # type: ignore[no-untyped-def]
    """compat planning and the policy layer under it as on an H200 with FA4 installed; the FA4 calls go to the CPU
    stand-in, and a ragged batch's one packed call is made the cheapest route."""
    from sdpa_flash import _caches, _dense, _varlen
    from sdpa_flash._varlen import execution
    from sdpa_flash.compat import _run

    for module in (_run, _dense, execution):
        monkeypatch.setattr(module, "capabilities", lambda device: SM90_FA4)
    model = _varlen.COST_MODELS["cuda"]
    monkeypatch.setitem(_varlen.COST_MODELS, "cuda", dataclasses.replace(model, call_us=1e9, call_us_bwd=1e9))
    _caches.clear_all()
    request.addfinalizer(_caches.clear_all)
    yield fake_fa4


@pytest.mark.parametrize(("window", "softcap", "causal"), [((16, 0), 0.0, False), ((-1, 0), 0.0, False),
                                                           ((8, 4), 30.0, False), ((-1, -1), 20.0, True),
                                                           ((5, -1), 0.0, True)])
def test_compat_windows_and_softcap_run_on_fa4(compat_on_fa4, window, softcap, causal) -> None:  # type: ignore[no-untyped-def]
    from sdpa_flash.compat import explain_flash_attn, flash_attn_func, use_path

    torch.manual_seed(4)
    q = torch.randn(2, 20, 4, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 28, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    kw = {"window_size": window, "softcap": softcap, "causal": causal}
    p = explain_flash_attn(flash_attn_func, q, k, v, **kw)
    assert p.path == "sdpa", p.explain()
    plain = window[0] < 0 and not softcap  # (-1, -1) is no window, (-1, 0) plain causal: planned when it runs
    assert p.kernel == (None if plain else "fa4"), p.explain()
    compat_on_fa4.CALLS.clear()
    # (a plain call's kernel is the ranking's: cuDNN on an H200, which this CPU cannot run, so FA4 is named)
    with sdpa_flash.use_policy("fa4") if plain else contextlib.nullcontext():
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    with use_path("exact"):
        _, ref_lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    _assert_rule([out], q, k, v, "bottom_right" if causal else False, layout="bshd", window=window,
                 softcap=softcap or None)  # flash-attn's causal and windows are bottom-right
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[~finite] == float("inf")).all()
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-3)
    (name, call), = compat_on_fa4.CALLS  # one FA4 call, the window and softcap in it
    assert name == "flash_attn_func"
    if not plain:
        assert call["window_size"] == fa4_mod.window_arg(*window) or causal  # -1 became None per side
        assert call["softcap"] == softcap


def test_compat_varlen_window_runs_one_fa4_call(compat_on_fa4) -> None:  # type: ignore[no-untyped-def]
    from sdpa_flash.compat import flash_attn_varlen_func

    torch.manual_seed(5)
    lens = [7, 13, 1, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 4, 16, dtype=torch.bfloat16) for _ in range(3))
    args = (q, k, v, cu, cu, max(lens), max(lens))
    out = flash_attn_varlen_func(*args, causal=True, window_size=(3, 0), softcap=10.0)
    assert [c[0] for c in compat_on_fa4.CALLS] == ["flash_attn_varlen_func"]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):  # each sequence on its own
        _assert_rule([out[a:b][None]], q[a:b][None], k[a:b][None], v[a:b][None], "bottom_right", layout="bshd",
                     window=(3, 0), softcap=10.0)


def test_compat_kernel_reasons_are_the_planners(compat_on_fa4) -> None:  # type: ignore[no-untyped-def]
    from sdpa_flash.compat import explain_flash_attn, flash_attn_func

    q = torch.randn(1, 8, 2, 8)  # float32 at head dim 8: no fused kernel of this profile (FlexAttention's least: 16)
    p = explain_flash_attn(flash_attn_func, q, q, q, window_size=(2, 2))
    assert p.path != "sdpa" and p.kernel is None
    assert any(r.startswith("the planner would run it on") and "dtype=float32" in r for r in p.reasons["sdpa"])
    qb = q.bfloat16()
    p = explain_flash_attn(flash_attn_func, qb, qb, qb, window_size=(2, 2), alibi_slopes=torch.ones(2))
    assert p.path != "sdpa" and "no ALiBi" in p.reasons["sdpa"][0]
    with sdpa_flash.use_policy("cudnn"):
        p = explain_flash_attn(flash_attn_func, qb, qb, qb, window_size=(2, 2))
    assert p.path != "sdpa" and any("cudnn" in r and "window" in r for r in p.reasons["sdpa"]), p.explain()
    with sdpa_flash.use_policy("fa4"):
        assert explain_flash_attn(flash_attn_func, qb, qb, qb, window_size=(2, 2)).kernel == "fa4"


def test_bshd_runner_takes_the_tensors_as_they_are(fake_fa4) -> None:  # type: ignore[no-untyped-def]
    s = spec(batch=2, heads_q=4, heads_kv=2, seqlen_q=12, seqlen_k=12, head_dim=16, head_dim_v=16,
             causal="top_left", needs_grad=False)
    p = plan(s, SM90_FA4, resolve_policy("fa4"))
    q = torch.randn(2, 12, 4, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 12, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    native = BACKENDS["fa4"].bshd_runner(s, p.prep)
    assert native is not None
    out = native(q, k, v, None, 0.0, None)
    assert fake_fa4.CALLS[-1][1]["q_stride"] == q.stride()  # no transposes on the way in
    via_bhsd = BACKENDS["fa4"].runner(s, p.prep)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0,
                                                 None)
    assert torch.equal(out, via_bhsd.transpose(1, 2))
    padded = spec(batch=2, heads_q=4, heads_kv=2, seqlen_q=12, seqlen_k=12, head_dim=20, head_dim_v=20)
    assert BACKENDS["fa4"].bshd_runner(padded, plan(padded, SM90_FA4, resolve_policy("fa4")).prep) is None
