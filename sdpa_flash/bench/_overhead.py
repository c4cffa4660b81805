"""Host overhead per call at a tiny, host-bound shape: raw SDPA, the kernel's own aten op, ``attention()``,
``attention(policy='flash')`` and ``sdpa_kernel`` + SDPA, timed in interleaved rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import attention, explain

__all__ = ["measure_overhead"]

_SDP = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
        "chunked": "MATH"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_us(fn: Callable[[], object], n: int, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n * 1e6


def _direct_op(backend: str, device: torch.device, causal: bool) -> Callable[..., torch.Tensor]:
    """The kernel's own op called from Python with no policy layer: the floor for a direct route."""
    if backend == "cudnn":
        return lambda q, k, v: torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal)[0]
    if backend == "flash" and device.type == "cuda":
        return lambda q, k, v: torch._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[0]
    if backend == "flash":
        return lambda q, k, v: torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[0]
    if backend == "efficient":
        return lambda q, k, v: torch._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, causal)[0]
    return lambda q, k, v: torch._scaled_dot_product_attention_math(q, k, v, None, 0.0, causal)[0]


def measure_overhead(device: torch.device, *, rounds: int = 15, calls: int = 2000, causal: bool = False,
                     threads: int | None = 1) -> dict[str, Any]:
    """Median host microseconds per call of each way of calling, and its ratio to raw SDPA (paired per round).

    CUDA: ``(1, 8, 128, 64)`` bfloat16; CPU: ``(1, 8, 16, 64)`` float32 (as in the shared BASELINE). ``threads``
    sets torch's intra-op threads for the measurement (thread wake-ups add noise larger than what is measured).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        shape, dtype = ((1, 8, 128, 64), torch.bfloat16) if device.type == "cuda" else ((1, 8, 16, 64), torch.float32)
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
        plan = explain(q, k, v, causal=causal)
        forced = getattr(SDPBackend, _SDP[plan.backend])
        direct = _direct_op(plan.backend, device, causal)

        def raw() -> object:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def with_sdpa_kernel() -> object:
            with sdpa_kernel([forced]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        ways: dict[str, Callable[[], object]] = {
            "raw F.sdpa": raw,
            f"direct {plan.backend} aten op (floor)": lambda: direct(q, k, v),
            "sdpa_flash.attention": lambda: attention(q, k, v, causal=causal),
            "attention(policy='flash')": lambda: attention(q, k, v, causal=causal, policy="flash"),
            f"sdpa_kernel([{plan.backend}]) + F.sdpa": with_sdpa_kernel,
        }
        torch.testing.assert_close(attention(q, k, v, causal=causal), raw(), rtol=2e-2, atol=2e-2)
        for fn in ways.values():
            _per_call_us(fn, max(1, calls // 4), device)  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in ways}
        ratios: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for r in range(rounds):
            base = _per_call_us(raw, calls, device)
            for name in names[r % len(names):] + names[: r % len(names)]:
                us = base if ways[name] is raw else _per_call_us(ways[name], calls, device)
                samples[name].append(us)
                ratios[name].append(us / base)
        rows = []
        for name in ways:
            med = statistics.median(samples[name])
            xs = sorted(samples[name])
            q1, q3 = xs[len(xs) // 4], xs[(3 * len(xs)) // 4]
            rows.append({"path": name, "us_per_call": med, "ratio_to_raw": statistics.median(ratios[name]),
                         "spread": (q3 - q1) / med if med else 0.0, "rounds": rounds, "calls_per_sample": calls,
                         "status": "ok"})
        return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "causal": causal,
                "auto_backend": plan.backend, "threads": torch.get_num_threads(), "rows": rows}
    finally:
        torch.set_num_threads(saved_threads)
