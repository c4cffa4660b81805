"""Peak memory of the chunked backend against PyTorch's math backend on the CPU (fp32, one head), side by side.

Each (backend, S) runs forward and backward in its own subprocess, so the process's peak resident memory
(``ru_maxrss``) belongs to that call alone; the row reports it beyond the inputs' baseline. A call that the
machine cannot hold dies (OOM) and the row says so.

    python benchmarks/chunked_memory.py --seq 16384,32768,65536 --json chunked_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(backend: str, s: int, d: int, limit_gib: float) -> None:
    # an address-space cap turns "too big for this machine" into an allocation error instead of the OOM killer
    cap = int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    import sdpa_flash

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, s, d, requires_grad=True) for _ in range(3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = sdpa_flash.attention(q, k, v, causal=True, policy=backend)
    out.backward(torch.ones_like(out))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"backend": backend, "S": s, "D": d, "extra_MiB": (peak - base) / 1024, "seconds": dt,
                      "finite": bool(torch.isfinite(q.grad).all())}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="16384,32768,65536")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--backends", default="math,chunked")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json")
    ap.add_argument("--limit-gib", type=float, default=20.0, help="address-space cap of each child")
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.limit_gib)
        return
    rows = []
    for s in (int(x) for x in args.seq.split(",")):
        for b in args.backends.split(","):
            try:
                p = subprocess.run([sys.executable, __file__, "--limit-gib", str(args.limit_gib), "--child", b,
                                    str(s), str(args.head_dim)],
                                   capture_output=True, text=True, timeout=args.timeout)
                if p.returncode == 0:
                    row = json.loads(p.stdout.strip().splitlines()[-1])
                else:
                    err = p.stderr.strip().splitlines()
                    why = "killed (out of memory)" if p.returncode in (-9, 137) else (err[-1] if err else "failed")
                    row = {"backend": b, "S": s, "D": args.head_dim, "failed": why}
            except subprocess.TimeoutExpired:
                row = {"backend": b, "S": s, "D": args.head_dim, "failed": f"over {args.timeout:.0f} s"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
