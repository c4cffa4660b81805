"""Telemetry, and policies under concurrency: threads never see each other's policy, every call runs the
backend its own policy chose, and the counts add up."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdpa_flash
from sdpa_flash.testing import reference_attention

# The math op is composite: a dispatch mode sees what it decomposes into, whose softmax no fused kernel calls.
_KERNEL_OPS = {
    "aten._scaled_dot_product_flash_attention_for_cpu.default": "flash",
    "aten._softmax.default": "math",
    "aten._safe_softmax.default": "math",
}


class RanKernels(TorchDispatchMode):
    """Records which attention kernels ran in this thread (dispatch modes are thread-local; unlike function
    modes they do not change attention()'s route)."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = _KERNEL_OPS.get(str(func))
        if name:
            self.ran.append(name)
        return func(*args, **(kwargs or {}))


def test_counts_per_backend_and_plan() -> None:
    sdpa_flash.reset_stats()
    q = torch.randn(1, 2, 16, 8)
    for _ in range(5):
        sdpa_flash.attention(q, q, q)
    for _ in range(3):
        sdpa_flash.attention(q, q, q, policy="math")
    s = sdpa_flash.stats()
    assert s.calls == {"flash": 5, "math": 3} and s.total == 8
    assert sum(s.plans.values()) == 8
    assert "flash" in str(s)
    sdpa_flash.reset_stats()
    assert sdpa_flash.stats().total == 0


def test_fallbacks_are_counted_per_call_site_even_when_silent() -> None:
    sdpa_flash.reset_stats()
    q = torch.randn(1, 2, 16, 8)
    with sdpa_flash.use_policy("auto", fallback="silent"), warnings.catch_warnings():
        warnings.simplefilter("error")  # silent means no warning
        for _ in range(4):
            sdpa_flash.attention(q, q, q, dropout_p=0.2)  # CPU flash has no dropout: math
        sdpa_flash.attention(q, q, q, dropout_p=0.2)
    falls = sdpa_flash.stats().fallbacks
    assert sorted(f.count for f in falls) == [1, 4]
    assert all(f.backend == "math" and "dropout_p > 0 is not supported" in f.reason for f in falls)
    assert all(f.filename == __file__ for f in falls)
    sdpa_flash.reset_stats()


def test_sixteen_threads_mixed_policies_each_run_their_own_backend() -> None:
    policies = ["auto", "math", "flash", ["math", "flash"]]
    expected = {"auto": "flash", "math": "math", "flash": "flash"}
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64) for _ in range(3))
    ref = reference_attention(q, k, v, causal=True)
    calls_per_thread = 625  # 10,000 calls in all
    barrier = threading.Barrier(16)
    errors: list[str] = []
    sdpa_flash.reset_stats()

    def worker(i: int) -> None:
        pol = policies[i % len(policies)]
        want = expected.get(pol, "math") if isinstance(pol, str) else "math"
        recorder = RanKernels()
        try:
            barrier.wait()
            with sdpa_flash.use_policy(pol), recorder:
                for _ in range(calls_per_thread):
                    out = sdpa_flash.attention(q, k, v, causal=True)
                    if not torch.allclose(out, ref, rtol=0, atol=1e-12):
                        errors.append(f"thread {i}: wrong result under {pol}")
                        return
                    if sdpa_flash.get_policy() != sdpa_flash.policy.resolve_policy(pol):
                        errors.append(f"thread {i}: saw another thread's policy")
                        return
            if set(recorder.ran) != {want} or len(recorder.ran) != calls_per_thread:
                errors.append(f"thread {i}: policy {pol} ran {set(recorder.ran)} x{len(recorder.ran)}, want {want}")
        except Exception as exc:  # surfaced below
            errors.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    s = sdpa_flash.stats()
    assert s.total == 16 * calls_per_thread
    assert s.calls == {"flash": 8 * calls_per_thread, "math": 8 * calls_per_thread}
    sdpa_flash.reset_stats()


@pytest.mark.parametrize("n", [200])
def test_asyncio_tasks_keep_their_policies(n: int) -> None:
    import asyncio

    q = torch.randn(1, 1, 8, 8, dtype=torch.float64)

    async def task(pol: str, want: str) -> None:
        with sdpa_flash.use_policy(pol):
            for _ in range(n):
                await asyncio.sleep(0)
                assert sdpa_flash.explain(q, q, q).backend == want

    async def main() -> None:
        await asyncio.gather(task("math", "math"), task("flash", "flash"), task("auto", "flash"))

    asyncio.run(main())
