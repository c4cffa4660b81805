"""The grid rows where ``attention()`` trailed the path it runs (issue #26): noise or real, and if real, where.

For each row: three independent interleaved measurements (``benchmarks/fa4.py``'s timing) of ``attention()``
under ``auto``, ``F.scaled_dot_product_attention`` forced to cuDNN (inside ``sdpa_kernel``) and in its default
dispatch, FA4's ``flash_attn_func`` on contiguous (B, S, H, D) copies and on (B, H, S, D) tensors passed as views
(the user's own layout); then the GPU kernels of ``attention()`` against the best path (torch.profiler, 10 calls).

    PYTHONPATH=. python benchmarks/grid_rows.py --out $OUT/grid_rows.json --profile $OUT/grid_rows_profile.txt
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
from _harness import machine_info, timed_pass  # (benchmarks/, on sys.path when a script runs)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import sdpa_flash
from sdpa_flash.backends import fa4 as fa4_backend
from sdpa_flash.bench._timing import Settings, interleave

DEV = torch.device("cuda")
# (B, Hq, Hkv, Sq, Sk, D, causal): the two rows at 0.84 / 0.86 in benchmarks/results/fa4_h200/grid_run2.json,
# then the host-bound ones (S <= 256, decode)
ROWS = [(16, 16, 16, 1024, 1024, 128, True), (4, 16, 16, 4096, 4096, 128, True),
        (8, 16, 16, 128, 128, 128, False), (32, 16, 16, 256, 256, 128, True),
        (8, 32, 8, 1, 4096, 128, False), (64, 32, 8, 1, 1024, 128, False)]


def paths(causal: bool, gqa: bool) -> dict[str, tuple[Any, Any, str]]:
    def sdpa(q, k, v):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    out: dict[str, tuple[Any, Any, str]] = {
        "attention(auto)": (lambda q, k, v: sdpa_flash.attention(q, k, v, causal=causal), None, "bhsd"),
        "sdpa[cudnn]": (sdpa, lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), "bhsd"),
        "sdpa default": (sdpa, None, "bhsd"),
    }
    if fa4_backend.installed_version() is not None:
        fn = fa4_backend.load().flash_attn_func
        out["fa4 direct (bshd)"] = (lambda q, k, v: fn(q, k, v, causal=causal)[0], None, "bshd")
        out["fa4 direct (bhsd views)"] = (
            lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)[0].transpose(
                1, 2), None, "bhsd")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="grid_rows.json")
    ap.add_argument("--profile", default="grid_rows_profile.txt")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    settings = Settings.for_device("cuda", rounds=15, budget_s=0.6, warmup_ms=20.0)
    info = machine_info()
    print(info, flush=True)
    prof_text = io.StringIO()
    results: list[dict[str, Any]] = []
    for b, h, hkv, sq, sk, d, causal in ROWS:
        label = f"hd{d} B{b} H{h}/{hkv} S{sq}x{sk}{' causal' if causal else ''}"
        g = torch.Generator(device="cuda").manual_seed(sq + d)
        base = [torch.randn(b, hh, s, d, device=DEV, dtype=torch.bfloat16, generator=g)
                for hh, s in ((h, sq), (hkv, sk), (hkv, sk))]
        ps = paths(causal, h != hkv)
        for mode in ("fwd", "fwdbwd"):
            leaves = [t.clone().requires_grad_(mode == "fwdbwd") for t in base]
            backend = sdpa_flash.explain(*leaves, causal=causal).backend
            fns = {}
            for rep in range(args.repeats):
                items = []
                for name, (call, ctx, layout) in ps.items():
                    ts = base if layout == "bhsd" else [t.transpose(1, 2).contiguous() for t in base]
                    items.append(timed_pass(name, call, ts, mode, ctx))
                    fns[name] = items[-1].fn
                res = interleave(items, DEV, settings, measure_peak=False)
                ok = {n: r for n, r in res.items() if not isinstance(r, BaseException)}
                best_name = min((n for n in ok if n != "attention(auto)"), key=lambda n: ok[n].median_ms)
                ratio = ok[best_name].median_ms / ok["attention(auto)"].median_ms
                ours = ok["attention(auto)"]
                line = (f"{label:34s} {mode:6s} run {rep}: auto ({backend}) {ours.median_ms * 1e3:8.1f} us"
                        f" ±{100 * ours.spread:.0f}%, best {best_name} "
                        f"{ok[best_name].median_ms * 1e3:8.1f} us ±{100 * ok[best_name].spread:.0f}% -> {ratio:.3f}x   "
                        + "  ".join(f"{n}={r.median_ms * 1e3:.1f}" for n, r in ok.items()))
                print(line, flush=True)
                results.append({"row": label, "mode": mode, "run": rep, "backend": backend, "best": best_name,
                                "ratio": ratio, "us": {n: r.median_ms * 1e3 for n, r in ok.items()},
                                "spread": {n: r.spread for n, r in ok.items()},
                                "errors": {str(n): repr(r)[:200] for n, r in res.items()
                                           if isinstance(r, BaseException)}})
            for name in ("attention(auto)", best_name):  # the kernels behind the last run's two
                ctx = ps[name][1]
                with ctx() if ctx else torch.enable_grad(), profile(
                        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for i in range(10):
                        fns[name](i)
                    torch.cuda.synchronize()
                prof_text.write(f"\n==== {label} {mode} {name}\n")
                prof_text.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10,
                                                          max_name_column_width=80))
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"info": info, "rows": results}, f, indent=1)
        with open(args.profile, "w", encoding="utf-8") as f:
            f.write(prof_text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
