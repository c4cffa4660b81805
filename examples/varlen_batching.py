"""Variable-length batching: a ragged batch -> packed (cu_seqlens) / nested -> attention -> back, with the plan.

    python examples/varlen_batching.py                       # 5 sequences of 8..64 tokens, CPU or GPU
    python examples/varlen_batching.py --batch 64 --max-len 4096 --causal
"""

from __future__ import annotations

import argparse

import torch

import sdpa_flash
from sdpa_flash import varlen


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available (bf16), else cpu (float32)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=gen).tolist()

    def seqs(heads: int) -> list[torch.Tensor]:  # each (L_i, H, D)
        return [torch.randn(n, heads, args.head_dim, generator=gen).to(device, dtype) for n in lengths]

    # 1. a list of ragged sequences -> one packed batch: values (T, H, D) + cu_seqlens (int32, leading 0)
    q, k, v = varlen.pack(seqs(args.heads)), varlen.pack(seqs(args.kv_heads)), varlen.pack(seqs(args.kv_heads))
    print(f"lengths {lengths} -> cu_seqlens {q.cu_seqlens.tolist()}, values {tuple(q.values.shape)}")

    # 2. what will run, and why (grouped dense calls, one flash varlen call, or a hybrid)
    print("\nplan:", varlen.explain_varlen(q, k, v, causal=args.causal))
    out = varlen.varlen_attention(q, k, v, causal=args.causal)  # attention within each sequence only

    # 3. the same through a jagged nested tensor (B, H, j, D), SDPA's own ragged format
    out_nt = varlen.varlen_attention(q.to_nested(), k.to_nested(), v.to_nested(), causal=args.causal)
    nested_err = max(float((a - b).abs().max()) for a, b in
                     zip(out.unpack(), varlen.from_nested(out_nt).unpack(), strict=True))

    # 4. back to padded (B, S, H, D) + mask, and the padded route: attention(..., key_padding_mask=...)
    padded, mask = out.to_padded()
    qp, kp, vp = (t.to_padded().values.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    dense = sdpa_flash.attention(qp, kp, vp, key_padding_mask=mask, causal=args.causal).transpose(1, 2)
    padded_err = float((dense - padded)[mask].abs().max())
    print(f"\npadded {tuple(padded.shape)}, real tokens {int(mask.sum())} of {mask.numel()}")
    print(f"max |packed - nested| = {nested_err:.3g}, max |packed - key_padding_mask route| = {padded_err:.3g}")
    return {"nested_err": nested_err, "padded_err": padded_err}


if __name__ == "__main__":
    main()
