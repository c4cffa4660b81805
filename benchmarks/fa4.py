# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""FlashAttention-4 against what a user would otherwise run, side by side on one GPU (H200), interleaved rounds.

Sections (``--sections``, default all):

* ``grid``: BASELINE's grid (B·S = 16,384 tokens, H·D = 2,048, bf16; hd 64 and 128, S 512-16k, causal and not,
  forward and forward+backward) plus small and decode shapes: ``attention()`` under ``auto``, FA4's
  ``flash_attn_func`` called directly on (B, S, H, D) tensors, ``F.scaled_dot_product_attention`` inside
  ``sdpa_kernel([CUDNN_ATTENTION])`` and ``([FLASH_ATTENTION])``. TFLOP/s (forward 4·B·H·S²·D, halved causal;
  x3.5 with backward), the median of interleaved rounds with the interquartile spread. The rows of the
  ``fa4 / cudnn`` ratio are the data of the shape-class rules in ``sdpa_flash/_ranking.py``.
* ``layout``: FA4 on contiguous (B, S, H, D) against (B, H, S, D) tensors passed as views.
* ``varlen``: BASELINE's ragged batches (64 lognormal / uniform lengths, 16 heads, hd128, bf16), causal and not:
  ``varlen_attention`` (auto), FA4's ``flash_attn_varlen_func`` directly, torch's flash varlen op, and dense
  cuDNN at the same token count (the target); useful TFLOP/s.
* ``cold``: a fresh process per step: the package import, the first forward and backward of a new
  configuration with an empty compile cache, then the same in a new process with the disk cache filled, and
  what ``sdpa_flash.warmup`` reports. Never mixed into TFLOP/s.
* ``overhead``: host time per call at a tiny shape (1, 8, 128, 64): raw ``F.sdpa``, ``attention()`` on cuDNN,
  FA4 directly and ``attention(policy='fa4')``.

    PYTHONPATH=. python benchmarks/fa4.py --out fa4.json [--sections grid,varlen] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from _harness import machine_info, run_sections, timed_pass  # (benchmarks/, on sys.path when a script runs)
from torch.nn.attention import SDPBackend, sdpa_kernel

import sdpa_flash
from sdpa_flash import varlen
from sdpa_flash.backends import fa4 as fa4_backend
from sdpa_flash.bench._timing import Settings, Stats, interleave
from sdpa_flash.bench._varlen import varlen_cases

DEV = torch.device("cuda")
ROWS: list[dict[str, Any]] = []


def record(section: str, case: str, mode: str, path: str, result: Stats | BaseException, flops: float,
           **extra: Any) -> None:
    if isinstance(result, BaseException):
        row = {"section": section, "case": case, "mode": mode, "path": path, "error": repr(result)[:300], **extra}
        print(f"{section:8s} {case:34s} {mode:6s} {path:22s} n/a: {row['error'][:120]}", flush=True)
    else:
        tf = flops / (result.median_ms * 1e-3) / 1e12
        row = {"section": section, "case": case, "mode": mode, "path": path, "ms": result.median_ms,
               "spread": result.spread, "tflops": tf, **extra}
        print(f"{section:8s} {case:34s} {mode:6s} {path:22s} {result.median_ms:9.3f} ms {tf:7.1f} TF/s "
              f"±{100 * result.spread:.0f}%", flush=True)
    ROWS.append(row)


def fa4():  # type: ignore[no-untyped-def]
    return fa4_backend.load()


def dense_paths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> dict[str, Any]:
    """(call(q, k, v) in (B, H, S, D), context) per path; FA4 direct gets its own contiguous (B, S, H, D) copies."""
    gqa = q.shape[1] != k.shape[1]

    def sdpa(q, k, v):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    fn = fa4().flash_attn_func

    def fa4_direct(q, k, v):  # type: ignore[no-untyped-def]
        return fn(q, k, v, causal=causal)[0]

    return {
        "attention(auto)": (lambda q, k, v: sdpa_flash.attention(q, k, v, causal=causal), None, "bhsd"),
        "fa4 direct": (fa4_direct, None, "bshd"),
        "sdpa[cudnn]": (sdpa, lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), "bhsd"),
        "sdpa[flash]": (sdpa, lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]), "bhsd"),
    }


