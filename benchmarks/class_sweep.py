"""Inside one class of the tuned table: does the kernels' order hold at every length, or is there a crossover?

Issue #26's follow-up to the held-out check. ``tune`` measures each class at one length (S=128 for "Sq 2-256",
4096 for "Sq 2049-8192") and its rule then decides every length of the class; a held-out point that misses is a
length where another kernel wins. This script measures every backend the way ``tune`` does
(``sdpa_flash.tuning._measure.measure_class``: ``attention(..., policy=[name])``, warm kernels, interleaved rounds)
at many lengths of one class, so a crossover shows as a change of order, and whether it follows the length or its
alignment (multiples of 128 next to their neighbours).

Each sweep keeps the grid's budget (16,384 tokens per call on a GPU, heads x head dim = 2048), so B = 16384 // S,
as ``tune``'s classes and ``held_out.py``'s points do; ``--batch`` fixes B instead.

    PYTHONPATH=. python benchmarks/class_sweep.py --out sweep.json [--sweeps mid_fwd,mid_fwd_causal,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from _harness import machine_info  # (benchmarks/, on sys.path when a script runs)

import sdpa_flash
from sdpa_flash.bench._timing import Settings
from sdpa_flash.tuning._grid import ShapeClass
from sdpa_flash.tuning._measure import measure_class
from sdpa_flash.tuning._table import suspended

MID = (2176, 2560, 2944, 3072, 3392, 3440, 3456, 3584, 3968, 4088, 4096, 4104, 4608, 5120, 6144, 7168, 8192)
SHORT = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)

SWEEPS: dict[str, dict[str, Any]] = {
    # name: head dim, causal, training, lengths (the held-out misses of 2026-12-07 sit in the first three)
    "mid_fwd": {"d": 128, "causal": False, "training": False, "lengths": MID},
    "mid_fwd_causal": {"d": 128, "causal": True, "training": False, "lengths": MID},
    "short_fwd_causal": {"d": 128, "causal": True, "training": False, "lengths": SHORT},
    "mid_train_causal": {"d": 128, "causal": True, "training": True, "lengths": MID[::2]},
    "short_train_causal": {"d": 128, "causal": True, "training": True, "lengths": SHORT[::2]},
    # (Sq, Sk) pairs without causal masking: which length's alignment to 128 moves cuDNN against FA4
    "align_fwd": {"d": 128, "causal": False, "training": False, "pairs": (
        (4096, 4096), (4096, 4088), (4088, 4096), (4088, 4088), (1024, 1024), (1024, 1016), (1016, 1024),
        (512, 512), (512, 504), (128, 128), (128, 120), (16384, 16384), (16384, 16376))},
    "align_train": {"d": 128, "causal": False, "training": True, "pairs": (
        (4096, 4096), (4096, 4088), (4088, 4096), (1024, 1024), (1024, 1016))},
}


def shape(d: int, s: int, sk: int, causal: bool, training: bool, batch: int | None, dtype: torch.dtype
          ) -> ShapeClass:
    heads = max(1, 2048 // d)
    return ShapeClass(dtype, training, "top_left" if causal else None, batch or max(1, 16384 // s), heads, heads, s,
                      sk, d, d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="class_sweep.json")
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, of: {', '.join(SWEEPS)}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backends", default="fa4,cudnn,flash,efficient",
                    help="comma-separated backends to time (default: the fused kernels; math and chunked never win "
                         "these classes and would take most of the time)")
    ap.add_argument("--batch", type=int, default=None, help="a fixed batch size (default: 16384 // S)")
    ap.add_argument("--lengths", default=None, help="comma-separated lengths instead of each sweep's own")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a check of the script itself")
    args = ap.parse_args()
    dev = torch.device(args.device)
    caps = sdpa_flash.capabilities(dev)
    settings = Settings.for_device(dev.type, rounds=args.rounds, min_rounds=args.rounds)
    info = machine_info() if dev.type == "cuda" else {"torch": torch.__version__, "device": "cpu"}
    print(info, flush=True)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    for name in args.sweeps.split(","):
        sw = SWEEPS[name]
        print(f"== {name}: head dim {sw['d']}, {'causal' if sw['causal'] else 'non-causal'}, "
              f"{'fwd+bwd' if sw['training'] else 'fwd'}", flush=True)
        pairs = ([(int(x), int(x)) for x in args.lengths.split(",")] if args.lengths else
                 sw.get("pairs") or [(n, n) for n in sw["lengths"]])
        for s, sk in pairs:
            c = shape(sw["d"], s, sk, sw["causal"], sw["training"], args.batch, dtype)
            with suspended():  # no tuned table: every backend is timed as tune times it
                got = measure_class(c, caps, dev, settings, args.backends.split(","))
            timed = sorted((r for r in got if r["status"] == "measured"), key=lambda r: r["median_ms"])
            best = timed[0]["median_ms"] if timed else float("nan")
            cells = ", ".join(f"{r['backend']} {r['median_ms']:.4f} ({best / r['median_ms']:.2f})" for r in timed)
            print(f"  {c.shape_text():44s} {cells}", flush=True)
            rows += [{**r, "sweep": name, "s": s, "sk": sk} for r in got]
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
