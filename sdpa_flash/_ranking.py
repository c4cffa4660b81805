"""The ranking: which backend ``auto`` tries first, per device and class of call, as data with its evidence.

Rules are tried in order and the first that matches decides (see :class:`sdpa_flash.policy.RankingRule`). A
shape-class rule (head dim, sequence lengths, forward-only or training) is there because a measurement showed
that class ordering differently from its device's general rule; ``benchmarks/fa4_ranking.py`` is the
measurement behind the FlashAttention-4 rules (run on the H200, it prints the table they come from). A backend
that cannot run a call (FA4 not installed, a dtype it lacks) is skipped with its reason, so the order is the
same for every install.
"""

from __future__ import annotations

from .policy import RankingRule

__all__ = ["RANKING"]

_SM90_SDPA = ("cudnn", "flash", "efficient", "math", "chunked")
_FA4_EVIDENCE = ("H200 (sm90), torch 2.11 + cuDNN 9.19, flash-attn-4 4.0.0b36, bf16: FA4 ran 1.09-1.19x cuDNN "
                 "forward and 1.09-1.16x forward+backward at hd64/hd128, S 1k-8k (shared/BASELINE.md, 2026-12-04)")

RANKING: tuple[RankingRule, ...] = (
    # Hopper, forward only, short sequences: cuDNN's forward kernel beat FA4's at S=1024 (hd128, B=16: FA4
    # 0.96-0.98x), and FA4's Python dispatch (~20-25 us a call, flash-attention#2426) weighs on small calls.
    RankingRule(
        "cuda", ("cudnn", "fa4", "flash", "efficient", "math", "chunked"), min_cc=(9, 0), below_cc=(10, 0),
        seqlen_k=(0, 1024), training=False,
        evidence="H200, bf16 hd128 S=1024 B=16 forward: FA4 0.96-0.98x cuDNN (shared/BASELINE.md, 2026-12-04)",
    ),
    RankingRule(
        "cuda", ("fa4", *_SM90_SDPA), min_cc=(9, 0), below_cc=(10, 0),
        evidence=_FA4_EVIDENCE + "; without FA4: cuDNN ran 1.5-1.8x FLASH and FLASH 1.7-2.2x EFFICIENT at every "
                 "shape of benchmarks/RESULTS.md (2026-11-21)",
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
