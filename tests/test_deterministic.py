"""``torch.use_deterministic_algorithms(True)``: a call that needs a backward gets a backend whose backward is
deterministic (``Requirements.deterministic_backward``), with the reason for the others in ``plan()``; with
``warn_only=True`` the others may run, with a warning. The mode is part of ``attention()``'s per-call cache key,
so changing it takes effect on the next call."""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch

import sdpa_flash
from sdpa_flash import AttentionSpec, BackendUnavailableError, Capabilities
from sdpa_flash.backends import BACKENDS
from sdpa_flash.planner import deterministic_mode, plan
from sdpa_flash.policy import resolve_policy
from sdpa_flash.testing import ran_backends, reference_attention

REASON = "backward is not deterministic; torch.use_deterministic_algorithms(True) is set"
SM90 = Capabilities.synthetic("cuda", (9, 0))
_attention_module = sys.modules["sdpa_flash._dense"]  # the per-call cache lives in the dense call


@pytest.fixture
def deterministic() -> Iterator[None]:
    """Restore torch's deterministic-algorithms setting after the test."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def spec(needs_grad: bool = True) -> AttentionSpec:
    return AttentionSpec("cuda", torch.bfloat16, 2, 16, 16, 1024, 1024, 128, 128, "top_left", needs_grad=needs_grad)


def test_every_backend_states_its_backward_determinism() -> None:
    table = {(name, dev): req.deterministic_backward for name, b in BACKENDS.items()
             for dev, req in b.REQUIREMENTS.items()}
    assert None not in table.values()
    assert table[("cudnn", "cuda")] is False
    assert table[("flex", "cuda")] is False  # not documented as deterministic: skipped under the mode, not trusted
    assert all(v for (name, _), v in table.items() if name not in ("cudnn", "flex"))


def test_plan_skips_cudnn_when_set_and_a_backward_is_needed() -> None:
    auto = resolve_policy("auto")
    assert plan(spec(), SM90, auto, deterministic="off").backend == "cudnn"
    p = plan(spec(), SM90, auto, deterministic="error")
    assert (p.backend, p.deterministic, p.fallback) == ("flash", "error", False)
    assert p.reasons["cudnn"] == (REASON,)
    assert "cudnn: backward is not deterministic" in str(p)
    # forward-only calls are not affected: only the backward is non-deterministic
    p = plan(spec(needs_grad=False), SM90, auto, deterministic="error")
    assert (p.backend, p.deterministic) == ("cudnn", "off")


def test_warn_only_keeps_the_backend_and_says_so() -> None:
    p = plan(spec(), SM90, resolve_policy("auto"), deterministic="warn")
    assert (p.backend, p.deterministic) == ("cudnn", "warn")
    assert any("warn_only=True" in n and "runs anyway" in n for n in p.notes)


def test_strict_and_custom_policies() -> None:
    with pytest.raises(BackendUnavailableError, match=r"`cudnn` is not supported because:\n\s+- " + re.escape(REASON)):
        plan(spec(), SM90, resolve_policy("cudnn"), deterministic="error")
    p = plan(spec(), SM90, resolve_policy(["cudnn", "efficient"]), deterministic="error")
    assert p.backend == "efficient" and p.fallback
    assert plan(spec(), SM90, resolve_policy("fused"), deterministic="error").backend == "flash"


@pytest.mark.usefixtures("deterministic")
def test_plan_reads_torchs_setting_by_default() -> None:
    torch.use_deterministic_algorithms(False)
    assert deterministic_mode() == "off" and plan(spec(), SM90).backend == "cudnn"
    torch.use_deterministic_algorithms(True)
    assert deterministic_mode() == "error" and plan(spec(), SM90).backend == "flash"
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert deterministic_mode() == "warn" and plan(spec(), SM90).backend == "cudnn"


@pytest.fixture
def nondeterministic_cpu_flash(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend the CPU flash kernel's backward were not deterministic, to see attention() follow the setting on
    a machine without cuDNN."""
    flash = BACKENDS["flash"]
    reqs = {**flash.REQUIREMENTS, "cpu": dataclasses.replace(flash.REQUIREMENTS["cpu"], deterministic_backward=False)}
    monkeypatch.setattr(type(flash), "REQUIREMENTS", reqs)
    sdpa_flash.planner._invalidate()
    yield
    monkeypatch.undo()
    sdpa_flash.planner._invalidate()


@pytest.mark.usefixtures("deterministic", "nondeterministic_cpu_flash")
def test_attention_follows_the_setting_from_one_call_to_the_next() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    ref = reference_attention(q, k, v, causal=True)

    def call() -> torch.Tensor:
        return sdpa_flash.attention(q, k, v, causal=True, policy=resolve_policy("auto", fallback="silent"))

    for _ in range(2):  # each state twice: the second call is the cached one
        torch.use_deterministic_algorithms(False)
        assert ran_backends(call) == {"flash"}
        assert ran_backends(call) == {"flash"}
        torch.use_deterministic_algorithms(True)
        assert ran_backends(call) == {"math"}
        assert ran_backends(call) == {"math"}
        torch.testing.assert_close(call(), ref)
        with torch.no_grad():  # no backward needed: the setting does not matter
            assert ran_backends(call) == {"flash"}
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="flash backend's backward is not deterministic, and "
                                             r"torch\.use_deterministic_algorithms\(True, warn_only=True\)"):
            assert ran_backends(call) == {"flash"}
        _attention_module._cache.clear()  # so that the warning (issued when a plan is built) comes again
    torch.use_deterministic_algorithms(True)
    p = sdpa_flash.explain(q, k, v, causal=True)
    assert p.backend == "math" and p.reasons["flash"] == (REASON,)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("backend", ["flash", "math", "chunked"])
def test_cpu_backwards_are_bitwise_reproducible(backend: str) -> None:
    """What the data claims for the CPU: the same gradients, bit for bit, run to run at a given thread count (torch's
    own contract for this mode). Across thread counts math and chunked agree too; the CPU flash kernel does not: on a
    16-core host its gradients with 16 threads differ in the last bits from those with 1 (its per-thread partial
    sums are combined in an order set by the thread count)."""
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 8, 200, 32, generator=g), torch.randn(2, 2, 300, 32, generator=g),
            torch.randn(2, 2, 300, 32, generator=g)]
    grad_out = torch.randn(2, 8, 200, 32, generator=g)
    threads = torch.get_num_threads()

    def grads(n_threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(n_threads)
        leaves = [t.clone().requires_grad_() for t in base]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no determinism warning from PyTorch or sdpa_flash
            out = sdpa_flash.attention(*leaves, causal=True, policy=backend)
        return list(torch.autograd.grad(out, leaves, grad_out))

    try:
        first = grads(threads)
        for n in (threads, 1, 2):
            ref = grads(n)
            assert all(torch.equal(a, b) for a, b in zip(ref, grads(n), strict=True)), n
            if backend != "flash":
                assert all(torch.equal(a, b) for a, b in zip(first, ref, strict=True)), n
    finally:
        torch.set_num_threads(threads)
