"""FlashAttention-4's own ``flash_attn_func`` on this GPU, head dim by head dim: is its backward right?

flash-attn 2.8's test suite, run against ``sdpa_flash.compat`` with FA4 installed (``benchmarks/flash_attn_suite.py``),
found dQ off by O(1) on the H200 for head dims 40 and 80 while the forward was right. This probe calls FA4 directly,
without sdpa_flash, so what it finds is FA4's: for each head dim and causal flag it runs forward and backward on one
(B, S, H, D) problem and compares out, dQ, dK, dV with a float32 reference, next to PyTorch's own error in the same
dtype (``F.scaled_dot_product_attention`` on the math backend) — flash-attn's criterion: at most twice that error,
plus FA4's own tests' allowance of twice the rounding of the reference's values.

    python benchmarks/fa4_bwd_head_dims.py --head-dims 8:256:8 --json /tmp/fa4_bwd.json

Each configuration compiles FA4's kernels once (3-7 s on the H200); ``--workers N`` spreads the head dims over N
processes. Prints one row per configuration and exits 1 when any exceeds the bound.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from typing import Any


def _dims(text: str) -> list[int]:
    if ":" in text:
        lo, hi, step = (int(x) for x in text.split(":"))
        return list(range(lo, hi + 1, step))
    return [int(x) for x in text.split(",") if x]


def _grads(fn: Any, g: Any, *xs: Any) -> list[Any]:
    """(out, dq, dk, dv) of ``fn`` at ``xs`` for the output gradient ``g``."""
    import torch

    leaves = [x.detach().requires_grad_() for x in xs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    return [out.detach(), *torch.autograd.grad(out, leaves, g.to(out.dtype))]


def _math(causal: bool) -> Any:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q: Any, k: Any, v: Any) -> Any:  # (B, S, H, D) in and out, like FA4
        with sdpa_kernel([SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=causal)
        return o.transpose(1, 2)

    return run


def probe(head_dims: list[int], dtype_name: str, seqlen: int) -> list[dict[str, Any]]:
    import torch
    from flash_attn.cute.interface import flash_attn_func

    dtype = getattr(torch, dtype_name)
    rows = []
    for hd in head_dims:
        for causal in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(hd)
            q, k, v, g = (torch.randn(2, seqlen, 4, hd, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
            row: dict[str, Any] = {"head_dim": hd, "causal": causal, "dtype": dtype_name, "seqlen": seqlen}
            try:
                got = _grads(functools.partial(flash_attn_func, causal=causal), g, q, k, v)
            except Exception as exc:  # a refusal is a result: FA4 says this head dim is unsupported
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            ref = _grads(_math(causal), g, q.float(), k.float(), v.float())
            pt = _grads(_math(causal), g, q, k, v)
            ok = True
            for name, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref, pt, strict=True):
                err = (a.float() - r).abs().max().item()
                err_pt = (p.float() - r).abs().max().item()
                atol = 2 * (r.to(dtype) + 0.3 - 0.3 - r.to(dtype)).abs().max().item()
                row[name] = {"err": err, "err_pytorch": err_pt, "bound": 2 * err_pt + atol}
                ok &= err <= 2 * err_pt + atol
            row["ok"] = ok
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", default="8:256:8", help="lo:hi:step or a comma list")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    dims = _dims(args.head_dims)
    if args.workers > 1:
        chunks = [dims[i :: args.workers] for i in range(args.workers)]
        procs = [subprocess.Popen([sys.executable, __file__, "--head-dims", ",".join(map(str, c)), "--dtype",
                                   args.dtype, "--seqlen", str(args.seqlen)], stdout=subprocess.PIPE, text=True)
                 for c in chunks if c]
        rows = [json.loads(line) for p in procs for line in p.communicate()[0].splitlines() if line.startswith("{")]
        rows.sort(key=lambda r: (r["head_dim"], r["causal"]))
        for r in rows:
            print(json.dumps(r))
    else:
        rows = probe(dims, args.dtype, args.seqlen)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r.get("ok", True)]
    print(f"# {len(rows)} configurations, {len(bad)} beyond the bound: "
          + ", ".join(f"hd{r['head_dim']}{'c' if r['causal'] else ''}" for r in bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
