"""Start-up for a model that may run on FlashAttention-4: say whether it will, then compile its configurations.

    pip install "sdpa_flash[fa4]"                      # on a Hopper GPU with a CUDA 12.9+/13 build of torch
    python examples/fa4_warmup.py --heads 32 --kv-heads 8 --head-dim 128 --causal --seq 4096

Each attention configuration a model uses (dtype, head dims, GQA ratio, causal, forward-only or training) is run
once, so FA4 compiles it now (seconds each, once: later processes load it from the on-disk cache) and the first
training step does not stall. Without FA4 (or on a CPU) it prints why FA4 will not run and warms whatever runs.
"""

from __future__ import annotations

import argparse

import torch

import sdpa_flash


def main(argv: list[str] | None = None) -> list[sdpa_flash.WarmupResult]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args(argv)
    caps = sdpa_flash.capabilities()
    dtype = torch.bfloat16 if caps.device_type == "cuda" else torch.float32
    hkv = args.kv_heads or args.heads
    q = torch.empty(1, args.heads, args.seq, args.head_dim, dtype=dtype, device=caps.device_type)
    kv = torch.empty(1, hkv, args.seq, args.head_dim, dtype=dtype, device=caps.device_type)
    plan = sdpa_flash.explain(q, kv, kv, causal=args.causal)
    print(f"FlashAttention-4: {caps.kernel_version('fa4') or 'not installed'}; this call runs on {plan.backend}"
          + ("" if plan.backend == "fa4" else f" (fa4: {plan.reasons.get('fa4', ('not ranked first here',))[0]})"))
    results = []
    for training in (False, True):  # inference and training compile separately
        r = sdpa_flash.warmup(heads=args.heads, kv_heads=hkv, head_dim=args.head_dim, seqlen=args.seq,
                              causal=args.causal, training=training, dtype=dtype, device=caps.device_type)
        print(r)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
