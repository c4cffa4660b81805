# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""sdpa_flash.compat on a GPU: the flash-attn API's cost over attention(), FlexAttention vs the masked path for the
features SDPA lacks, and KV-cache decode latency — each side by side in one run, bf16, head dim 128.

1. ``flash_attn_func`` vs ``sdpa_flash.attention(layout="bshd")`` on the same inputs (the same kernel runs, so the
   ratio measures the compat layer's cost; goal >= 0.97x), forward and forward+backward.
2. B=1, S=16k, 16 heads: sliding window 4096 (causal), softcap 50 and ALiBi, through the flex path (what
   ``flash_attn_func`` runs) vs the masked path (``attention()`` with the dense boolean mask / float bias; for
   softcap, which no mask expresses, the exact tiled path). Useful TFLOP/s count only the unmasked work. The
   inputs require grad in this section (as in training: one joint compile per case), also for the "fwd" rows.
3. ``flash_attn_with_kvcache`` decode (one new token, appended in place) at cache length 8k for batch 1 and 32,
   vs ``attention()`` over the same keys (no append), in microseconds.

Every candidate's output is checked before it is timed: the last 128 query rows (the ones that see the most keys)
against the float64 reference of flash-attn's documented semantics, with sdpa_flash.testing's tolerance rule; rows
that fail are marked and not reported as wins. Timing interleaves the candidates (sdpa_flash.bench's loop: CUDA
events, warm-up, median of rounds). Prints a table; ``--json PATH`` writes every row. Runs in about 2-3 minutes on an
H200 (most of it FlexAttention's first compiles).

    python benchmarks/compat.py --json compat.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

import sdpa_flash
import sdpa_flash.compat as C
from sdpa_flash.bench._timing import Settings, Stats, Timed, cleanup, interleave
from sdpa_flash.capability import format_cudnn_version
from sdpa_flash.compat._common import features
from sdpa_flash.compat._exact import Geometry
from sdpa_flash.compat._run import feature_mask
from sdpa_flash.compat.testing import compare_flash

DEV = torch.device("cuda")
BF16 = torch.bfloat16
H, D = 16, 128


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEV, dtype=torch.float32).to(BF16)


def check_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int = 128,
               **kw: Any) -> str:
    """PASS/FAIL of the last ``rows`` query rows against the float64 reference (they align with the keys as the
    full problem's last rows do: bottom-right alignment only looks at Sk - Sq)."""
    kw = {**kw, "window_limit": k.shape[1]}
    res = compare_flash([out[:, -rows:]], q[:, -rows:].contiguous(), k, v, **kw)[0]
    return ("PASS" if res.passed else "FAIL") + f" ({res.usage:.2f} of bound)"


def timed(items: list[tuple[str, Callable[[], object]]], settings: Settings) -> dict[str, Stats | BaseException]:
    return interleave([Timed(name, lambda i, f=f: f()) for name, f in items], DEV, settings)  # type: ignore[misc]


def fwd_bwd(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad)

    return run


def ms(stat: Stats | BaseException) -> float | None:
    return stat.median_ms if isinstance(stat, Stats) else None


def row(table: list[dict[str, Any]], **fields: Any) -> None:
    table.append(fields)
    parts = []
    for key, val in fields.items():
        if isinstance(val, float):
            parts.append(f"{key}={val:.4g}")
        elif val is not None:
            parts.append(f"{key}={val}")
    print("  " + "  ".join(parts), flush=True)


