"""Host overhead of ``sdpa_flash.attention()`` against raw ``F.scaled_dot_product_attention``, side by side.

Tiny shapes make the call host-bound, so the per-call cost of the policy layer is what is measured. The ways of
calling are timed in interleaved rounds (so drift and noise from a shared machine hit them alike) and the
report gives each one's median microseconds per call and its ratio to raw SDPA.

    python benchmarks/overhead.py                 # CPU: 1x8x16x64 float32
    python benchmarks/overhead.py --device cuda   # GPU: 1x8x128x64 bfloat16 (as in shared BASELINE.md)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sdpa_flash


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn: Callable[[], object], n: int, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n * 1e6


def _direct_op(backend: str, device: str, causal: bool) -> Callable[..., object]:
    """The kernel's own op called from Python with no policy layer: the floor for a direct route."""
    if backend == "cudnn":
        return lambda q, k, v: torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal)[0]
    if backend == "flash" and device == "cuda":
        return lambda q, k, v: torch._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[0]
    if backend == "flash":
        return lambda q, k, v: torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[0]
    if backend == "efficient":
        return lambda q, k, v: torch._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, causal)[0]
    return lambda q, k, v: torch._scaled_dot_product_attention_math(q, k, v, None, 0.0, causal)[0]


def measure(device: str, rounds: int, n: int, causal: bool) -> dict[str, object]:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # intra-op thread wake-ups add noise larger than what is measured here
    if device == "cuda":
        shape, dtype = (1, 8, 128, 64), torch.bfloat16
    else:
        shape, dtype = (1, 8, 16, 64), torch.float32
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    plan = sdpa_flash.explain(q, k, v, causal=causal)
    forced = getattr(SDPBackend, {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                                  "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[plan.backend])

    def raw() -> object:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def ours() -> object:
        return sdpa_flash.attention(q, k, v, causal=causal)

    def ours_flash() -> object:
        return sdpa_flash.attention(q, k, v, causal=causal, policy="flash")

    def with_sdpa_kernel() -> object:
        with sdpa_kernel([forced]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    direct = _direct_op(plan.backend, device, causal)

    def direct_op() -> object:
        return direct(q, k, v)

    ways = {"raw F.sdpa": raw, f"direct {plan.backend} aten op (floor)": direct_op,
            "sdpa_flash.attention": ours, "attention(policy='flash')": ours_flash,
            f"sdpa_kernel([{plan.backend}]) + F.sdpa": with_sdpa_kernel}
    torch.testing.assert_close(ours(), raw(), rtol=2e-2, atol=2e-2)  # same answer before timing
    for fn in ways.values():
        per_call_us(fn, n // 4, device)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in ways}
    ratios: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        base = per_call_us(raw, n, device)
        for name, fn in ways.items():
            us = base if fn is raw else per_call_us(fn, n, device)
            samples[name].append(us)
            ratios[name].append(us / base)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": list(shape),
        "dtype": str(dtype),
        "causal": causal,
        "auto_backend": plan.backend,
        "rows": {name: {"median_us": statistics.median(samples[name]),
                        "median_ratio_to_raw": statistics.median(ratios[name])} for name in ways},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed block")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    res = measure(args.device, args.rounds, args.calls, args.causal)
    print(f"{res['device']}, torch {res['torch']}, shape {res['shape']} {res['dtype']}, causal={res['causal']}, "
          f"auto -> {res['auto_backend']}")
    for name, row in res["rows"].items():  # type: ignore[union-attr]
        print(f"  {name:<34} {row['median_us']:8.2f} us/call   x{row['median_ratio_to_raw']:.3f} of raw")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