def time_case(section: str, label: str, b: int, h: int, hkv: int, sq: int, sk: int, d: int, causal: bool,
              modes: tuple[str, ...], settings: Settings, paths: dict[str, Any] | None = None) -> None:
    g = torch.Generator(device="cuda").manual_seed(sq + d)
    base = [torch.randn(b, hh, s, d, device=DEV, dtype=torch.bfloat16, generator=g)
            for hh, s in ((h, sq), (hkv, sk), (hkv, sk))]
    flops = 4.0 * b * h * sq * sk * d * (0.5 if causal and sq == sk else 1.0)
    paths = paths or dense_paths(*base, causal)
    for mode in modes:
        items = []
        for name, (call, ctx, layout) in paths.items():
            ts = base if layout == "bhsd" else [t.transpose(1, 2).contiguous() for t in base]
            items.append(timed_pass(name, call, ts, mode, ctx))
        res = interleave(items, DEV, settings, measure_peak=False)
        for name, r in res.items():
            backend = ""
            if name == "attention(auto)":
                leaves = [t.clone().requires_grad_(mode != "fwd") for t in base]
                backend = sdpa_flash.explain(*leaves, causal=causal).backend
            record(section, label, mode, str(name), r, flops * (3.5 if mode == "fwdbwd" else 1.0), backend=backend)


