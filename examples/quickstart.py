"""Quickstart: one attention call, what ran and why, and a strict policy block.

    python examples/quickstart.py            # CPU or the current GPU
    python examples/quickstart.py --seq 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

import sdpa_flash


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)

    q, k, v = (torch.randn(2, args.heads, args.seq, args.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = sdpa_flash.attention(q, k, v, causal=True)  # (B, H, S, D), autograd works
    out.sum().backward()
    print("output", tuple(out.shape), out.dtype, "| grad ok:", q.grad is not None)

    plan = sdpa_flash.explain(q, k, v, causal=True)  # what would run, and why, without running
    print("\nexplain():", plan)
    print(plan.explain())

    with sdpa_flash.use_policy("flash"):  # strict: FLASH_ATTENTION or an error that says why not
        try:
            sdpa_flash.attention(q, k, v, causal=True)
            print("\npolicy 'flash': ran FLASH_ATTENTION")
        except sdpa_flash.BackendUnavailableError as exc:
            print("\npolicy 'flash' cannot run here:\n", exc)


if __name__ == "__main__":
    main()
