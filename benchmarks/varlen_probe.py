# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Calibration (GPU): the varlen engine's candidate paths forced one at a time, side by side, against dense cuDNN.

Batches: 64 lognormal lengths (seed 0, mu 6.5, sigma 0.9, clamp 16..8192) and 64 uniform in 1..4096; hd128, 16 heads,
bf16, non-causal and causal. Useful TFLOP/s = sum 4*H*L^2*D (halved causal; x3.5 for fwd+bwd). Each engine
configuration is checked against torch's flash varlen kernel before it is timed. A row pads the batch to its
longest sequence with a boolean key mask (what a model does without varlen). Last come cuDNN's ragged (THD)
layout rows (``aten._cudnn_attention_forward`` with ``cu_seqlens``, not an engine path): wall clock, device time
alone, and its gradients' error.

    python benchmarks/varlen_probe.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from triton.testing import do_bench

from sdpa_flash import _varlen as E
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


def padded_rows(kind, causal, lens, q, k, v, gout, useful, rec, rep) -> None:
    """What a model does without varlen: pad every sequence to the longest and pass a boolean key mask to SDPA
    (its default backend choice), timed on the same batch; useful TFLOP/s counts only the real tokens' work."""
    n, s = len(lens), max(lens)
    b_idx = torch.repeat_interleave(torch.arange(n, device=dev), torch.tensor(lens, device=dev))
    s_idx = torch.cat([torch.arange(length, device=dev) for length in lens])
    keep = torch.zeros(n, s, dtype=torch.bool, device=dev)
    keep[b_idx, s_idx] = True
    mask = keep[:, None, None, :]
    if causal:
        mask = mask & torch.ones(s, s, dtype=torch.bool, device=dev).tril()
    pads = []
    for t in (q, k, v, gout):
        x = t.new_zeros(n, s, H, D)
        x[b_idx, s_idx] = t
        pads.append(x.transpose(1, 2))
    pq, pk, pv, pg = pads
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        ms = do_bench(lambda: sdpa(pq, pk, pv, attn_mask=mask), rep=rep, return_mode="median")
    rec(kind, causal, "fwd", f"padded {n}x{s} + boolean key mask", ms, useful)
    leaves = [t.clone().requires_grad_() for t in (pq, pk, pv)]
    ms = do_bench(lambda: torch.autograd.grad(sdpa(*leaves, attn_mask=mask), leaves, pg), rep=rep,
                  return_mode="median")
    rec(kind, causal, "fwdbwd", f"padded {n}x{s} + boolean key mask", ms, useful * 3.5)


def device_ms(fn, n: int = 5) -> float:
    """Device time of ``fn`` per call (sum of its kernels' times, from the profiler): host time excluded."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.device_time for e in prof.events() if e.device_type == cuda) / n / 1e3


def ragged_rows(kind, causal, q, k, v, gout, cu, mx, ref, leaves, useful, rec, rep) -> None:
    """cuDNN's ragged (THD) layout through ``aten._cudnn_attention_forward`` with ``cu_seqlens``: one call for
    the whole batch. Not an engine path (see the engine's docstring): timed here wall-clock and device-only, with
    its output and gradients checked against torch's flash varlen kernel."""
    if not hasattr(aten, "_cudnn_attention_forward"):
        print(kind, causal, "cudnn ragged: aten._cudnn_attention_forward is not in this torch", flush=True)
        return

    def fwd(*t, lse=False):
        return aten._cudnn_attention_forward(*t, None, cu, cu, mx, mx, lse, 0.0, causal, False)[0]

    try:
        with torch.no_grad():
            err = float((fwd(q, k, v).float() - ref.float()).abs().max())
            t0 = time.perf_counter()
            fwd(q, k, v)
            host_ms = (time.perf_counter() - t0) * 1e3  # a second call: is the cuDNN graph cached?
            ms = do_bench(lambda: fwd(q, k, v), rep=rep, return_mode="median")
            rec(kind, causal, "fwd", "cudnn ragged, wall clock", ms, useful,
                f"maxdiff {err:.3g} vs flash varlen; host {host_ms:.1f} ms per call")
            rec(kind, causal, "fwd", "cudnn ragged, device time only", device_ms(lambda: fwd(q, k, v)), useful,
                "kernel time alone: not reachable while the host cost stands")
        # torch's own autograd formula for the op (its backward runs _cudnn_attention_backward)
        ref_grads = torch.autograd.grad(varlen_attn_ref(leaves, cu, mx, causal), leaves, gout)
        grads = torch.autograd.grad(fwd(*leaves, lse=True), leaves, gout)
        errs = ", ".join(f"{n} {float((a.float() - b.float()).abs().max()):.3g}"
                         for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True))
        ms = do_bench(lambda: torch.autograd.grad(fwd(*leaves, lse=True), leaves, gout), rep=rep,
                      return_mode="median")
        rec(kind, causal, "fwdbwd", "cudnn ragged, wall clock", ms, useful * 3.5, f"grad maxdiff {errs}")
        rec(kind, causal, "fwdbwd", "cudnn ragged, device time only",
            device_ms(lambda: torch.autograd.grad(fwd(*leaves, lse=True), leaves, gout), 3), useful * 3.5,
            f"grad maxdiff {errs}")
    except Exception as exc:
        print(kind, causal, "cudnn ragged FAILED", repr(exc)[:300], flush=True)


def varlen_attn_ref(leaves, cu, mx, causal):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*leaves, cu, cu, mx, mx, window_size=(-1, 0) if causal else (-1, -1))


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
            padded_rows(kind, causal, lens, q, k, v, gout, useful, rec, args.rep)
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
            ragged_rows(kind, causal, q, k, v, gout, cu, mx, ref, leaves, useful, rec, args.rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
