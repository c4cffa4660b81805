"""Plug in your own attention kernel: one class, one register_backend() call.

The kernel here is pure PyTorch (two einsums and a float32 softmax), standing in for a Triton kernel, FlashInfer
or a vendor library. It declares what it accepts as data — head dims in multiples of 8, no native GQA, top-left
causal, an additive bias, no dropout — and sdpa_flash does the rest: it pads head dims, repeats K/V for GQA, turns
boolean masks into biases, refuses what the kernel cannot do with the reason, ranks it, explains it,
shadow-checks it against the math reference and tests it with sdpa_flash.testing like a built-in backend.

    python examples/plugin_backend.py
"""

from __future__ import annotations

import argparse
import math
from typing import ClassVar

import torch

import sdpa_flash
from sdpa_flash.testing import ProblemParams, assert_close_to_reference, attention_outputs


def einsum_attention(c: sdpa_flash.KernelCall) -> torch.Tensor:
    """The kernel: ``c.q`` (B, H, Sq, D), ``c.k`` (B, H, Sk, D), ``c.v`` (B, H, Sk, Dv) -> (B, H, Sq, Dv), as
    sdpa_flash hands them over (see ``sdpa_flash.KernelCall``). Scores and softmax in float32 (float64 for float64);
    O(Sq * Sk) memory."""
    q, k, v = c.q, c.k, c.v
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if c.scale is None else c.scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale
    if c.bias is not None:
        scores = scores + c.bias.to(acc)
    if c.causal:  # this kernel's corner is top-left: query i sees keys j <= i
        sq, sk = scores.shape[-2:]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    dead = torch.isneginf(scores).all(-1, keepdim=True)  # rows that see no key give 0, as PyTorch's math does,
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)  # with 0 gradient (not NaN)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(acc)).to(q.dtype)


class EinsumBackend(sdpa_flash.Backend):
    name = "einsum"
    fused = False  # it materialises the scores: O(N^2) memory, like the math reference
    memory = "O(N^2)"
    DIRECT_LABEL = "examples/plugin_backend.py"
    ROUTE_REASON = "a plug-in kernel registered with sdpa_flash.register_backend()"
    _REQ = sdpa_flash.Requirements(
        dtypes=frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64)),
        head_dim_multiple=8,  # other head dims are zero-padded for it (exact)
        native_gqa=False,  # fewer K/V heads are repeated for it
        kernel_causal="top_left",
        mask=True,  # boolean masks arrive as additive biases
        dropout=False,  # refused, with the reason, under a policy that names only this backend
        deterministic_backward=True,
    )
    REQUIREMENTS: ClassVar[dict[str, sdpa_flash.Requirements]] = {"cpu": _REQ, "cuda": _REQ}
    # How sdpa_flash.testing.ran_backends() sees this kernel run (a Triton kernel: a part of its GPU kernel's name)
    PROFILER_NAMES = ("aten::einsum",)

    def kernel(self, device_type: str, *, traced: bool = False) -> sdpa_flash.backends.KernelFn:
        return einsum_attention  # plain PyTorch ops: torch.compile traces it as it is


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=36, help="not a multiple of 8: the plug-in gets it padded")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sdpa_flash.register_backend(EinsumBackend())  # ranked after the fused kernels, before math
    try:
        q = torch.randn(2, 8, 96, args.head_dim, device=device)
        k, v = torch.randn(2, 2, 2, 96, args.head_dim, device=device).unbind(0)  # GQA: 8 query heads, 2 K/V heads
        out = sdpa_flash.attention(q, k, v, causal=True, policy="einsum")
        plan = sdpa_flash.explain(q, k, v, causal=True, policy="einsum")
        print(f"ran {plan.backend}: output {tuple(out.shape)}\n{plan.explain()}\n")

        try:  # what the kernel cannot do is refused with the reason, never run differently
            sdpa_flash.attention(q, k, v, dropout_p=0.1, policy="einsum")
        except sdpa_flash.BackendUnavailableError as exc:
            print(f"dropout refused: {str(exc).splitlines()[-1].strip(' -')}\n")

        # sdpa_flash.testing checks it like a built-in backend: forward and backward against float64 math.
        problem = ProblemParams(torch.float32, heads_q=8, heads_kv=2, seqlen_q=33, seqlen_k=47, head_dim=20,
                                causal="bottom_right", backward=True).build(device)
        checks = assert_close_to_reference(attention_outputs(problem, policy="einsum"), problem)
        print("vs float64 math:", "; ".join(f"{c.name} error/bound {c.usage:.2f}" for c in checks))

        # Shadow checking covers it too: 1 call in N is compared with the math reference at run time.
        with sdpa_flash.use_policy("einsum", shadow=1, shadow_action="raise"):
            sdpa_flash.attention(q, k, v, causal=True)
        print("shadow check: passed;", sdpa_flash.stats().calls)
        return {"backend": plan.backend, "usage": [c.usage for c in checks]}
    finally:
        sdpa_flash.unregister_backend("einsum")


if __name__ == "__main__":
    main()