def grid(settings: Settings, quick: bool) -> None:
    shapes = []
    for d in (64, 128):
        for s in ((512, 4096, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)):
            for causal in (False, True):
                shapes.append((16384 // s, 2048 // d, 2048 // d, s, s, d, causal))
    # small, decode and GQA shapes: where FA4's per-call host cost or its kernels for short rows may lose
    shapes += [(8, 16, 16, 128, 128, 128, False), (32, 16, 16, 256, 256, 128, True),
               (8, 32, 8, 1, 4096, 128, False), (64, 32, 8, 1, 1024, 128, False),
               (4, 32, 8, 2048, 2048, 128, True), (2, 8, 8, 4096, 4096, 256, True)]
    for b, h, hkv, sq, sk, d, causal in shapes:
        label = f"hd{d} B{b} H{h}/{hkv} S{sq}x{sk}{' causal' if causal else ''}"
        time_case("grid", label, b, h, hkv, sq, sk, d, causal, ("fwd", "fwdbwd"), settings)


def layout(settings: Settings) -> None:
    b, h, s, d = 4, 16, 4096, 128
    fn = fa4().flash_attn_func
    paths = {
        "fa4 bshd contiguous": (lambda q, k, v: fn(q, k, v, causal=True)[0], None, "bshd"),
        "fa4 bhsd as views": (lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 causal=True)[0], None, "bhsd"),
        "attention bshd": (lambda q, k, v: sdpa_flash.attention(q, k, v, causal=True, layout="bshd", policy="fa4"),
                           None, "bshd"),
        "attention bhsd": (lambda q, k, v: sdpa_flash.attention(q, k, v, causal=True, policy="fa4"), None, "bhsd"),
    }
    time_case("layout", f"hd{d} B{b} H{h} S{s} causal", b, h, h, s, s, d, True, ("fwd", "fwdbwd"), settings,
              paths)
    time_case("layout", f"hd{d} B{b} H32/8 S2048 causal", b, 32, 8, 2048, 2048, d, True, ("fwd", "fwdbwd"),
              settings, paths)


def ragged(settings: Settings) -> None:
    h, d = 16, 128
    fn = fa4().flash_attn_varlen_func
    for case in varlen_cases("cuda"):  # BASELINE's two batches of 64 sequences
        kind, lens = case.name, list(case.lengths)
        total = sum(lens)
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(total, h, d, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        mx = max(lens)
        # dense cuDNN at the same token count: (B, 16, 4096, 128) with B * 4096 >= total
        bd = math.ceil(total / 4096)
        dq_, dk_, dv_ = (torch.randn(bd, h, 4096, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            useful = sum(4.0 * h * n * n * d * (0.5 if causal else 1.0) for n in lens)
            dense_useful = 4.0 * bd * h * 4096 * 4096 * d * (0.5 if causal else 1.0)
            bq, bk, bv = (varlen.from_cu_seqlens(t, cu) for t in (q, k, v))
            plan = varlen.explain_varlen(bq, bk, bv, causal=causal)
            print(f"varlen {kind} causal={causal}: {plan}", flush=True)

            def ours(qq, kk, vv):  # type: ignore[no-untyped-def]
                return varlen.varlen_attention_packed(qq, kk, vv, cu, cu, mx, mx, causal=causal, seqlens_q=lens,
                                                      seqlens_k=lens)

            def direct(qq, kk, vv):  # type: ignore[no-untyped-def]
                return fn(qq, kk, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx,
                          causal=causal)[0]

            def torch_flash(qq, kk, vv):  # type: ignore[no-untyped-def]
                return torch.ops.aten._flash_attention_forward(qq, kk, vv, cu, cu, mx, mx, 0.0, causal, False)[0]

            def dense(qq, kk, vv):  # type: ignore[no-untyped-def]
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)

            paths = {"varlen_attention(auto)": (ours, (q, k, v), useful),
                     "fa4 varlen direct": (direct, (q, k, v), useful),
                     "torch flash varlen op": (torch_flash, (q, k, v), useful),
                     "dense cudnn same tokens": (dense, (dq_, dk_, dv_), dense_useful)}
            for mode in ("fwd", "fwdbwd"):
                items, flops = [], {}
                for name, (call, ts, work) in paths.items():
                    if name == "torch flash varlen op" and mode == "fwdbwd":
                        continue  # the aten op has no autograd formula of its own here
                    flops[name] = work * (3.5 if mode == "fwdbwd" else 1.0)
                    ctx = (lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])) if name.startswith("dense") else None
                    items.append(timed_pass(name, call, ts, mode, ctx))
                res = interleave(items, DEV, settings, measure_peak=False)
                for name, r in res.items():
                    record("varlen", f"{kind}{' causal' if causal else ''}", mode, str(name), r, flops[str(name)],
                           plan=str(plan) if name == "varlen_attention(auto)" else "")


COLD_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch, sdpa_flash
from sdpa_flash.backends import fa4
res = {"import_sdpa_flash_s": time.perf_counter() - t0}
t = time.perf_counter(); fa4.load(); res["import_fa4_s"] = time.perf_counter() - t
q, k, v = (torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
def run():
    torch.cuda.synchronize(); t = time.perf_counter()
    out = sdpa_flash.attention(q, k, v, causal=True, policy="fa4"); torch.cuda.synchronize()
    f = time.perf_counter() - t; t = time.perf_counter()
    out.sum().backward(); torch.cuda.synchronize()
    return f, time.perf_counter() - t
res["first_fwd_s"], res["first_bwd_s"] = run()
res["second_fwd_s"], res["second_bwd_s"] = run()
res["cache"] = {"entries": fa4.cache_info().entries, "dir": fa4.cache_info().directory}
res["warmup"] = str(sdpa_flash.warmup(heads=16, head_dim=64, causal=False))
res["warmup_again"] = str(sdpa_flash.warmup(heads=16, head_dim=64, causal=False))
print("COLD " + json.dumps(res))
"""


def cold() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SDPA_FLASH_FA4_CACHE=tmp)
        env.pop("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", None)
        env.pop("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", None)
        for label in ("empty disk cache", "disk cache filled by the run before"):
            out = subprocess.run([sys.executable, "-c", COLD_SCRIPT], env=env, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("COLD ")), None)
            if line is None:
                print("cold", label, "FAILED", out.stderr[-2000:], flush=True)
                ROWS.append({"section": "cold", "case": label, "error": out.stderr[-2000:]})
                continue
            res = json.loads(line[5:])
            print(f"cold    {label}: {res}", flush=True)
            ROWS.append({"section": "cold", "case": label, **res})


def overhead(settings: Settings) -> None:
    q, k, v = (torch.randn(1, 8, 128, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    fn = fa4().flash_attn_func
    calls = {
        "F.sdpa (default)": lambda: F.scaled_dot_product_attention(q, k, v),
        "attention(cudnn)": lambda: sdpa_flash.attention(q, k, v, policy="cudnn"),
        "fa4 direct": lambda: fn(qs, ks, vs)[0],
        "fa4 direct, bhsd views": lambda: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0],
        "attention(fa4)": lambda: sdpa_flash.attention(q, k, v, policy="fa4"),
        "attention(fa4, bshd)": lambda: sdpa_flash.attention(qs, ks, vs, policy="fa4", layout="bshd"),
    }
    per: dict[str, list[float]] = {n: [] for n in calls}
    with torch.no_grad():
        for c in calls.values():
            for _ in range(50):
                c()
        torch.cuda.synchronize()
        for _ in range(15):
            for name, c in calls.items():
                t = time.perf_counter()
                for _ in range(200):
                    c()
                per[name].append((time.perf_counter() - t) / 200 * 1e6)
                torch.cuda.synchronize()
    base = statistics.median(per["F.sdpa (default)"])
    for name, xs in per.items():
        med = statistics.median(xs)
        print(f"overhead {name:20s} {med:7.2f} us/call host ({med / base:.2f}x F.sdpa)", flush=True)
        ROWS.append({"section": "overhead", "path": name, "us": med, "ratio": med / base, "samples": xs})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fa4.json")
    ap.add_argument("--sections", default="overhead,layout,grid,varlen,cold")
    ap.add_argument("--quick", action="store_true", help="fewer grid shapes and rounds")
    args = ap.parse_args()
    settings = Settings.for_device("cuda", rounds=7 if args.quick else 11, budget_s=0.6, warmup_ms=20.0)
    run_sections({"grid": lambda: grid(settings, args.quick), "layout": lambda: layout(settings),
                  "varlen": lambda: ragged(settings), "cold": cold, "overhead": lambda: overhead(settings)},
                 args.sections, args.out, machine_info(), ROWS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