# ----------------------------------------------------------------------------------------------------------- 1
def overhead(table: list[dict[str, Any]], settings: Settings, quick: bool) -> None:
    print("1. flash_attn_func vs sdpa_flash.attention() on the same inputs (bf16, hd128, 16 heads)", flush=True)
    shapes = [(4, 4096, False), (4, 4096, True), (1, 16384, True)] if not quick else [(4, 4096, True)]
    for b, s, causal in shapes:
        q, k, v, grad = (rand(b, s, H, D, seed=i) for i in range(4))
        corner = "bottom_right" if causal else False
        a = C.flash_attn_func(q, k, v, causal=causal)
        ref = sdpa_flash.attention(q, k, v, causal=corner, layout="bshd")
        same = bool(torch.equal(a, ref))
        check = check_rows(a, q, k, v, causal=causal)
        flops = 4 * b * H * s * s * D / (2 if causal else 1)
        with torch.no_grad():
            fwd = timed([("compat", lambda: C.flash_attn_func(q, k, v, causal=causal)),
                         ("attention", lambda: sdpa_flash.attention(q, k, v, causal=corner, layout="bshd"))],
                        settings)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        fb = timed([("compat", fwd_bwd(lambda *t: C.flash_attn_func(*t, causal=causal), leaves, grad)),
                    ("attention", fwd_bwd(lambda *t: sdpa_flash.attention(*t, causal=corner, layout="bshd"), leaves,
                                          grad))], settings)
        for mode, res, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fb, 3.5)):
            c_ms, a_ms = ms(res["compat"]), ms(res["attention"])
            row(table, section="overhead", shape=f"B={b} S={s}" + (" causal" if causal else ""), mode=mode,
                compat_ms=c_ms, attention_ms=a_ms, ratio=(a_ms / c_ms) if c_ms and a_ms else None,
                compat_tflops=(mult * flops / c_ms / 1e9) if c_ms else None, same_output=same, check=check,
                path=str(C.explain_flash_attn(C.flash_attn_func, q, k, v, causal=causal).path))
        cleanup(DEV)


# ----------------------------------------------------------------------------------------------------------- 2
def feature_cases(s: int, w: int) -> list[tuple[str, dict[str, Any], float]]:
    full = 4 * H * s * s * D
    window = 4 * H * D * sum(min(i, w) + 1 for i in range(s))
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=DEV, dtype=torch.float32)
    return [(f"window {w} causal", {"causal": True, "window_size": (w, 0)}, window),
            ("softcap 50", {"softcap": 50.0}, full),
            ("alibi", {"alibi_slopes": slopes}, full)]


def masked_candidate(s: int, feats: Any, slopes: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """attention() with flash-attn's window as a dense boolean mask / ALiBi as a dense bf16 bias (the fallback a
    user would write; the bias is rounded to bf16, which the check shows)."""
    mask = feature_mask(Geometry.dense(s, s, DEV), feats, None if slopes is None else slopes[None], BF16)

    def masked(*t: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(*t, attn_mask=mask, layout="bshd")

    return masked


def features_vs_masked(table: list[dict[str, Any]], settings: Settings, quick: bool) -> None:
    s, w = (16384, 4096) if not quick else (4096, 1024)
    print(f"2. features SDPA lacks: flex vs the masked path (B=1, S={s}, bf16, hd128, 16 heads)", flush=True)
    q, k, v, grad = (rand(1, s, H, D, seed=10 + i) for i in range(4))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for name, kw, flops in feature_cases(s, w):
        plan = C.explain_flash_attn(C.flash_attn_func, *leaves, **kw)
        feats = features(kw.get("causal", False), kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0),
                         "heads" if "alibi_slopes" in kw else None, s)
        label = "flex" if plan.path == "flex" else f"flash_attn_func ({plan.path}: flex unavailable)"
        candidates: dict[str, Callable[..., torch.Tensor]] = {label: lambda *t, kw=kw: C.flash_attn_func(*t, **kw)}
        if kw.get("softcap"):  # no mask expresses a softcap: the exact tiled path is the fallback
            def exact(*t: torch.Tensor, kw: dict[str, Any] = kw) -> torch.Tensor:
                with C.use_path("exact"):
                    return C.flash_attn_func(*t, **kw)  # type: ignore[no-any-return]

            candidates["exact"] = exact
        else:
            candidates["masked"] = masked_candidate(s, feats, kw.get("alibi_slopes"))
        # Inputs require grad throughout (as in training), so FlexAttention compiles one joint forward/backward
        # graph per case; the first call below pays for it and checks the output.
        checks, first_s = {}, {}
        for cand, fn in candidates.items():
            t0 = time.perf_counter()
            out = fn(*leaves)
            torch.autograd.grad(out, leaves, grad)
            torch.cuda.synchronize()
            first_s[cand] = time.perf_counter() - t0
            checks[cand] = check_rows(out.detach(), q, k, v, **kw)
        fwd = timed([(n, lambda f=f: f(*leaves)) for n, f in candidates.items()], settings)
        fb = timed([(n, fwd_bwd(f, leaves, grad)) for n, f in candidates.items()], settings)
        for cand in candidates:
            for mode, res, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fb, 3.5)):
                t = ms(res[cand])
                row(table, section="features", case=name, path=cand, mode=mode, ms=t,
                    tflops=(mult * flops / t / 1e9) if t else None, check=checks[cand],
                    error=None if t else repr(res[cand])[:120], first_call_s=first_s[cand] if mode == "fwd" else None,
                    planned=plan.path if cand == label else None)
        candidates.clear()
        cleanup(DEV)


