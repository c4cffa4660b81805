"""The gpt-oss windowed layer, ``attention()`` against FA4 on the same views, alone: host time and device time apart.

``variants.py`` found ``attention()``'s fwd+bwd 0.64-0.98x of FA4's ``flash_attn_func`` called directly on the
same (B, S, H, D) views, from run to run, while the layer passes FA4 the same arguments. This script times the two
paths with nothing else in the process (``variants.py`` interleaves them with eager's 64 GiB scores), three ways:

* host: 50 calls without synchronising, per call (what the CPU spends);
* wall: the same 50 calls and a synchronise, per call;
* device: 50 calls queued behind a long sleep kernel, so that the host's time is hidden (CUDA events, per call);

in rounds, then a ``torch.profiler`` table of each path's kernels and host ops.

    PYTHONPATH=. python benchmarks/layer_profile.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import sdpa_flash
from sdpa_flash.backends import fa4 as fa4_backend

B, H, HKV, S, D, LEFT = 1, 64, 8, 8192, 64, 127  # gpt-oss: window 128 with sinks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, HKV, S, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    sinks = torch.randn(H, device=dev, dtype=torch.float32, generator=g)
    gout = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    fa4 = fa4_backend.load().flash_attn_func
    ours_in = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    views = [t.transpose(1, 2).clone().requires_grad_() for t in (q, k, v)]  # (B, S, H, D) views, strides kept
    direct_in = [*views, sinks.clone().requires_grad_()]

    def ours() -> object:
        out = sdpa_flash.attention(*ours_in[:3], causal=True, window=(LEFT, 0), sinks=ours_in[3])
        return torch.autograd.grad(out, ours_in, gout)

    def direct() -> object:
        out = fa4(*direct_in[:3], causal=True, window_size=(LEFT, 0), softcap=0.0, learnable_sink=direct_in[3])[0]
        return torch.autograd.grad(out, direct_in, gout.transpose(1, 2))

    paths: dict[str, Callable[[], object]] = {"attention()": ours, "fa4 direct (views)": direct}
    for f in paths.values():
        for _ in range(5):
            f()
    torch.cuda.synchronize()
    times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in paths}
    for _ in range(args.rounds):
        for name, f in paths.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                f()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            torch.cuda._sleep(200_000_000)  # the device busy while the calls are queued
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.calls):
                f()
            end.record()
            torch.cuda.synchronize()
            n = args.calls
            times[name].append(((t1 - t0) / n * 1e3, (t2 - t0) / n * 1e3, start.elapsed_time(end) / n))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, FA4 {fa4_backend.installed_version()}")
    for name, rows in times.items():
        host, wall, device = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{name:20s} host {host:.3f} ms/call, wall {wall:.3f}, device {device:.3f} (medians of "
              f"{args.rounds} rounds; device {min(r[2] for r in rows):.3f}-{max(r[2] for r in rows):.3f})")
    for name, f in paths.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                f()
            torch.cuda.synchronize()
        print(f"===== {name}: 20 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
