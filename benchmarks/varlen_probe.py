# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Calibration (GPU): the varlen engine's candidate paths forced one at a time, side by side, against dense cuDNN.

Batches: 64 lognormal lengths (seed 0, mu 6.5, sigma 0.9, clamp 16..8192) and 64 uniform in 1..4096; hd128, 16 heads,
bf16, non-causal and causal. Useful TFLOP/s = sum 4*H*L^2*D (halved causal; x3.5 for fwd+bwd). Each engine
configuration is checked against torch's flash varlen kernel before it is timed.

    python benchmarks/varlen_probe.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from triton.testing import do_bench

from sdpa_flash import _varlen_engine as E
from sdpa_flash import varlen

aten = torch.ops.aten
dev = "cuda"
H, D = 16, 128


def lengths(kind: str) -> list[int]:
    g = torch.Generator().manual_seed(0)
    if kind == "lognormal":
        return torch.exp(6.5 + 0.9 * torch.randn(64, generator=g)).clamp(16, 8192).long().tolist()
    _ = torch.randn(64, generator=g)
    return torch.randint(1, 4097, (64,), generator=g).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rep", type=int, default=50)
    args = ap.parse_args()
    rows = []
    base = E.COST_MODELS["cuda"]
    big = 1e12

    def rec(batch, causal, mode, name, ms, useful, note=""):
        tf = useful / ms / 1e9
        rows.append({"batch": batch, "causal": causal, "mode": mode, "path": name, "ms": ms, "tflops": tf,
                     "note": note})
        print(f"{batch:9s} causal={int(causal)} {mode:6s} {name:44s} {ms:8.3f} ms {tf:7.1f} TF/s {note}", flush=True)

    rep = dataclasses.replace
    no_varlen = {"varlen_call_us": big, "varlen_call_us_bwd": big}
    configs = {
        "engine default": (base, None),
        "per-seq, no streams": (rep(base, max_group_span=1, streams=0, **no_varlen), None),
        "per-seq, 4 streams": (rep(base, max_group_span=1, streams=4, **no_varlen), None),
        "per-seq contiguous, 4 streams": (rep(base, max_group_span=1, streams=4, contiguous_groups=True,
                                              **no_varlen), None),
        "grouped dp, no streams": (rep(base, streams=0, **no_varlen), None),
        "grouped dp, 4 streams": (rep(base, streams=4, **no_varlen), None),
        "grouped dp contiguous, no streams": (rep(base, streams=0, contiguous_groups=True, **no_varlen), None),
        "grouped dp contiguous, 4 streams": (rep(base, streams=4, contiguous_groups=True, **no_varlen), None),
        "grouped + mask padding, 4 streams": (rep(base, streams=4, padding="mask", **no_varlen), None),
        "flash varlen (engine)": (rep(base, varlen_call_us=0, varlen_call_us_bwd=0, varlen_rate=1e9,
                                      varlen_rate_bwd=1e9), None),
        "hybrid, 4 streams": (rep(base, streams=4, varlen_rate=2000, varlen_rate_bwd=2000), None),
        "hybrid contiguous, 4 streams": (rep(base, streams=4, contiguous_groups=True, varlen_rate=2000,
                                             varlen_rate_bwd=2000), None),
    }
    for kind in ("lognormal", "uniform"):
        lens = lengths(kind)
        tot = sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
        mx = max(lens)
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v, gout = (torch.randn(tot, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        for causal in (False, True):
            div = 2 if causal else 1
            useful = sum(4 * H * L * L * D for L in lens) / div
            s = 4096
            b = max(1, round(tot / s))
            dq = torch.randn(b, H, s, D, device=dev, dtype=torch.bfloat16).requires_grad_()
            dgo = torch.randn_like(dq)
            dense_useful = 4 * b * H * s * s * D / div

            def cud(x):
                return aten._scaled_dot_product_cudnn_attention(x, x, x, None, x.requires_grad, 0.0, causal,
                                                                False)[0]

            with torch.no_grad():
                ms = do_bench(lambda: cud(dq), rep=args.rep, return_mode="median")
            rec(kind, causal, "fwd", f"dense cudnn {b}x{s} (target)", ms, dense_useful)
            ms = do_bench(lambda: torch.autograd.grad(cud(dq), dq, dgo), rep=args.rep, return_mode="median")
            rec(kind, causal, "fwdbwd", f"dense cudnn {b}x{s} (target)", ms, dense_useful * 3.5)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            from torch.nn.attention.varlen import varlen_attn

            win = (-1, 0) if causal else (-1, -1)
            with torch.no_grad():
                ref = varlen_attn(*leaves, cu, cu, mx, mx, window_size=win)
                ms = do_bench(lambda: varlen_attn(*leaves, cu, cu, mx, mx, window_size=win), rep=args.rep,
                              return_mode="median")
            rec(kind, causal, "fwd", "torch varlen_attn", ms, useful)
            ms = do_bench(lambda: torch.autograd.grad(varlen_attn(*leaves, cu, cu, mx, mx, window_size=win), leaves,
                                                      gout), rep=args.rep, return_mode="median")
            rec(kind, causal, "fwdbwd", "torch varlen_attn", ms, useful * 3.5)
            batches = [varlen.VarlenBatch(t, cu, mx, tuple(lens)) for t in leaves]
            for name, (model, pol) in configs.items():
                E.COST_MODELS["cuda"] = model
                E.clear_caches()
                try:
                    with torch.no_grad():
                        plan = varlen.explain_varlen(*batches, causal=causal, policy=pol)
                        out = varlen.varlen_attention(*batches, causal=causal, policy=pol).values
                        err = float((out.float() - ref.float()).abs().max())
                        note = f"[{plan.path}: {len(plan.groups)} groups x{plan.padded_work:.2f}, " \
                               f"{len(plan.varlen_members)} varlen] maxdiff {err:.3g}"
                        ms = do_bench(lambda: varlen.varlen_attention(*batches, causal=causal, policy=pol),
                                      rep=args.rep, return_mode="median")
                    rec(kind, causal, "fwd", name, ms, useful, note)
                    E.clear_caches()
                    plan = varlen.explain_varlen(*batches, causal=causal, policy=pol)  # now with needs_grad
                    note = f"[{plan.path}: {len(plan.groups)} groups x{plan.padded_work:.2f}, " \
                           f"{len(plan.varlen_members)} varlen]"
                    ms = do_bench(lambda: torch.autograd.grad(
                        varlen.varlen_attention(*batches, causal=causal, policy=pol).values, leaves, gout),
                        rep=args.rep, return_mode="median")
                    rec(kind, causal, "fwdbwd", name, ms, useful * 3.5, note)
                except Exception as exc:
                    print(kind, causal, name, "FAILED", repr(exc)[:300], flush=True)
            E.COST_MODELS["cuda"] = base
            E.clear_caches()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