# ----------------------------------------------------------------------------------------------------------- 3
def decode(table: list[dict[str, Any]], settings: Settings, quick: bool) -> None:
    cap, hq, hk = 8192, 32, 8
    print(f"3. flash_attn_with_kvcache decode: cache length {cap}, {hq} query / {hk} kv heads, bf16, hd128",
          flush=True)
    for b in (1, 32) if not quick else (1,):
        kc, vc = rand(b, cap, hk, D, seed=20), rand(b, cap, hk, D, seed=21)
        q, kn, vn = rand(b, 1, hq, D, seed=22), rand(b, 1, hk, D, seed=23), rand(b, 1, hk, D, seed=24)
        lens = torch.full((b,), cap - 1, dtype=torch.int32, device=DEV)
        out = C.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True)
        check = check_rows(out, q, kc, vc, rows=1, causal=True)
        items = [
            ("kvcache (tensor cache_seqlens)",
             lambda: C.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True)),
            ("kvcache (int cache_seqlens)",
             lambda: C.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=cap - 1, causal=True)),
            ("attention() on the cache, no append",
             lambda: sdpa_flash.attention(q, kc, vc, causal="bottom_right", layout="bshd")),
        ]
        with torch.no_grad():
            res = timed(items, settings)
        for name, _ in items:
            t = ms(res[name])
            row(table, section="decode", batch=b, path=name, us=None if t is None else t * 1e3, check=check,
                planned=C.explain_flash_attn(C.flash_attn_with_kvcache, q, kc, vc, kn, vn, cache_seqlens=lens,
                                             causal=True).path)
        cleanup(DEV)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every row to this file")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer rows (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/compat.py needs a CUDA GPU")
    torch.manual_seed(0)
    settings = Settings(rounds=9, min_rounds=3, sample_ms=2.0, budget_s=0.8, warmup_ms=25.0, max_call_s=5.0)
    table: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    caps = sdpa_flash.capabilities(DEV)
    print(f"{caps.name} ({caps.arch}), torch {caps.torch_version}, "
          f"cuDNN {format_cudnn_version(caps.cudnn_version)}", flush=True)
    overhead(table, settings, args.quick)
    features_vs_masked(table, settings, args.quick)
    decode(table, settings, args.quick)
    ratios = [r["ratio"] for r in table if r.get("section") == "overhead" and r.get("ratio")]
    if ratios:
        print(f"compat / attention(): {min(ratios):.3f}x .. {max(ratios):.3f}x (goal >= 0.97x)")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": caps.name, "torch": caps.torch_version, "rows": table}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
