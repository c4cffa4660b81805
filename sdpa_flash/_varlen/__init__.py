"""The varlen engine: plan (pure, cached) and run exact attention over a ragged batch.

Candidate paths, each exact — no sequence ever sees another's tokens or padding:

``grouped``
    Sequences are sorted by length and cut into *groups*; each group is one dense ``attention()`` call on
    ``(b, L_q, H, D)`` gathered from the packed tensor, so the policy's dense kernel (cuDNN on Hopper) does the
    work, and on CUDA the groups run on a few side streams at once so small calls fill the GPU together. A
    group whose members are shorter than its padded length is made exact one of three ways:

    * causal self-attention (every member has ``L_q == L_k``), right-padded: real queries never see the
      padding keys (they come after them), so nothing is masked;
    * ``"coordinate"``: one extra head-dim coordinate, 1 on every query and ``-2^100`` on padding keys (0 on
      real keys), so a padding key's score is ``-2^100 * scale`` and its softmax weight exactly 0, with no
      mask for the kernel to read (the head dim grows by 8: ``D + 1`` rounded up to a multiple of 8);
    * ``"mask"``: a ``(b, 1, 1, L_k)`` boolean key mask.

    Padding rows are gathered from real rows (never uninitialised memory), and their outputs are dropped, so
    their gradients are exactly 0. Where every group needs no mask and its dense plan is a kernel's direct
    route with nothing to adapt, the groups' forward and backward aten ops are called directly under one
    autograd node (:class:`_Direct`): the same kernels on the same inputs, without a few autograd nodes per
    group, which is most of a small group's host time.

``flash_varlen``
    One call of a packed (``cu_seqlens``) kernel: no padding at all, one launch. The kernel is the first of the
    policy's backends that has such an entry point and can run the batch: FlashAttention-4's
    ``flash_attn_varlen_func`` (backend ``fa4``, optional; ~0.9-1.0x dense cuDNN speed on the H200) or
    PyTorch's own flash varlen op (backend ``flash``, FlashAttention-2 speed).

``hybrid``
    The shortest sequences in one such varlen call, the rest in groups.

Not a path: cuDNN's ragged (THD) layout, ``aten._cudnn_attention_forward`` with ``cu_seqlens``. Its kernel is
what the target needs (H200, device time alone: 0.85-0.99x dense cuDNN forward, 1.05-1.08x forward+backward on
the BASELINE batches over two runs of ``benchmarks/varlen_probe.py``), but on torch 2.11 the op rebuilds its cuDNN
graph on every call (45-83 ms of host time per forward; pytorch/pytorch#191576), the backward returns wrong
dq/dk (its dQ accumulator is sized from the head dim; pytorch/pytorch#186142), and neither can be captured in a
CUDA graph to hide the host cost (capture is invalidated, or crashes in relaxed mode).
``tests/test_varlen.py::test_cudnn_ragged_layout_backward_is_exact`` is a strict xfail that says when a torch
has the fixes.

The grouping and the choice between paths come from a cost model (:class:`CostModel`, data per device type):
a group costs a fixed per-call time plus its padded FLOPs at the kernel's rate for that length; dynamic
programming over the sorted lengths finds the cheapest cut, and the cheapest path wins. ``explain()`` shows
each path's estimate and why the others lost.
"""

from __future__ import annotations

from .cost import COST_MODELS, CostModel
from .execution import clear_caches, explain, run
from .planning import Group, VarlenPlan, VarlenSpec, plan_varlen

__all__ = [
    "COST_MODELS",
    "CostModel",
    "Group",
    "VarlenPlan",
    "VarlenSpec",
    "clear_caches",
    "explain",
    "plan_varlen",
    "run",
]
