"""The ranking: which backend ``auto`` tries first, per device and class of call, as data with its evidence.

Rules are tried in order and the first that matches decides (see :class:`sdpa_flash.planner.RankingRule`). A
shape-class rule (head dim, sequence lengths, forward-only or training, GQA) is there because a measurement showed
that class ordering differently from its device's general rule; ``benchmarks/fa4.py --sections grid`` is the
measurement behind the FlashAttention-4 rules (run on the H200, it prints the rows they come from). A backend
that cannot run a call (FA4 not installed, a dtype it lacks) is skipped with its reason, so the order is the
same for every install.
"""

from __future__ import annotations

from typing import Any

from ._rules import RankingRule

__all__ = ["RANKING"]

_SM90_SDPA = ("cudnn", "flash", "efficient", "math", "chunked")
_CUDNN_FIRST = ("cudnn", "fa4", "flash", "efficient", "math", "chunked")
_HOPPER: dict[str, Any] = {"min_cc": (9, 0), "below_cc": (10, 0)}  # RankingRule keywords
# H200, torch 2.11 + cuDNN 9.19, flash-attn-4 4.0.0b36, bf16; `benchmarks/fa4.py --sections grid`, 2026-12-04:
# FA4's flash_attn_func on (B, S, H, D) against F.sdpa inside sdpa_kernel([CUDNN_ATTENTION]), interleaved rounds,
# B*S = 16,384 tokens, H*D = 2,048; ratios are FA4 / cuDNN TFLOP/s (forward; forward+backward).
_RUN = "H200, bf16, benchmarks/fa4.py grid, 2026-12-04"

RANKING: tuple[RankingRule, ...] = (
    # Short queries: FA4's Python dispatch (~91 us a call against ~19 us for F.sdpa, measured at (1, 8, 128, 64))
    # dominates, and its kernels for one or two tiles lose too.
    RankingRule(
        "cuda", _CUDNN_FIRST, **_HOPPER, seqlen_q=(0, 256),
        evidence=f"{_RUN}: FA4/cuDNN 0.23 / 0.53 at S=128 (B=8, hd128), 0.27 / 0.61 at S=256 causal (B=32), "
                 "0.28-0.38 / 0.53-0.59 for decode (Sq=1, Sk 1k-4k, GQA 32/8)",
    ),
    # Head dim above 128, training: FA4's hd256 backward is slow on Hopper (flash-attention#2878).
    RankingRule(
        "cuda", _CUDNN_FIRST, **_HOPPER, head_dim=(129, 256), training=True,
        evidence=f"{_RUN}: FA4/cuDNN forward+backward 0.88 at hd256, S=4096 causal (forward alone 1.23)",
    ),
    # Training at short sequences: a tie or a loss.
    RankingRule(
        "cuda", _CUDNN_FIRST, **_HOPPER, seqlen_k=(0, 1024), training=True,
        evidence=f"{_RUN}: FA4/cuDNN forward+backward 0.91-1.04 at S=512 and 0.96-1.06 at S=1024 (hd64, hd128)",
    ),
    # Training with GQA up to 2k keys: FA4 lost there.
    RankingRule(
        "cuda", _CUDNN_FIRST, **_HOPPER, seqlen_k=(0, 2048), training=True, gqa=True,
        evidence=f"{_RUN}: FA4/cuDNN forward+backward 0.94 at hd128, 32/8 heads, S=2048 causal",
    ),
    # Forward only, up to 2k keys: cuDNN's forward kernel wins.
    RankingRule(
        "cuda", _CUDNN_FIRST, **_HOPPER, seqlen_k=(0, 2048), training=False,
        evidence=f"{_RUN}: FA4/cuDNN forward 0.55-0.90 at S 512-1024, 0.91-1.01 at S=2048 (hd64, hd128)",
    ),
    RankingRule(
        "cuda", ("fa4", *_SM90_SDPA), **_HOPPER,
        evidence=f"{_RUN}: FA4/cuDNN 0.99-1.16 forward and 1.03-1.24 forward+backward at S 4k-16k, 1.02-1.12 "
                 "forward+backward at S=2048 (hd64, hd128); without FA4 installed: cuDNN ran 1.5-1.8x FLASH and FLASH "
                 "1.7-2.2x EFFICIENT at every shape of benchmarks/RESULTS.md (2026-11-21)",
    ),
    RankingRule(
        "cuda", ("cudnn", "fa4", "flash", "efficient", "math", "chunked"), min_cc=(10, 0),
        evidence="Blackwell and newer: cuDNN first as on Hopper (PyTorch's default there too); FA4 is not measured "
                 "on Blackwell by this project, so it comes second (policy='fa4' or ['fa4', 'cudnn'] prefers it)",
    ),
    RankingRule(
        "cuda", ("flash", "efficient", "cudnn", "math", "chunked"), min_cc=(8, 0), below_cc=(9, 0),
        evidence="PyTorch's own default priority for Ampere/Ada (flash, then efficient); not yet measured here",
    ),
    RankingRule(
        "cuda", ("efficient", "flash", "cudnn", "math", "chunked"), below_cc=(8, 0),
        evidence="only the efficient kernel supports compute capability < 8.0",
    ),
    RankingRule("cuda", ("flash", "efficient", "math", "chunked"), rocm=True,
                evidence="ROCm builds ship flash and efficient through AOTriton; not measured here"),
    RankingRule("cpu", ("flash", "math", "chunked"),
                evidence="PyTorch's CPU flash kernel is O(N) memory; math is O(N^2)"),
)
