"""plan() over constructed Capabilities: the decisions and reasons for CPU and sm70 ... sm100, on any machine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdpa_flash import (
    AttentionSpec,
    BackendUnavailableError,
    Capabilities,
    DenylistEntry,
    Policy,
    add_denylist_entry,
    plan,
    remove_denylist_entry,
)
from sdpa_flash.backends import BACKENDS
from sdpa_flash.policy import resolve_policy

PROFILES = {
    "cpu": Capabilities.synthetic("cpu"),
    "sm70": Capabilities.synthetic("cuda", (7, 0)),
    "sm75": Capabilities.synthetic("cuda", (7, 5)),
    "sm80": Capabilities.synthetic("cuda", (8, 0)),
    "sm86": Capabilities.synthetic("cuda", (8, 6)),
    "sm89": Capabilities.synthetic("cuda", (8, 9)),
    "sm90": Capabilities.synthetic("cuda", (9, 0)),
    "sm100": Capabilities.synthetic("cuda", (10, 0)),
}


def spec(device_type: str = "cuda", dtype: torch.dtype = torch.bfloat16, **kw: object) -> AttentionSpec:
    base: dict[str, object] = dict(
        device_type=device_type, dtype=dtype, batch=2, heads_q=16, heads_kv=16, seqlen_q=1024, seqlen_k=1024,
        head_dim=128, head_dim_v=128, causal="top_left", mask=None, dropout=False, needs_grad=True,
    )
    base.update(kw)
    return AttentionSpec(**base)  # type: ignore[arg-type]


def typical(profile: str) -> AttentionSpec:
    caps = PROFILES[profile]
    if caps.device_type == "cpu":
        return spec("cpu", torch.float32)
    return spec(dtype=torch.bfloat16 if caps.compute_capability >= (8, 0) else torch.float16)


AUTO = resolve_policy("auto")


# ------------------------------------------------------------------------------- the auto decision table
@pytest.mark.parametrize(
    ("profile", "expected"),
    [("cpu", "flash"), ("sm70", "efficient"), ("sm75", "efficient"), ("sm80", "flash"), ("sm86", "flash"),
     ("sm89", "flash"), ("sm90", "cudnn"), ("sm100", "cudnn")],
)
def test_auto_picks_the_ranked_kernel(profile: str, expected: str) -> None:
    p = plan(typical(profile), PROFILES[profile], AUTO)
    assert p.backend == expected
    assert not p.fallback
    # the first-ranked backend that is installed can run the typical call on every profile (FA4 is not installed
    # in these profiles, and says so)
    assert next(b for b in p.order if b != "fa4") == expected
    if "fa4" in p.order[: p.order.index(expected)]:
        assert p.reasons["fa4"] == ("flash-attn-4 is not installed (pip install 'sdpa_flash[fa4]')",)
    assert set(p.reasons) | {p.backend} == set(BACKENDS)
    assert p.evidence


@pytest.mark.parametrize("profile", ["sm70", "sm75"])
def test_pre_ampere_reasons_name_the_capability(profile: str) -> None:
    p = plan(typical(profile), PROFILES[profile], AUTO)
    cc = PROFILES[profile].compute_capability
    for name in ("flash", "cudnn"):
        assert f"requires compute capability >= (8, 0), this GPU has ({cc[0]}, {cc[1]})" in p.reasons[name]


def test_bf16_on_volta_falls_back_to_math_and_says_why() -> None:
    p = plan(spec(dtype=torch.bfloat16), PROFILES["sm70"], AUTO)
    assert p.backend == "math" and p.fallback
    assert any("bfloat16 requires compute capability >= (8, 0)" in r for r in p.reasons["efficient"])
    with pytest.raises(BackendUnavailableError, match="fallback mode is 'error'"):
        plan(spec(dtype=torch.bfloat16), PROFILES["sm70"], resolve_policy("auto", fallback="error"))
    with pytest.raises(BackendUnavailableError) as info:
        plan(spec(dtype=torch.bfloat16), PROFILES["sm70"], resolve_policy("fused"))
    assert set(info.value.reasons) == {"efficient", "flash", "cudnn", "flex"}  # math is never tried under "fused"


def test_lower_ranked_backends_get_a_ranking_reason() -> None:
    p = plan(typical("sm90"), PROFILES["sm90"], AUTO)
    assert p.reasons["flash"] == ("ranked below cudnn for sm90 by the policy",)
    # str(plan): the backend and route on the first line, then each other backend's first reason, one a line
    assert str(p).startswith("cudnn via direct aten op\n  fa4: flash-attn-4 is not installed (pip install "
                             "'sdpa_flash[fa4]')\n  flash: ranked below cudnn") or str(p).startswith(
        "cudnn via direct aten op\n  fa4: ranked below cudnn")
    text = p.explain()
    assert "backend: cudnn" in text and "ranking: cudnn > fa4 > flash > efficient > flex > math > chunked" in text
    assert "Sk 0-1024, training:" in text  # the measured shape class that put cuDNN first


def test_cpu_reasons_for_cuda_only_backends() -> None:
    p = plan(typical("cpu"), PROFILES["cpu"], AUTO)
    assert p.reasons["cudnn"] == ("not available on device type 'cpu' (has kernels for: cuda)",)


# ---------------------------------------------------------------------------------- strict policies
@pytest.mark.parametrize("profile", list(PROFILES))
def test_flash_policy_is_strict(profile: str) -> None:
    caps, s = PROFILES[profile], typical(profile)
    flash = resolve_policy("flash")
    if profile in ("sm70", "sm75"):
        with pytest.raises(BackendUnavailableError) as info:
            plan(s, caps, flash)
        assert list(info.value.reasons) == ["flash"]
        assert "requires compute capability >= (8, 0)" in str(info.value)
        assert "inputs: query (2, 16, 1024, 128)" in str(info.value)
    else:
        p = plan(s, caps, flash)
        assert p.backend == "flash" and not p.fallback
        # outside the policy: "not allowed" where cuDNN could run, its own reason where it cannot (the CPU)
        assert p.reasons["cudnn"] == (("not available on device type 'cpu' (has kernels for: cuda)",)
                                      if profile == "cpu" else ("not allowed by policy flash",))


def test_math_policy_always_runs() -> None:
    for name, caps in PROFILES.items():
        assert plan(typical(name), caps, resolve_policy("math")).backend == "math"


def test_custom_list_order_and_fallback() -> None:
    pol = resolve_policy(["flash", "math"])
    assert plan(typical("sm80"), PROFILES["sm80"], pol).backend == "flash"
    p = plan(typical("sm75"), PROFILES["sm75"], pol)
    assert p.backend == "math" and p.fallback
    with pytest.raises(BackendUnavailableError):
        plan(typical("sm75"), PROFILES["sm75"], resolve_policy("cudnn,flash"))
    assert plan(typical("sm80"), PROFILES["sm80"], resolve_policy("cudnn,flash")).backend == "cudnn"


# --------------------------------------------------------------------------------- input-driven reasons
def test_mask_excludes_flash_and_keeps_cudnn_on_hopper() -> None:
    p = plan(spec(mask="bool"), PROFILES["sm90"], AUTO)
    assert p.backend == "cudnn"
    assert any(r.startswith("attn_mask is not supported") for r in p.reasons["flash"])
    p80 = plan(spec(mask="float"), PROFILES["sm80"], AUTO)
    assert p80.backend == "efficient"


def test_dtype_and_head_dim_reasons() -> None:
    p = plan(spec(dtype=torch.float32), PROFILES["sm90"], AUTO)
    assert p.backend == "efficient"
    assert "dtype=float32 (supported: bfloat16, float16)" in p.reasons["cudnn"]
    p = plan(spec(head_dim=512, head_dim_v=512), PROFILES["sm90"], AUTO)
    assert p.backend == "efficient"
    assert "head_dim=512 (supported: <= 256)" in p.reasons["flash"]
    p = plan(spec(head_dim=192, head_dim_v=192), PROFILES["sm80"], AUTO)
    assert p.backend == "flash"
    with pytest.raises(BackendUnavailableError, match=r"head_dim=192 \(supported: <= 128 on sm80"):
        plan(spec(head_dim=192, head_dim_v=192), PROFILES["sm80"], resolve_policy("cudnn"))


def test_ada_backward_shared_memory_limit() -> None:
    with pytest.raises(BackendUnavailableError, match="needs more shared memory than sm89"):
        plan(spec(head_dim=200, head_dim_v=200), PROFILES["sm89"], resolve_policy("flash"))
    assert plan(spec(head_dim=200, head_dim_v=200, needs_grad=False), PROFILES["sm89"],
                resolve_policy("flash")).backend == "flash"
    assert plan(spec(head_dim=200, head_dim_v=200), PROFILES["sm80"], resolve_policy("flash")).backend == "flash"


def test_value_head_dim_must_match_for_flash() -> None:
    p = plan(spec(head_dim_v=64), PROFILES["sm80"], AUTO)
    assert p.backend == "efficient"
    assert any("value head_dim=64 differs" in r for r in p.reasons["flash"])


def test_padding_and_gqa_adaptations_are_noted() -> None:
    p = plan(spec(head_dim=60, head_dim_v=60), PROFILES["sm80"], AUTO)
    assert p.backend == "flash" and p.prep.pad_qk_to == 64
    assert "head dim zero-padded 60->64" in p.notes
    p = plan(spec(heads_kv=4), PROFILES["sm80"], resolve_policy("efficient"))
    assert p.prep.repeat_kv == 4 and any("repeated 4x for GQA" in n for n in p.notes)
    p = plan(spec(heads_kv=4), PROFILES["sm80"], AUTO)
    assert p.backend == "flash" and p.prep.repeat_kv == 1 and not p.notes


# ------------------------------------------------------------------------------------- causal corners
def test_bottom_right_is_native_for_flash_and_masked_elsewhere() -> None:
    s = spec(causal="bottom_right", seqlen_q=256, seqlen_k=1024)
    p = plan(s, PROFILES["sm80"], AUTO)
    assert p.backend == "flash" and p.prep.kernel_causal and p.prep.causal_mask is None
    p = plan(s, PROFILES["sm90"], AUTO)
    assert p.backend == "cudnn" and p.prep.causal_mask == "bottom_right" and not p.prep.kernel_causal
    assert any("bottom-right causal materialised" in n for n in p.notes)


def test_top_left_with_more_keys_truncates_for_flash() -> None:
    p = plan(spec(seqlen_q=256, seqlen_k=1024), PROFILES["sm80"], AUTO)
    assert p.backend == "flash" and p.prep.truncate_keys and p.prep.kernel_causal
    assert any("keys past Sq are never visible" in n for n in p.notes)


def test_top_left_with_more_queries_is_refused_by_flash_with_a_fix() -> None:
    s = spec(seqlen_q=1024, seqlen_k=256)
    with pytest.raises(BackendUnavailableError, match="pass causal='bottom_right'"):
        plan(s, PROFILES["sm80"], resolve_policy("flash"))
    assert plan(s, PROFILES["sm80"], AUTO).backend == "efficient"  # the efficient kernel is top-left natively


def test_square_causal_kinds_are_the_same_decision() -> None:
    a = plan(spec(causal="top_left"), PROFILES["sm90"], AUTO)
    b = plan(spec(causal="bottom_right"), PROFILES["sm90"], AUTO)
    assert a.backend == b.backend and a.prep == b.prep


# ------------------------------------------------------------------------------------------- denylist
def test_builtin_denylist_mask_nan_on_hopper() -> None:
    caps = dataclasses.replace(PROFILES["sm90"], torch_version="2.11.0")
    s = spec(mask="bool", seqlen_q=1088, seqlen_k=1088)  # 1088 % 128 == 64
    p = plan(s, caps, AUTO)
    assert p.backend == "efficient"
    assert any("pytorch/pytorch#196678" in r for r in p.reasons["cudnn"])
    assert plan(dataclasses.replace(s, needs_grad=False), caps, AUTO).backend == "cudnn"
    assert plan(spec(mask="bool", seqlen_q=1024, seqlen_k=1024), caps, AUTO).backend == "cudnn"


def test_builtin_denylist_blackwell_gqa() -> None:
    caps = dataclasses.replace(PROFILES["sm100"], torch_version="2.13.0")
    p = plan(spec(heads_kv=4), caps, AUTO)
    assert p.backend == "flash" and any("#193893" in r for r in p.reasons["cudnn"])
    assert plan(spec(heads_kv=8), caps, AUTO).backend == "cudnn"


def test_builtin_denylist_by_torch_and_cudnn_version() -> None:
    old = dataclasses.replace(PROFILES["sm90"], torch_version="2.5.0")
    assert plan(spec(), old, AUTO).backend == "flash"
    assert plan(spec(needs_grad=False), old, AUTO).backend == "cudnn"
    old_cudnn = dataclasses.replace(PROFILES["sm90"], cudnn_version=91500)
    assert plan(spec(seqlen_q=1000, seqlen_k=1000), old_cudnn, AUTO).backend == "flash"
    assert plan(spec(seqlen_q=1024, seqlen_k=1024), old_cudnn, AUTO).backend == "cudnn"


def test_user_denylist_entry_vetoes_and_is_removable() -> None:
    entry = DenylistEntry("flash", "test: flash misbehaves at head_dim 64", source="local",
                          when=lambda s: s.head_dim == 64)
    s = spec(head_dim=64, head_dim_v=64)
    assert plan(s, PROFILES["sm80"], AUTO).backend == "flash"
    add_denylist_entry(entry)
    try:
        p = plan(s, PROFILES["sm80"], AUTO)
        assert p.backend == "efficient"
        assert p.reasons["flash"] == ("denylisted: test: flash misbehaves at head_dim 64 [local]",)
        assert plan(spec(), PROFILES["sm80"], AUTO).backend == "flash"
    finally:
        remove_denylist_entry(entry)
    assert plan(s, PROFILES["sm80"], AUTO).backend == "flash"


def _cpu_spec(**kw: object) -> AttentionSpec:
    """A CPU call long enough (1024 keys) that no built-in CPU entry applies."""
    return spec("cpu", torch.float32, needs_grad=False, **kw)


@pytest.mark.parametrize("reroute", [True, False])
def test_reroute_entry_moves_on_without_a_fallback(reroute: bool) -> None:
    """An entry with ``reroute=True`` sends the call to the next backend quietly: under auto, a custom list and
    ``fallback="error"`` the plan is not a fallback, and explain() names the entry. Without it, the same veto is a
    fallback (and an error under ``fallback="error"``). A strict policy refuses either way, with the entry."""
    entry = DenylistEntry("flash", "test: CPU flash misbehaves at head_dim 64", source="local", device_type="cpu",
                          when=lambda s: s.head_dim == 64, reroute=reroute)
    s, caps = _cpu_spec(head_dim=64, head_dim_v=64), PROFILES["cpu"]
    assert plan(s, caps, AUTO).backend == "flash"
    add_denylist_entry(entry)
    try:
        for pol in (AUTO, resolve_policy(["flash", "math"])):
            p = plan(s, caps, pol)
            assert p.backend == "math" and p.fallback is not reroute
            assert p.reasons["flash"][0] == "denylisted: test: CPU flash misbehaves at head_dim 64 [local]"
            assert ("reroute=True" in p.explain()) is reroute and ("[fallback]" in p.explain()) is not reroute
        strict_fallback = resolve_policy("auto", fallback="error")
        if reroute:
            assert plan(s, caps, strict_fallback).backend == "math"
        else:
            with pytest.raises(BackendUnavailableError, match="fallback mode is 'error'"):
                plan(s, caps, strict_fallback)
        with pytest.raises(BackendUnavailableError, match="CPU flash misbehaves at head_dim 64") as info:
            plan(s, caps, resolve_policy("flash"))
        assert info.value.reasons == {"flash": (entry.describe(),)}
        assert plan(_cpu_spec(), caps, AUTO).backend == "flash"  # head_dim 128: the entry does not apply
    finally:
        remove_denylist_entry(entry)


def test_reroute_does_not_hide_other_reasons() -> None:
    """A backend that a reroute entry vetoes but that is also unsupported (dropout), or also vetoed by an ordinary
    entry, is a plain fallback: reroute only quiets moves that the reroute entries alone cause."""
    quiet = DenylistEntry("flash", "test: quiet", device_type="cpu", when=lambda s: s.head_dim == 64, reroute=True)
    loud = DenylistEntry("flash", "test: loud", device_type="cpu", when=lambda s: s.heads_q == 8)
    caps = PROFILES["cpu"]
    add_denylist_entry(quiet)
    add_denylist_entry(loud)
    try:
        assert not plan(_cpu_spec(head_dim=64, head_dim_v=64), caps, AUTO).fallback
        p = plan(_cpu_spec(head_dim=64, head_dim_v=64, dropout=True), caps, AUTO)
        assert p.backend == "math" and p.fallback and "reroute=True" not in p.explain()
        p = plan(_cpu_spec(head_dim=64, head_dim_v=64, heads_q=8, heads_kv=8), caps, AUTO)
        assert p.backend == "math" and p.fallback
        assert p.reasons["flash"] == ("denylisted: test: quiet", "denylisted: test: loud")
    finally:
        remove_denylist_entry(quiet)
        remove_denylist_entry(loud)


def test_denylist_entry_fields_are_checked_where_written() -> None:
    from sdpa_flash import AttentionInputError

    with pytest.raises(AttentionInputError, match=r"DenylistEntry\.reroute to be a bool, but got 'yes'"):
        DenylistEntry("flash", "x", device_type="cpu", reroute="yes")  # type: ignore[arg-type]


def test_denylist_rejects_unknown_backend() -> None:
    from sdpa_flash import AttentionInputError

    with pytest.raises(AttentionInputError, match=r"DenylistEntry\.backend"):
        add_denylist_entry(DenylistEntry("warp", "x"))


# ----------------------------------------------------------------------------------------- properties
def test_plan_is_cached_and_pure() -> None:
    s, caps = typical("sm90"), PROFILES["sm90"]
    assert plan(s, caps, AUTO) is plan(s, caps, AUTO)
    assert plan(s, caps, Policy()) == plan(s, caps, AUTO)


def test_zero_size_problem_needs_no_kernel() -> None:
    p = plan(spec(batch=0), PROFILES["sm90"], resolve_policy("flash"))
    assert p.backend == "math" and "zero-size" in p.notes[0]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_backend_has_reasons_or_runs(profile: str) -> None:
    caps = PROFILES[profile]
    for pol in ("auto", "fused", "math", "flash", "cudnn", "efficient"):
        try:
            p = plan(typical(profile), caps, resolve_policy(pol))
        except BackendUnavailableError as exc:
            assert exc.reasons and all(exc.reasons.values())
        else:
            assert all(p.reasons[n] for n in p.reasons)
            assert p.backend not in p.reasons


def test_torch_debug_lines_are_parsed_into_reasons() -> None:
    from sdpa_flash.backends._base import _torch_warning_lines

    text = ("[W1121 14:00:00.000000000 sdp_utils.cpp:117] Warning: Flash attention does not support the is_causal "
            "flag when seqlen_q != seqlen_k. (function check_flash_causal_non_square_seqlens)\n")
    assert _torch_warning_lines(text) == [
        " Flash attention does not support the is_causal flag when seqlen_q != seqlen_k."]
