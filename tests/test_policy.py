"""Policies: resolution, precedence (call > use_policy > set_policy > environment > "auto"), isolation between
threads and asyncio tasks, and the fallback modes, exercised on the CPU where dropout forces a math fallback."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import sdpa_flash
from sdpa_flash import AttentionInputError, BackendUnavailableError, Policy
from sdpa_flash import policy as policy_mod
from sdpa_flash.policy import get_policy, resolve_policy, set_policy, use_policy

AUTO = Policy("auto", (), "warn_once")


@pytest.fixture(autouse=True)
def clean_policy_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No environment policy, no process-wide policy; both restored afterwards whatever the test did."""
    saved_env, saved_process = policy_mod._env_policy, policy_mod._process_policy
    for var in [v for v in os.environ if v.startswith("SDPA_FLASH_") and v != "SDPA_FLASH_TUNE_DIR"]:
        monkeypatch.delenv(var)
    policy_mod._env_policy = None
    policy_mod._process_policy = None
    try:
        yield
    finally:
        policy_mod._env_policy = saved_env
        policy_mod._process_policy = saved_process


def qkv(sq: int = 16, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unmasked (2, 4, sq, d) inputs; sq >= 16 keys, or CPU flash is rerouted to math (pytorch/pytorch#141128)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, sq, d, generator=gen) for _ in range(3))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ resolve_policy
RESOLVED: dict[str, tuple[Any, Policy]] = {
    "auto": ("auto", Policy("auto", ())),
    "fused": ("fused", Policy("fused", ())),
    "flash": ("flash", Policy("flash", ("flash",))),
    "math": ("math", Policy("math", ("math",))),
    "cudnn": ("cudnn", Policy("cudnn", ("cudnn",))),
    "comma-list": ("cudnn,flash", Policy("custom", ("cudnn", "flash"))),
    "comma-list-spaces": (" cudnn , flash ", Policy("custom", ("cudnn", "flash"))),
    "list": (["efficient", "math"], Policy("custom", ("efficient", "math"))),
    "tuple": (("flash", "efficient", "math"), Policy("custom", ("flash", "efficient", "math"))),
}


@pytest.mark.parametrize("given, expected", RESOLVED.values(), ids=RESOLVED.keys())
def test_resolve_policy(given: Any, expected: Policy) -> None:
    got = resolve_policy(given)
    assert got == expected
    assert got.fallback == "warn_once"
    assert got.strict == (expected.name == "fused" or len(expected.backends) == 1)
    assert resolve_policy(given, fallback="silent") == Policy(expected.name, expected.backends, "silent")


def test_resolve_policy_instance() -> None:
    pol = Policy("custom", ("flash", "math"), "error")
    assert resolve_policy(pol) is pol
    assert resolve_policy(pol, fallback="silent") == Policy("custom", ("flash", "math"), "silent")
    assert str(pol) == "[flash, math] (fallback=error)"
    assert str(resolve_policy("auto")) == "auto"


BAD_POLICIES: dict[str, tuple[Any, dict[str, Any], str]] = {
    "unknown-name": ("fastest", {}, r"Expected policy to be one of auto, fused, fa4, cudnn, flash, efficient, "
                                    r"flex, math, chunked, .* got 'fastest'"),
    "unknown-in-list": ("flash,fastest", {}, r"got 'flash,fastest'"),
    "empty-list": ([], {}, r"Expected policy to be one of .* got \[\]"),
    "duplicate": (["flash", "flash"], {}, r"Expected each backend at most once in policy, .*\['flash', 'flash'\]"),
    "not-a-string": (3, {}, r"Expected policy to be a Policy, a policy name .* but got 3"),
    "list-of-ints": ([1, 2], {}, r"Expected policy to be a Policy"),
    "bad-fallback": ("auto", {"fallback": "loud"}, r"Expected fallback to be one of warn_once, error, silent.*'loud'"),
}


@pytest.mark.parametrize("given, kwargs, match", BAD_POLICIES.values(), ids=BAD_POLICIES.keys())
def test_resolve_policy_errors(given: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(AttentionInputError, match=match):
        resolve_policy(given, **kwargs)
    with pytest.raises(AttentionInputError, match=match):  # use_policy resolves before entering the block
        with use_policy(given, **kwargs):
            pass
    assert get_policy() == AUTO


# -------------------------------------------------------------------------------------------- use_policy
def test_use_policy_nests_and_restores() -> None:
    assert get_policy() == AUTO
    with use_policy("math") as outer:
        assert outer == Policy("math", ("math",)) and get_policy() is outer
        with use_policy("flash,math", fallback="silent") as inner:
            assert get_policy() is inner == Policy("custom", ("flash", "math"), "silent")
            with use_policy(Policy("fused")):
                assert get_policy() == Policy("fused")
            assert get_policy() is inner
        assert get_policy() is outer
    assert get_policy() == AUTO


def test_use_policy_restores_after_exception() -> None:
    with use_policy("math"):
        with pytest.raises(KeyError):
            with use_policy("flash"):
                assert get_policy().name == "flash"
                raise KeyError("boom")
        assert get_policy().name == "math"
    assert get_policy() == AUTO


def test_use_policy_governs_attention_and_explain() -> None:
    q, k, v = qkv()
    assert sdpa_flash.explain(q, k, v).backend == "flash"
    with use_policy("math"):
        assert sdpa_flash.explain(q, k, v).backend == "math"
        out = sdpa_flash.attention(q, k, v, dropout_p=0.5)  # math has dropout: no error, no fallback
        assert out.shape == q.shape
    with use_policy("flash"):
        with pytest.raises(BackendUnavailableError, match="dropout_p > 0 is not supported"):
            sdpa_flash.attention(q, k, v, dropout_p=0.5)
    assert sdpa_flash.explain(q, k, v).backend == "flash"


def test_call_policy_overrides_use_policy() -> None:
    q, k, v = qkv()
    with use_policy("flash"):
        assert sdpa_flash.explain(q, k, v, dropout_p=0.5, policy="math").backend == "math"
        assert sdpa_flash.attention(q, k, v, dropout_p=0.5, policy="math").shape == q.shape
        assert sdpa_flash.explain(q, k, v, policy=Policy("math", ("math",))).backend == "math"
    with use_policy("math"):
        with pytest.raises(BackendUnavailableError):
            sdpa_flash.attention(q, k, v, dropout_p=0.5, policy="flash")
        with pytest.raises(BackendUnavailableError):
            sdpa_flash.explain(q, k, v, dropout_p=0.5, policy="flash")
        assert sdpa_flash.explain(q, k, v, policy="auto").backend == "flash"


# ---------------------------------------------------------------------------------- threads and asyncio
@pytest.mark.filterwarnings("ignore:sdpa_flash fell back")
def test_use_policy_is_not_seen_by_another_thread() -> None:
    q, k, v = qkv(sq=19)
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, Any] = {}
    errors: list[BaseException] = []

    def in_block() -> None:
        try:
            with use_policy("fused"):
                barrier.wait()  # 1: the block is open
                seen["a"] = get_policy()
                seen["a_explain"] = sdpa_flash.explain(q, k, v).policy
                try:
                    sdpa_flash.attention(q, k, v, dropout_p=0.5)
                except BackendUnavailableError as exc:
                    seen["a_error"] = exc
                barrier.wait()  # 2: the other thread has looked while the block was open
            seen["a_after"] = get_policy()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    def outside() -> None:
        try:
            barrier.wait()  # 1
            seen["b"] = get_policy()
            seen["b_explain"] = sdpa_flash.explain(q, k, v).policy
            seen["b_out"] = sdpa_flash.attention(q, k, v, dropout_p=0.5)  # "fused" here would raise
            barrier.wait()  # 2
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=in_block), threading.Thread(target=outside)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen["a"] == seen["a_explain"] == Policy("fused")
    assert isinstance(seen["a_error"], BackendUnavailableError)
    assert seen["a_after"] == AUTO
    assert seen["b"] == seen["b_explain"] == AUTO
    assert seen["b_out"].shape == q.shape
    assert get_policy() == AUTO  # and the main thread never saw it


def test_use_policy_is_isolated_between_asyncio_tasks() -> None:
    q, k, v = qkv()

    async def task(name: str, log: list[tuple[str, str, str]]) -> None:
        with use_policy(name):
            for _ in range(3):
                await asyncio.sleep(0)
                log.append((name, get_policy().name, sdpa_flash.explain(q, k, v).backend))
        await asyncio.sleep(0)
        log.append((name, get_policy().name, "after"))

    async def main() -> list[tuple[str, str, str]]:
        log: list[tuple[str, str, str]] = []
        await asyncio.gather(task("math", log), task("flash", log))
        return log

    log = asyncio.run(main())
    inside = [entry for entry in log if entry[2] != "after"]
    assert [e[0] for e in inside[:4]] == ["math", "flash", "math", "flash"]  # the tasks did interleave
    assert all(name == pol == backend for name, pol, backend in inside)
    assert [e[1] for e in log if e[2] == "after"] == ["auto", "auto"]


# ------------------------------------------------------------------------------------------ set_policy
def test_set_policy_is_process_wide_and_below_use_policy() -> None:
    q, k, v = qkv()
    try:
        set_policy("math")
        assert get_policy() == Policy("math", ("math",))
        assert sdpa_flash.explain(q, k, v).backend == "math"
        seen: list[Policy] = []
        t = threading.Thread(target=lambda: seen.append(get_policy()))
        t.start()
        t.join(30)
        assert seen == [Policy("math", ("math",))]
        with use_policy("flash"):
            assert get_policy().name == "flash"
            assert sdpa_flash.explain(q, k, v).backend == "flash"
            with pytest.raises(BackendUnavailableError):
                sdpa_flash.attention(q, k, v, dropout_p=0.5)
        assert get_policy().name == "math"
        assert sdpa_flash.attention(q, k, v, dropout_p=0.5).shape == q.shape  # math: no fallback, no error
        set_policy("auto", fallback="error")
        with pytest.raises(BackendUnavailableError, match="fallback mode is 'error'"):
            sdpa_flash.attention(q, k, v, dropout_p=0.5)
        set_policy(None)
        assert get_policy() == AUTO
        assert sdpa_flash.explain(q, k, v).backend == "flash"
    finally:
        set_policy(None)


def test_set_policy_rejects_bad_values_and_keeps_the_old_one() -> None:
    try:
        set_policy("math")
        with pytest.raises(AttentionInputError):
            set_policy("fastest")
        with pytest.raises(AttentionInputError):
            set_policy("auto", fallback="loud")
        assert get_policy().name == "math"
    finally:
        set_policy(None)


# ----------------------------------------------------------------------------------------- environment
def test_environment_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv()
    monkeypatch.setenv("SDPA_FLASH_POLICY", "math")
    policy_mod._env_policy = None
    assert get_policy() == Policy("math", ("math",))
    assert sdpa_flash.explain(q, k, v).backend == "math"
    assert sdpa_flash.attention(q, k, v, dropout_p=0.5).shape == q.shape
    with use_policy("flash"):  # blocks beat the environment
        assert sdpa_flash.explain(q, k, v).backend == "flash"
    try:
        set_policy("auto")  # so does set_policy
        assert sdpa_flash.explain(q, k, v).backend == "flash"
    finally:
        set_policy(None)


def test_environment_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv(sq=21)
    monkeypatch.setenv("SDPA_FLASH_POLICY", "flash,math")
    monkeypatch.setenv("SDPA_FLASH_FALLBACK", "error")
    policy_mod._env_policy = None
    assert get_policy() == Policy("custom", ("flash", "math"), "error")
    with pytest.raises(BackendUnavailableError, match="fallback mode is 'error'"):
        sdpa_flash.attention(q, k, v, dropout_p=0.5)
    monkeypatch.setenv("SDPA_FLASH_FALLBACK", "silent")
    assert get_policy().fallback == "error"  # read once, then cached ...
    policy_mod._env_policy = None  # ... until the cache is reset
    assert get_policy() == Policy("custom", ("flash", "math"), "silent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdpa_flash.attention(q, k, v, dropout_p=0.5)
    assert not caught


def test_empty_environment_means_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPA_FLASH_POLICY", "")
    monkeypatch.setenv("SDPA_FLASH_FALLBACK", "")
    policy_mod._env_policy = None
    assert get_policy() == AUTO


@pytest.mark.parametrize("var, value", [("SDPA_FLASH_POLICY", "bogus"), ("SDPA_FLASH_FALLBACK", "loud")])
def test_environment_unknown_value(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    q, k, v = qkv()
    monkeypatch.setenv(var, value)
    policy_mod._env_policy = None
    match = rf"Invalid environment: .*{var}='{value}'"
    with pytest.raises(AttentionInputError, match=match):
        get_policy()
    with pytest.raises(AttentionInputError, match=match):
        sdpa_flash.attention(q, k, v)
    with pytest.raises(AttentionInputError, match=match):
        sdpa_flash.explain(q, k, v)
    # an explicit policy does not need the environment
    assert sdpa_flash.explain(q, k, v, policy="math").backend == "math"
    with use_policy("auto"):
        assert sdpa_flash.attention(q, k, v).shape == q.shape


# --------------------------------------------------------------------------------------- fallback modes
def _fell_back(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, UserWarning) and "fell back" in str(w.message)]


def test_warn_once_per_call_site() -> None:
    q, k, v = qkv(sq=22, d=8)  # a shape no other test uses, so this warning is new
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            sdpa_flash.attention(q, k, v, dropout_p=0.5)  # call site 1
        assert len(_fell_back(caught)) == 1
        for _ in range(3):
            sdpa_flash.attention(q, k, v, dropout_p=0.5)  # call site 2
        assert len(_fell_back(caught)) == 2
        sdpa_flash.attention(q, k, v, dropout_p=0.5)  # call site 3
    warned = _fell_back(caught)
    assert len(warned) == 3
    assert all(w.filename == __file__ for w in warned)  # attributed to the caller
    assert len({w.lineno for w in warned}) == 3
    msg = str(warned[0].message)
    assert "math backend" in msg and "flash: dropout_p > 0 is not supported" in msg and "dropout" in msg


def test_fallback_error_raises() -> None:
    q, k, v = qkv()
    with use_policy("auto", fallback="error"):
        with pytest.raises(BackendUnavailableError, match=r"would fall back to 'math'.*fallback mode is 'error'") as e:
            sdpa_flash.attention(q, k, v, dropout_p=0.5)
        assert e.value.reasons == {"flash": ("dropout_p > 0 is not supported",)}
        with pytest.raises(BackendUnavailableError):
            sdpa_flash.explain(q, k, v, dropout_p=0.5)
        assert sdpa_flash.attention(q, k, v).shape == q.shape  # no fallback needed: fine


def test_fallback_silent_does_not_warn() -> None:
    q, k, v = qkv(sq=23, d=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with use_policy("auto", fallback="silent"):
            out = sdpa_flash.attention(q, k, v, dropout_p=0.5)
            p = sdpa_flash.explain(q, k, v, dropout_p=0.5)
    assert not caught
    assert out.shape == q.shape
    assert p.backend == "math" and p.fallback


def test_custom_list_falls_back_to_math() -> None:
    q, k, v = qkv(sq=17, d=8)
    p = sdpa_flash.explain(q, k, v, dropout_p=0.5, policy=["flash", "math"])
    assert p.backend == "math" and p.fallback
    assert p.order == ("flash", "math")
    assert p.reasons["flash"] == ("dropout_p > 0 is not supported",)
    assert "[fallback]" in str(p)
    assert not sdpa_flash.explain(q, k, v, policy=["flash", "math"]).fallback
    assert sdpa_flash.explain(q, k, v, dropout_p=0.5, policy=["math", "flash"]).fallback is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with use_policy(["flash", "math"]):
            out = sdpa_flash.attention(q, k, v, dropout_p=0.5)
    assert out.shape == q.shape
    assert len(_fell_back(caught)) == 1


def test_custom_list_as_call_argument() -> None:
    q, k, v = qkv(sq=17, d=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sdpa_flash.attention(q, k, v, dropout_p=0.5, policy=["flash", "math"])
    assert out.shape == q.shape


def test_strict_fused_policy_raises_with_reasons() -> None:
    q, k, v = qkv()
    for call in (sdpa_flash.attention, sdpa_flash.explain):
        with pytest.raises(BackendUnavailableError) as info:
            call(q, k, v, dropout_p=0.5, policy="fused")
        msg = str(info.value)
        assert "No backend allowed by policy fused" in msg
        assert "`flash` is not supported because:" in msg and "dropout_p > 0 is not supported" in msg
        assert info.value.reasons == {"flash": ("dropout_p > 0 is not supported",)}
        assert "dropout" in info.value.inputs
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, sdpa_flash.SdpaFlashError)


def test_use_policy_blocks_reuse_the_call_cache() -> None:
    cache = sys.modules["sdpa_flash._dense"]._cache  # the per-call cache lives in the dense call
    q, k, v = qkv(sq=18, d=8)
    with use_policy("math"):
        sdpa_flash.attention(q, k, v)
    size = len(cache)
    for _ in range(20):  # e.g. one block per training step
        with use_policy("math"):
            sdpa_flash.attention(q, k, v)
    assert len(cache) == size


# ------------------------------------------------------------------------------------- require(): startup check
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA GPU is visible")
@pytest.mark.parametrize("policy", ["flash", "fused", "auto", "math"])
def test_require_without_a_device_means_the_gpu(policy: str) -> None:
    # A startup check fails a job that landed on the wrong machine: device=None is the current CUDA GPU, even
    # though PyTorch's CPU flash kernel could run the call on the CPU.
    with pytest.raises(BackendUnavailableError) as info:
        sdpa_flash.require(policy)
    msg = str(info.value)
    assert msg.startswith(f"Expected a CUDA GPU for policy {policy} (device=None means the current CUDA GPU), but "
                          "no CUDA GPU is visible to this PyTorch (")
    assert msg.endswith("instead. To check the CPU, pass device='cpu' (on the command line: --device cpu).")


def test_require_on_the_cpu_when_named() -> None:
    # PyTorch's CPU flash kernel is fused (O(N) memory): "fused" is met on the CPU when the CPU is asked for.
    assert sdpa_flash.require("fused", "cpu").backend == "flash"
    assert sdpa_flash.require("flash", "cpu").backend == "flash"
    assert sdpa_flash.require("flash", "cpu", seqlen=16).backend == "flash"


@pytest.mark.parametrize(("dtype", "short", "enough"), [(torch.float32, 15, 16), (torch.float64, 7, 8)])
def test_require_checks_the_call_shape_it_is_given(dtype: torch.dtype, short: int, enough: int) -> None:
    # On the CPU under "flash", calls with fewer keys than one SIMD vector are denylisted (pytorch/pytorch#141128,
    # rerouted to math under "auto"): require() with that seqlen says so, the default 1024-token probe does not.
    with pytest.raises(BackendUnavailableError, match=r"denylisted: .*\[pytorch/pytorch#141128\]"):
        sdpa_flash.require("flash", "cpu", seqlen=short, dtype=dtype)
    assert sdpa_flash.require("flash", "cpu", seqlen=enough, dtype=dtype).backend == "flash"
    assert sdpa_flash.require("auto", "cpu", seqlen=short, dtype=dtype).backend == "math"


# ------------------------------------------------------------------------------------- str(plan), reasons' words
def test_str_of_a_plan_is_a_short_head_and_one_reason_a_line() -> None:
    q = torch.randn(1, 2, 32, 16)
    text = str(sdpa_flash.explain(q, q, q, policy="fused"))
    assert text.splitlines() == [
        "flash via direct aten op",
        "  fa4: not available on device type 'cpu' (has kernels for: cuda)",
        "  cudnn: not available on device type 'cpu' (has kernels for: cuda)",
        "  efficient: not available on device type 'cpu' (has kernels for: cuda)",
        "  flex: not available on device type 'cpu' (has kernels for: cuda)",
        "  math: not a fused kernel (O(N^2) memory), and policy fused allows only fused kernels",
        "  chunked: not a fused kernel (O(N) memory), and policy fused allows only fused kernels",
    ]


def test_chunked_route_is_not_called_an_aten_op() -> None:
    q = torch.randn(1, 2, 32, 16)
    p = sdpa_flash.explain(q, q, q, policy="chunked")
    assert str(p).splitlines()[0] == "chunked via pure-PyTorch tiles"
    assert "route:   direct - the tiled online softmax runs as ordinary PyTorch ops in this process" in p.explain()
    assert "aten" not in str(p)
    # a backend outside a single-backend policy that could run is "not allowed"; one that cannot says why
    assert p.reasons["flash"] == ("not allowed by policy chunked",)
    assert p.reasons["cudnn"] == ("not available on device type 'cpu' (has kernels for: cuda)",)


@pytest.mark.parametrize(("policy", "message"), [
    ("flsh", "but got 'flsh' instead. Did you mean 'flash' for 'flsh'?"),
    ("fusd", "but got 'fusd' instead. Did you mean 'fused' for 'fusd'?"),
    ("cudnn,chunkd", "but got 'cudnn,chunkd' instead. Did you mean 'chunked' for 'chunkd'?"),
    (["math", "efficent"], "but got ['math', 'efficent'] instead. Did you mean 'efficient' for 'efficent'?"),
    ("auto,flash", "but got 'auto,flash' instead. 'auto' is a policy of its own, not a backend: it stands alone, "
                   "not in a list."),
    ("bogus", "but got 'bogus' instead."),
])
def test_misspelt_policies_get_a_suggestion_and_each_name_once(policy: object, message: str) -> None:
    with pytest.raises(AttentionInputError) as info:
        resolve_policy(policy)  # type: ignore[arg-type]
    assert str(info.value) == ("Expected policy to be one of auto, fused, fa4, cudnn, flash, efficient, flex, math, "
                               "chunked, or a comma-separated list of backend names, " + message)
