"""flash-attn 2 code, unchanged, on sdpa_flash: ``flash_attn_func`` and ``flash_attn_varlen_func`` from
``sdpa_flash.compat`` (same arguments, same (B, S, H, D) / packed (T, H, D) layouts, bottom-right causal).

    python examples/flash_attn_dropin.py                       # CPU or GPU, small
    python examples/flash_attn_dropin.py --seq 4096 --heads 16 --kv-heads 4 --head-dim 128

Where flash-attn itself is installed you would write ``from flash_attn import ...``; here the import is
``from sdpa_flash.compat import ...`` (or call ``sdpa_flash.compat.install()`` once and keep ``import flash_attn``).
"""

from __future__ import annotations

import argparse

import torch

import sdpa_flash


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--device", default=None, help="default: cuda if available (bf16), else cpu (float32)")
    args = ap.parse_args(argv)
    from sdpa_flash.compat import explain_flash_attn, flash_attn_func, flash_attn_varlen_func

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    b, s, hq, hk, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, s, hq, d, device=device, dtype=dtype, requires_grad=True)  # flash-attn layout (B, S, H, D)
    k = torch.randn(b, s, hk, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, s, hk, d, device=device, dtype=dtype, requires_grad=True)

    # dense: exactly flash-attn 2's call
    out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True)
    out.sum().backward()
    ref = sdpa_flash.attention(q, k, v, causal=True, layout="bshd")
    dense_err = float((out - ref).detach().abs().max())
    print(f"flash_attn_func   {tuple(out.shape)}  max |diff| vs sdpa_flash.attention: {dense_err:.3g}")
    print("  plan:", explain_flash_attn(flash_attn_func, q, k, v, causal=True))

    # varlen: packed tokens + cu_seqlens (int32, leading 0), as flash-attn's unpad_input produces them
    lengths = [s, s // 2, s // 4][: max(1, b)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    qp = torch.randn(total, hq, d, device=device, dtype=dtype)
    kp = torch.randn(total, hk, d, device=device, dtype=dtype)
    vp = torch.randn(total, hk, d, device=device, dtype=dtype)
    outp = flash_attn_varlen_func(qp, kp, vp, cu, cu, max(lengths), max(lengths), causal=True)
    first = slice(0, lengths[0])  # sequence 0 on its own equals a dense call on its tokens
    alone = sdpa_flash.attention(qp[None, first], kp[None, first], vp[None, first], causal=True, layout="bshd")[0]
    varlen_err = float((outp[first] - alone).abs().max())
    print(f"flash_attn_varlen_func {tuple(outp.shape)} lengths {lengths}  max |diff| of sequence 0: {varlen_err:.3g}")
    return {"dense_err": dense_err, "varlen_err": varlen_err}


if __name__ == "__main__":
    main()
