"""Host time per call of ``attention()`` under two source trees (e.g. before and after a refactor), each against
what a user would otherwise call, in interleaved rounds of fresh processes.

Each round starts one process per tree (``PYTHONPATH=TREE``), alternating which goes first; a process times, in
interleaved inner rounds, raw ``F.scaled_dot_product_attention`` (inside ``sdpa_kernel([...])`` where a backend
is named), FA4's own ``flash_attn_func`` when installed, and ``attention(policy=P)`` for each policy, all at one
tiny host-bound shape, and reports its best inner round per path. The table gives, per tree and path, the median
over rounds of µs per call and of the ratio to the user's path measured in the same process, with the spread.

    python benchmarks/host_overhead_revisions.py /tmp/before /work/main --device cpu --shape 1x8x16x64 --dtype fp32
    python benchmarks/host_overhead_revisions.py .before . --device cuda --policies cudnn,fa4,auto --json out.json

Make a tree of another revision with ``git archive REV sdpa_flash | tar -x -C DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import sdpa_flash

cfg = json.loads(sys.argv[1])
dev = torch.device(cfg["device"])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]
b, h, s, d = cfg["shape"]
g = torch.Generator(device="cpu").manual_seed(0)
q, k, v = (torch.randn(b, h, s, d, generator=g).to(dev, dtype) for _ in range(3))
sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
SDP = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
       "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
paths = {"F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
for p in cfg["policies"]:
    if p in SDP:
        def forced(p=p):
            with sdpa_kernel([SDP[p]]):
                return F.scaled_dot_product_attention(q, k, v)
        paths[f"F.sdpa[{p}]"] = forced
    paths[f"attention({p})"] = (lambda p=p: sdpa_flash.attention(q, k, v, policy=p))
if "fa4" in cfg["policies"]:
    try:
        from flash_attn.cute import flash_attn_func
        qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        paths["fa4 direct (B,S,H,D)"] = lambda: flash_attn_func(qb, kb, vb)[0]
        paths["attention(fa4, bshd)"] = lambda: sdpa_flash.attention(qb, kb, vb, policy="fa4", layout="bshd")
    except ImportError:
        pass
ok = {}
for name, fn in paths.items():
    try:
        for _ in range(cfg["warmup"]):
            fn()
        ok[name] = fn
    except Exception as exc:  # a path that cannot run here is reported, not timed
        print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
best = {n: float("inf") for n in ok}
for _ in range(cfg["inner"]):
    for name, fn in ok.items():
        sync()
        t = time.perf_counter()
        for _ in range(cfg["calls"]):
            fn()
        sync()
        best[name] = min(best[name], (time.perf_counter() - t) / cfg["calls"] * 1e6)
print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                  else "cpu", "us": best}))
"""

_BASELINE = {"cudnn": "F.sdpa[cudnn]", "flash": "F.sdpa[flash]", "efficient": "F.sdpa[efficient]",
             "math": "F.sdpa[math]", "fa4": "fa4 direct (B,S,H,D)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs=2, help="two source trees, each holding sdpa_flash/ (the first is the baseline)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="1x8x128x64", help="BxHxSxD")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--policies", default="auto", help="comma-separated policies for attention()")
    ap.add_argument("--rounds", type=int, default=9, help="fresh processes per tree")
    ap.add_argument("--inner", type=int, default=5, help="interleaved inner rounds per process (best one counts)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--json", help="write every round's numbers here")
    args = ap.parse_args(argv)
    cfg = {"device": args.device, "shape": [int(x) for x in args.shape.lower().split("x")], "dtype": args.dtype,
           "policies": [p for p in args.policies.split(",") if p], "inner": args.inner, "calls": args.calls,
           "warmup": args.warmup}
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in args.trees}
    info = {}
    for r in range(args.rounds):
        for tree in (args.trees if r % 2 == 0 else args.trees[::-1]):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], env=env, capture_output=True,
                                 text=True, check=True)
            got = json.loads(res.stdout.strip().splitlines()[-1])
            info = {"torch": got["torch"], "device": got["device"]}
            runs[tree].append(got["us"])
            if r == 0 and res.stderr.strip():
                print(f"[{tree}] {res.stderr.strip()[-600:]}", file=sys.stderr)
    print(f"{info['device']}, torch {info['torch']}, shape {args.shape} {args.dtype}, {args.rounds} rounds x "
          f"{args.inner} inner x {args.calls} calls; median (min-max) over rounds")
    print(f"{'path':28s} " + "  ".join(f"{t[-30:]:>44s}" for t in args.trees))
    names = list(dict.fromkeys(n for t in args.trees for rnd in runs[t] for n in rnd))
    for name in names:
        cells = []
        for tree in args.trees:
            us = [rnd[name] for rnd in runs[tree] if name in rnd]
            if not us:
                cells.append(f"{'n/a':>44s}")
                continue
            cell = f"{statistics.median(us):7.1f} us ({min(us):.1f}-{max(us):.1f})"
            pol = name[len("attention("):-1].split(",")[0] if name.startswith("attention(") else None
            base = _BASELINE.get(pol or "", "F.sdpa")
            ratios = [rnd[name] / rnd[base] for rnd in runs[tree] if name in rnd and base in rnd]
            if pol is not None and ratios:
                cell += f" {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            cells.append(f"{cell:>44s}")
        print(f"{name:28s} " + "  ".join(cells))
    print("ratios: attention(P) / the user's path in the same process (F.sdpa inside sdpa_kernel([P]); FA4's own "
          "function for fa4; plain F.sdpa for auto/fused)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "trees": args.trees, "info": info, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
