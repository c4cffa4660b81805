"""What the index range check of ``flash_attn_with_kvcache`` costs per decode step (issue #19).

Before any kernel runs, ``sdpa_flash.compat`` reads the range of ``cache_seqlens``, ``cache_batch_idx`` and the
used entries of ``block_table`` (one ``aminmax`` each, one host sync for all of them), so a bad index is a typed
error instead of an out-of-bounds gather (on CUDA a device-side assert that ends the process's use of the GPU).
This measures, for decode steps (one new token appended in place), wall-clock time per call:

* ``checked``: the call as shipped;
* ``unchecked``: the same call with the check switched off (as it is while compiling / capturing a CUDA graph);
* ``check only``: the check by itself (the reductions and the sync, no attention; the table of used
  ``block_table`` entries, built whether or not the check runs, is not counted).

Calls run back to back (blocks of ``--calls``; CUDA synchronised only at the end of a block, so the host sync
inside the check is what breaks the pipelining, exactly as in a decode loop), interleaved in rounds; each figure is
the median over rounds, per call, with the interquartile range.

    python benchmarks/kvcache_index_check.py [--device cuda] [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import sdpa_flash.compat as C
from sdpa_flash.compat import _common, _kvcache

# name -> (batch, cache capacity, Hq, Hkv, head dim, page size or None (contiguous cache), per-row lengths?)
CASES: dict[str, tuple[int, int, int, int, int, int | None, bool]] = {
    "B=1 S=512 contiguous, int lens": (1, 512, 8, 8, 64, None, False),
    "B=8 S=4096 contiguous": (8, 4096, 32, 8, 128, None, True),
    "B=8 S=4096 paged 256": (8, 4096, 32, 8, 128, 256, True),
    "B=32 S=2048 paged 16": (32, 2048, 32, 8, 128, 16, True),
}


def build(case: tuple[int, int, int, int, int, int | None, bool], device: str, dtype: torch.dtype
          ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The decode call and the check by itself, on fresh inputs of ``case``."""
    b, cap, hq, hk, d, page, per_row = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, 1, h, d, generator=g).to(device, dtype) for h in (hq, hk, hk))
    lens_list = torch.randint(cap // 2, cap - 1, (b,), generator=g, dtype=torch.int32)
    lens: Any = lens_list.to(device) if per_row else int(lens_list[0])
    table = None
    if page is None:
        kc, vc = (torch.randn(b, cap, hk, d, generator=g).to(device, dtype) for _ in range(2))
    else:
        per = cap // page
        kc, vc = (torch.randn(b * per, page, hk, d, generator=g).to(device, dtype) for _ in range(2))
        table = torch.randperm(b * per, generator=g).to(torch.int32).view(b, per).to(device)

    def call() -> Any:
        return C.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True)

    used = None  # the used-entry table is built with or without the check (it makes unused entries harmless)
    if table is not None and page is not None:
        used = _kvcache._used_blocks(table, lens if per_row else None, None if per_row else lens + 1, 1, page)

    def check() -> None:
        _kvcache._check_index_ranges(b, 1, cap, lens if per_row else None, None, kc.shape[0], table, used,
                                     page or cap)

    return call, check


def timed(fn: Callable[[], Any], calls: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--calls", type=int, default=0, help="calls per timed block (default: 50 on CUDA, 5 on CPU)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    calls = args.calls or (50 if dev == "cuda" else 5)
    readable = _common.index_values_readable
    rows = []
    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {dtype}; microseconds per decode call, median [IQR] of {args.rounds} "
          f"rounds of {calls} calls")
    print(f"{'case':<34} {'checked':>18} {'unchecked':>18} {'check only':>16} {'cost':>8}")
    for name, case in CASES.items():
        call, check = build(case, dev, dtype)

        def unchecked(call: Callable[[], Any] = call) -> Any:
            _common.index_values_readable = lambda device: False  # type: ignore[assignment]
            try:
                return call()
            finally:
                _common.index_values_readable = readable

        things = {"checked": call, "unchecked": unchecked, "check only": check}
        samples: dict[str, list[float]] = {t: [] for t in things}
        for fn in things.values():
            timed(fn, 2, dev)  # warm-up (plans, caches)
        order = list(things)
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for t in order:
                samples[t].append(timed(things[t], calls, dev))
        stats = {}
        for t, xs in samples.items():
            qs = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
            stats[t] = (statistics.median(xs), qs[0], qs[2])
        cost = stats["checked"][0] - stats["unchecked"][0]
        print(f"{name:<34} " + " ".join(f"{m:>8.1f} [{lo:.0f}-{hi:.0f}]".rjust(18 if t != "check only" else 16)
                                        for t, (m, lo, hi) in stats.items()) + f" {cost:>+8.1f}")
        rows.append({"case": name, "device": dev, "dtype": str(dtype), "calls_per_block": calls,
                     **{t: {"median_us": m, "q1_us": lo, "q3_us": hi} for t, (m, lo, hi) in stats.items()},
                     "cost_us": cost})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
