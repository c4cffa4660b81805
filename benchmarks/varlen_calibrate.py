# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Calibration (GPU) of the varlen engine's cost model: device time of one dense cuDNN call per (b, L) and of the
flash varlen kernel per L, from the profiler (kernel time alone), and the engine's host time per call.

    python benchmarks/varlen_calibrate.py --json calib.json

bf16, 16 heads, hd128 (the BASELINE shapes); the dense calls are made as the engine makes them, through
``attention(..., layout="bshd")`` on (b, L, H, D) tensors. What it showed on the H200 (2026-12-04): the grouped
path's device time alone would reach 0.84-1.03x dense cuDNN on the non-causal BASELINE batches, but each group
costs tens of microseconds of host time (more in the backward), so batches of many short sequences are
host-bound. ``COST_MODELS`` is not fitted to these tables yet: its figures are still the parametric ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from varlen_probe import device_ms  # this folder: the scripts run as `python benchmarks/...`

from sdpa_flash import _varlen as E
from sdpa_flash import attention, varlen
from sdpa_flash.backends import BACKENDS

H, D = 16, 128
dev = "cuda"
LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCHES = (1, 4, 16)


def device_us(fn, n: int = 3) -> float:
    return device_ms(fn, n) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict[str, object] = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                              "date": time.strftime("%Y-%m-%d"), "dense": [], "varlen": [], "host": {}}
    g = torch.Generator(device=dev).manual_seed(0)
    for causal in (False, True):
        for L in LENGTHS:
            for b in BATCHES:
                if b * L > 65536:
                    continue
                q, k, v, go = (torch.randn(b, L, H, D, device=dev, dtype=torch.bfloat16, generator=g)
                               for _ in range(4))
                with torch.no_grad():
                    f = device_us(lambda: attention(q, k, v, causal=causal, layout="bshd"))
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                fb = device_us(lambda: torch.autograd.grad(attention(*leaves, causal=causal, layout="bshd"),
                                                           leaves, go))
                out["dense"].append({"causal": causal, "L": L, "b": b, "fwd_us": f, "fwdbwd_us": fb})
                print(f"dense causal={int(causal)} L={L:5d} b={b:3d} fwd {f:9.1f} us fwdbwd {fb:9.1f} us", flush=True)
            n = max(1, 32768 // L)
            qs, ks, vs, gs = (torch.randn(n * L, H, D, device=dev, dtype=torch.bfloat16, generator=g)
                              for _ in range(4))
            cu = torch.arange(0, (n + 1) * L, L, device=dev, dtype=torch.int32)
            packed = BACKENDS["flash"].varlen()  # the flash backend's packed (cu_seqlens) kernel
            with torch.no_grad():
                f = device_us(lambda: packed(qs, ks, vs, cu, cu, L, L, 0.0, causal, None))
            from torch.nn.attention.varlen import varlen_attn

            lv = [t.clone().requires_grad_() for t in (qs, ks, vs)]
            win = (-1, 0) if causal else (-1, -1)
            fb = device_us(lambda: torch.autograd.grad(varlen_attn(*lv, cu, cu, L, L, window_size=win), lv, gs))
            out["varlen"].append({"causal": causal, "L": L, "n": n, "fwd_us": f, "fwdbwd_us": fb})
            print(f"varlen causal={int(causal)} L={L:5d} n={n:4d} fwd {f:9.1f} us fwdbwd {fb:9.1f} us", flush=True)
    # host time per call of the engine: 64 tiny sequences (device work negligible), one dense group each, then
    # all in one flash varlen call
    base = E.COST_MODELS["cuda"]
    xs = [torch.randn(8, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(64)]
    bq = varlen.pack(xs)
    leaves = [varlen.VarlenBatch(bq.values.clone().requires_grad_(), bq.cu_seqlens, bq.max_seqlen, bq.seqlens)
              for _ in range(3)]
    gout = torch.randn_like(bq.values)
    models = {"dense group call": (dataclasses.replace(base, max_group_span=1, varlen_call_us=1e12,
                                                       varlen_call_us_bwd=1e12), 64),
              "flash varlen call": (dataclasses.replace(base, varlen_call_us=0, varlen_call_us_bwd=0,
                                                        varlen_rate=1e9, varlen_rate_bwd=1e9), 1)}
    try:
        for name, (model, calls) in models.items():
            E.COST_MODELS["cuda"] = model
            E.clear_caches()
            for mode in ("fwd", "fwdbwd"):
                def call():
                    if mode == "fwd":
                        with torch.no_grad():
                            return varlen.varlen_attention(bq, bq, bq)
                    o = varlen.varlen_attention(*leaves)
                    return torch.autograd.grad(o.values, [x.values for x in leaves], gout)

                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
                per = (time.perf_counter() - t) / 20 / calls * 1e6
                out["host"][f"{name} {mode}"] = per
                print(f"host per {name} {mode}: {per:.1f} us", flush=True)
    finally:
        E.COST_MODELS["cuda"] = base
        E.clear_caches()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
