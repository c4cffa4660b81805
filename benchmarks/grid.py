"""The BASELINE grid on a GPU: sdpa_flash.attention() under each policy vs every SDPA backend, side by side.

For each shape (B*S = 16,384 tokens, H*D = 2,048, bf16) it times, in one run: PyTorch's default dispatch,
``attention()`` with the default policy, and ``attention()`` forced to each backend, forward and
forward+backward. TFLOP/s follow the flash-attention convention (forward 4*B*H*S^2*D, halved when causal;
forward+backward 3.5x forward). Every path's output is checked against PyTorch's default before it is timed,
so a fast wrong path cannot win a row. Prints a table and the headline ratios; --json writes every row.

    python benchmarks/grid.py [--json grid.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import sdpa_flash

GRID = [(64, 512, False), (64, 16384, False), (128, 512, False), (128, 4096, False), (128, 16384, False),
        (128, 16384, True), (64, 4096, True), (128, 1024, True)]
PATHS = ["F.sdpa default", "attention auto", "attention cudnn", "attention flash", "attention efficient"]


def bench_ms(fn: Callable[[], object], rep_ms: float = 150.0) -> float:
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=int(rep_ms), return_mode="median"))
    except ImportError:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def run_shape(d: int, s: int, causal: bool) -> list[dict[str, object]]:
    h = 2048 // d
    b = max(1, 16384 // s)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "F.sdpa default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "attention auto": lambda: sdpa_flash.attention(q, k, v, causal=causal),
    }
    for name in ("cudnn", "flash", "efficient"):
        fns[f"attention {name}"] = lambda name=name: sdpa_flash.attention(q, k, v, causal=causal, policy=name)
    with torch.no_grad():
        ref = fns["F.sdpa default"]()
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), ref, rtol=3e-2, atol=3e-2, msg=lambda m, n=name: f"{n}: {m}")
    rows = []
    for name, fn in fns.items():
        with torch.no_grad():
            fwd = bench_ms(fn)

        def fwd_bwd(fn: Callable[[], torch.Tensor] = fn) -> None:
            fn().backward(do)

        both = bench_ms(fwd_bwd)
        q.grad = k.grad = v.grad = None
        rows.append({"d": d, "s": s, "b": b, "h": h, "causal": causal, "path": name,
                     "fwd_ms": fwd, "fwd_tflops": flops / fwd / 1e9,
                     "fwdbwd_ms": both, "fwdbwd_tflops": 3.5 * flops / both / 1e9})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    caps = sdpa_flash.capabilities()
    print(f"{caps.name} {caps.arch}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {caps.cudnn_version},"
          f" auto plan at hd128 bf16: {sdpa_flash.require('auto', dtype=torch.bfloat16).backend}", flush=True)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ a)
    print(f"bf16 matmul {m}^3: {2 * m**3 / mm_ms / 1e9:.0f} TFLOP/s (ceiling for the ratios)", flush=True)
    rows: list[dict[str, object]] = []
    t0 = time.time()
    for d, s, causal in GRID[:3] if args.quick else GRID:
        rows += run_shape(d, s, causal)
        print(f"  done hd{d} S={s} causal={causal} ({time.time() - t0:.0f}s)", flush=True)
    print(f"\n{'shape':<24}" + "".join(f"{p:>22}" for p in PATHS) + "   auto/best  auto/flash")
    summary = []
    for d, s, causal in sorted({(r['d'], r['s'], r['causal']) for r in rows}, key=lambda x: (x[0], x[1], x[2])):
        for mode in ("fwd", "fwdbwd"):
            sel = {r["path"]: r[f"{mode}_tflops"] for r in rows if (r["d"], r["s"], r["causal"]) == (d, s, causal)}
            best = max(v for k_, v in sel.items() if k_.startswith("attention ") and k_ != "attention auto")
            ratio_best, ratio_flash = sel["attention auto"] / best, sel["attention auto"] / sel["attention flash"]
            summary.append({"d": d, "s": s, "causal": causal, "mode": mode, "auto_over_best": ratio_best,
                            "auto_over_flash": ratio_flash,
                            "auto_over_default": sel["attention auto"] / sel["F.sdpa default"]})
            label = f"hd{d} S={s}{' causal' if causal else ''} {mode}"
            print(f"{label:<24}" + "".join(f"{sel[p]:>22.0f}" for p in PATHS)
                  + f"   {ratio_best:9.3f}  {ratio_flash:10.2f}")
    worst = min(summary, key=lambda r: r["auto_over_best"])
    print(f"\nauto / best single backend: min {worst['auto_over_best']:.3f} "
          f"(hd{worst['d']} S={worst['s']} {worst['mode']}), "
          f"median {statistics.median(r['auto_over_best'] for r in summary):.3f}; "
          f"auto / forced FLASH: {min(r['auto_over_flash'] for r in summary):.2f}-"
          f"{max(r['auto_over_flash'] for r in summary):.2f}x; auto / F.sdpa default: "
          f"{statistics.median(r['auto_over_default'] for r in summary):.3f} (median)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": caps.name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "cudnn": caps.cudnn_version, "matmul_tflops": 2 * m**3 / mm_ms / 1e9,
                       "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
