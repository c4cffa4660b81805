# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Held out from the tune run: does ``auto`` with a tuned table pick the fastest path on shapes it never timed?

Issue #26's check. The shapes are the quick grid's dense classes drawn with another seed (``--seed``, default 1;
``tune`` measures each class's usual shape, or the shapes of its own seed), so none is a tuned point. For each:
``attention()`` as ``auto`` decides with the table in force (``SDPA_FLASH_TABLE=...`` or the tune directory), the
same with the shipped table / built-in rules (``--compare-shipped``), FA4's ``flash_attn_func`` called directly on
contiguous (B, S, H, D) copies and on (B, S, H, D) views of the (B, H, S, D) tensors (left out where a denylist
entry says its result is wrong, e.g. FA4's dQ at head dim 80), and ``F.scaled_dot_product_attention`` forced to each
of cuDNN, FLASH and EFFICIENT inside ``sdpa_kernel``, interleaved in rounds; forward and forward+backward as the
class says. The ratio is the best of the others (the lowest median) over ``attention()``'s time, as the median of
per-round ratios (both timed in the same round, so drift on a shared GPU cancels), with its interquartile range
(goal: >= 0.98 at every point). A point where ``auto`` ran the best path's own kernel ("same kernel") can only lose
our layer's overhead and noise; one where it ran another kernel is a decision to check. The summary at the end
counts both per table; ``--summarize FILE`` prints it again from a saved ``--out`` file.

``auto``'s two decisions are read with ``explain()`` under each table; each is then timed as ``attention(...,
policy=<that backend>)``: the same layer and kernel as ``auto`` (the planner's cache makes the policy's cost the
same), so both tables are measured in one interleaved run.

    SDPA_FLASH_TABLE=/path/tuned.json PYTHONPATH=. python benchmarks/held_out.py --out held_out.json \
        --compare-shipped [--seed 1] [--only "not causal,Sq 2-32"]
    python benchmarks/held_out.py --summarize held_out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from typing import Any

import torch
import torch.nn.functional as F
from _harness import machine_info, timed_pass  # (benchmarks/, on sys.path when a script runs)
from torch.nn.attention import SDPBackend, sdpa_kernel

import sdpa_flash
from sdpa_flash import _caches
from sdpa_flash.backends import fa4 as fa4_backend
from sdpa_flash.bench._report import _paired
from sdpa_flash.bench._timing import Settings, interleave
from sdpa_flash.planner import denylist_reasons, ranking_source
from sdpa_flash.tuning._grid import ShapeClass, grid

FORCED = {"sdpa[cudnn]": SDPBackend.CUDNN_ATTENTION, "sdpa[flash]": SDPBackend.FLASH_ATTENTION,
          "sdpa[efficient]": SDPBackend.EFFICIENT_ATTENTION}
KERNEL = {"sdpa[cudnn]": "cudnn", "sdpa[flash]": "flash", "sdpa[efficient]": "efficient", "fa4 direct": "fa4",
          "fa4 direct (views)": "fa4"}
GOAL = 0.98


def _samples(stats: Any) -> dict[str, Any]:
    """A timed path as the bench report's rows (its per-round samples, in round order, and median)."""
    return {"samples_ms": list(stats.samples_ms), "ms": stats.median_ms}


def summarize(rows: list[dict[str, Any]]) -> str:
    """Per table: points at or above the goal, the median and lowest ratio; the points below the goal split into
    those that ran the best path's own kernel (the layer's overhead, or noise) and those that ran another."""
    lines = []
    labels = sorted({r["path"] for r in rows if r["path"].startswith("auto[") and "ratio" in r})
    for label in labels:
        pts = [r for r in rows if r["path"] == label and "ratio" in r and r["ratio"] == r["ratio"]]
        if not pts:
            continue
        ratios = [r["ratio"] for r in pts]
        low = [r for r in pts if r["ratio"] < GOAL]
        other = [r for r in low if KERNEL.get(r["best_other"]) != r["backend"]]
        lines.append(f"{label}: {len(pts) - len(low)} of {len(pts)} points >= {GOAL}; median "
                     f"{statistics.median(ratios):.3f}, lowest {min(ratios):.3f}; below {GOAL}: "
                     f"{len(low) - len(other)} on the best path's own kernel, {len(other)} on another kernel")
        for r in other:
            lines.append(f"    another kernel: {r['shape']}: {r['backend']} {r['ratio']:.3f}x against "
                         f"{r['best_other']} (IQR {r.get('ratio_iqr', float('nan')):.3f})")
    return "\n".join(lines)


