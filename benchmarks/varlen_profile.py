# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Where the time of a packed FA4 call goes: ``varlen_attention_packed`` against FA4's ``flash_attn_varlen_func``.

Issue #26 found ``varlen_attention`` at 0.82–0.96× of FA4's varlen function called directly on the same packed
tensors, on a path that makes one FA4 call. This script looks rather than guesses, on BASELINE's lognormal batch
(64 sequences, 16 heads, hd128, bf16), causal and not, forward and forward+backward:

1. host time per call: the Python time to issue N calls back to back (no synchronisation inside), per path;
2. the GPU kernels each path launches (torch.profiler, CUDA activity): names, counts and device time;
3. the host operators on our path (profiler, CPU self time), the top ones.

    PYTHONPATH=. python benchmarks/varlen_profile.py --out $OUT/varlen_profile.txt [--trace-dir $OUT]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from sdpa_flash import varlen
from sdpa_flash.backends import fa4 as fa4_backend
from sdpa_flash.bench._varlen import varlen_cases


def host_us(fn: Callable[[], Any], n: int = 50, reps: int = 5) -> tuple[float, float]:
    """Median and spread (max - min) of the host time to issue one call, over ``reps`` bursts of ``n``."""
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples), max(samples) - min(samples)


def gpu_ms(fn: Callable[[], Any], n: int = 20, reps: int = 7) -> float:
    ms = []
    for _ in range(reps):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for _ in range(n):
            fn()
        z.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(z) / n)
    return statistics.median(ms)


def kernels(fn: Callable[[], Any], out: io.StringIO, label: str, trace: str | None) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    out.write(f"\n---- {label}: by device time (10 calls)\n")
    out.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=90))
    out.write(f"\n---- {label}: by host self time\n")
    out.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=90))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="varlen_profile.txt")
    ap.add_argument("--trace-dir", default=None)
    args = ap.parse_args()
    out = io.StringIO()
    dev = torch.device("cuda")
    fa4 = fa4_backend.load()
    case = next(c for c in varlen_cases("cuda") if c.name == "lognormal")
    lens = list(case.lengths)
    total, h, d = sum(lens), 16, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    mx = max(lens)
    head = f"{torch.cuda.get_device_name()} torch {torch.__version__} fa4 {fa4_backend.installed_version()}"
    print(head, flush=True)
    out.write(head + "\n")
    for causal in (False, True):
        def ours(qq: torch.Tensor = q, kk: torch.Tensor = k, vv: torch.Tensor = v) -> torch.Tensor:
            return varlen.varlen_attention_packed(qq, kk, vv, cu, cu, mx, mx, causal=causal, seqlens_q=lens,
                                                  seqlens_k=lens)

        def direct(qq: torch.Tensor = q, kk: torch.Tensor = k, vv: torch.Tensor = v) -> torch.Tensor:
            return fa4.flash_attn_varlen_func(qq, kk, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                                              max_seqlen_k=mx, causal=causal)[0]

        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        gout = torch.randn_like(q)

        def train(fn: Callable[..., torch.Tensor]) -> Callable[[], Any]:
            return lambda: torch.autograd.grad(fn(*leaves), leaves, gout)

        paths = {"ours": ours, "direct": direct}
        with torch.no_grad():
            for f in paths.values():
                f()
        for f in paths.values():
            train(f)()
        for mode in ("fwd", "fwdbwd"):
            label = f"causal={causal} {mode}"
            rows = {}
            for _ in range(3):  # interleaved rounds
                for name, f in paths.items():
                    call = train(f) if mode == "fwdbwd" else f
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        rows.setdefault(name, []).append((host_us(call), gpu_ms(call)))
            for name, rs in rows.items():
                hs = [r[0][0] for r in rs]
                gs = [r[1] for r in rs]
                line = (f"{label:20s} {name:7s} host {statistics.median(hs):8.1f} us/call [{min(hs):.1f}-{max(hs):.1f}]"
                        f"  back-to-back {statistics.median(gs):7.3f} ms/call [{min(gs):.3f}-{max(gs):.3f}]")
                print(line, flush=True)
                out.write(line + "\n")
            for name, f in paths.items():
                call = train(f) if mode == "fwdbwd" else f
                trace = f"{args.trace_dir}/trace_{name}_{'causal' if causal else 'full'}_{mode}.json" \
                    if args.trace_dir and causal else None
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    kernels(call, out, f"{label} {name}", trace)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