def decisions(c: ShapeClass, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compare: bool
              ) -> dict[str, tuple[str, str]]:
    """``{"auto[tuned]": (backend, table source), "auto[shipped]": ...}`` as explain() decides under each table."""
    causal = c.causal is not None
    out = {}
    caps = sdpa_flash.capabilities(q.device)
    forced = os.environ.get("SDPA_FLASH_TABLE")
    sources = [("auto[tuned]", forced)] + ([("auto[shipped]", None)] if compare else [])
    for label, table in sources:
        with _env("SDPA_FLASH_TABLE", table), _env("SDPA_FLASH_TUNE_DIR", None if table is None else
                                                    os.environ.get("SDPA_FLASH_TUNE_DIR")):
            _caches.clear_all()
            plan = sdpa_flash.explain(q, k, v, causal=causal)
            _, source = ranking_source(caps, plan.spec)
            out[label] = (plan.backend, source)
    _caches.clear_all()
    return out


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Any:
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
        if name == "SDPA_FLASH_TUNE_DIR":  # no user table: an empty directory, never the user's cache
            os.environ[name] = os.path.join(os.path.dirname(__file__), ".no-tables")
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="held_out.json")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compare-shipped", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--only", default=None,
                    help="comma-separated pieces of class descriptions: only the classes whose description has one "
                         "(e.g. 'not causal,Sq 2-32')")
    ap.add_argument("--summarize", metavar="FILE", default=None,
                    help="print the summary of a saved --out file and exit (no GPU needed)")
    args = ap.parse_args()
    if args.summarize:
        with open(args.summarize, encoding="utf-8") as f:
            print(summarize(json.load(f)["rows"]))
        return 0
    dev = torch.device("cuda")
    caps = sdpa_flash.capabilities(dev)
    settings = Settings.for_device("cuda", rounds=args.rounds, budget_s=0.5, warmup_ms=20.0)
    info = {**machine_info(), "table": os.environ.get("SDPA_FLASH_TABLE"), "seed": args.seed}
    print(info, flush=True)
    rows: list[dict[str, Any]] = []
    pieces = args.only.split(",") if args.only else None
    for c in (c for c in grid(caps, quick=True, seed=args.seed) if c.entry == "dense"
              and (pieces is None or any(p in c.describe() for p in pieces))):
        g = torch.Generator(device="cuda").manual_seed(c.sq + c.d)
        q = torch.randn(c.batch, c.heads, c.sq, c.d, device=dev, dtype=c.dtype, generator=g)
        k, v = (torch.randn(c.batch, c.kv_heads, c.sk, dd, device=dev, dtype=c.dtype, generator=g)
                for dd in (c.d, c.dv))
        causal = c.causal is not None
        leaves = [t.clone().requires_grad_(c.training) for t in (q, k, v)]
        chosen = decisions(c, *leaves, args.compare_shipped)
        calls: dict[str, tuple[Any, Any, str]] = {}
        for label, (backend, _) in chosen.items():
            calls[label] = (lambda a, b, d, be=backend: sdpa_flash.attention(a, b, d, causal=causal, policy=be),
                            None, "bhsd")
        for name, backend in FORCED.items():
            calls[name] = (lambda a, b, d: F.scaled_dot_product_attention(a, b, d, is_causal=causal,
                                                                         enable_gqa=c.gqa),
                           lambda be=backend: sdpa_kernel([be]), "bhsd")
        fa4_denied = denylist_reasons("fa4", sdpa_flash.explain(*leaves, causal=causal).spec, caps)
        if fa4_denied:  # FA4's own result is wrong here (its dQ): not a path a user could run instead
            rows.append({"class": c.describe(), "path": "fa4 direct", "error": fa4_denied[0]})
        elif fa4_backend.installed_version() is not None:
            fn = fa4_backend.load().flash_attn_func
            calls["fa4 direct"] = (lambda a, b, d: fn(a, b, d, causal=causal)[0], None, "bshd")
            # the same kernel on (B, S, H, D) views of the (B, H, S, D) tensors, as attention() hands it: what
            # the layout costs apart from what the layer costs
            calls["fa4 direct (views)"] = (lambda a, b, d: fn(a, b, d, causal=causal)[0], None, "views")
        items = []
        for name, (call, ctx, layout) in calls.items():
            ts = [t.transpose(1, 2).contiguous() if layout == "bshd" else t.transpose(1, 2) if layout == "views"
                  else t for t in (q, k, v)]
            try:
                items.append(timed_pass(name, call, ts, "fwdbwd" if c.training else "fwd", ctx))
            except Exception as exc:  # this path cannot run the class: n/a
                rows.append({"class": c.describe(), "path": name, "error": repr(exc)[:200]})
        res = interleave(items, dev, settings, measure_peak=False)
        ok = {str(n): r for n, r in res.items() if not isinstance(r, BaseException)}
        others = {n: r.median_ms for n, r in ok.items() if not n.startswith("auto[")}
        best = min(others, key=others.__getitem__) if others else None
        line = f"{c.shape_text():48s}"
        for label, (backend, source) in chosen.items():
            ms = ok[label].median_ms if label in ok else float("nan")
            ratio, iqr = (_paired(_samples(ok[label]), _samples(ok[best])) if best and label in ok
                          else (float("nan"), float("nan")))
            same = " (same kernel)" if best and KERNEL.get(best) == backend else ""
            line += f" | {label} {backend} {ms:.4f} ms -> {ratio:.3f}x ±{iqr / 2:.3f}{same}"
            rows.append({"class": c.describe(), "shape": c.shape_text(), "path": label, "backend": backend,
                         "source": source, "ms": ms, "spread": ok[label].spread if label in ok else None,
                         "samples_ms": list(ok[label].samples_ms) if label in ok else None,
                         "best_other": best, "best_ms": others.get(best) if best else None, "ratio": ratio,
                         "ratio_iqr": iqr})
        line += f" | best other {best} {others.get(best, float('nan')):.4f} ms"
        print(line, flush=True)
        for n, ms in others.items():
            rows.append({"class": c.describe(), "shape": c.shape_text(), "path": n, "ms": ms,
                         "samples_ms": list(ok[n].samples_ms)})
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    print(summarize(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
