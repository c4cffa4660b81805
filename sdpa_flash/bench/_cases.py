"""What a benchmark measures: :class:`Case` (one attention problem), the FLOP convention, the presets' case lists,
splitting a case list into parts, and a rough cost model used for ``--estimate``, ``--part`` and progress ETAs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

__all__ = [
    "DTYPES",
    "MODES",
    "Case",
    "curves_cases",
    "flex_cases",
    "grid_cases",
    "memory_cases",
    "parse_dtype",
    "quick_cases",
    "split_parts",
    "sweep_cases",
    "tokens_rule_case",
]

MODES: tuple[str, ...] = ("fwd", "bwd", "fwdbwd")
"""Forward, backward (on a retained forward graph) and forward+backward."""

MODE_FLOPS: dict[str, float] = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
"""FLOPs of each mode as a multiple of the forward's (flash-attention convention)."""

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def parse_dtype(name: str) -> str:
    """``"bf16"`` / ``"bfloat16"`` -> ``"bfloat16"``; unknown names raise ``ValueError``."""
    try:
        return str(DTYPES[name.strip().lower()]).removeprefix("torch.")
    except KeyError:
        raise ValueError(f"Expected a dtype among {', '.join(sorted(DTYPES))}, but got {name!r} instead.") from None


@dataclasses.dataclass(frozen=True)
class Case:
    """One dense attention problem: query ``(B, H, S, D)``, key/value ``(B, Hkv, S, D)``.

    Attributes:
        batch: B.
        heads: query heads H.
        seqlen: S (query and key length).
        head_dim: D.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        causal: top-left causal masking.
        kv_heads: key/value heads (GQA when fewer than ``heads``); ``None`` means ``heads``.
    """

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False
    kv_heads: int | None = None

    @property
    def hkv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        """``"hd128 S=4096 B=4 H=16 bf16 causal"`` (``GQA 16/4`` appended for GQA)."""
        s = (f"hd{self.head_dim} S={self.seqlen} B={self.batch} H={self.heads} "
             f"{_SHORT.get(self.dtype, self.dtype)}{' causal' if self.causal else ''}")
        return s + (f" GQA {self.heads}/{self.hkv}" if self.hkv != self.heads else "")

    @property
    def short(self) -> str:
        """``"hd128 S=4k causal"``: the label without batch, heads and dtype."""
        s = self.seqlen
        sl = f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)
        return f"hd{self.head_dim} S={sl}{' causal' if self.causal else ''}"

    def flops(self, mode: str = "fwd") -> float:
        """Flash-attention convention: forward ``4·B·H·S²·D``, halved when causal; backward 2.5x, fwd+bwd 3.5x."""
        f = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        return f / (2 if self.causal else 1) * MODE_FLOPS[mode]

    def input_bytes(self) -> int:
        """Bytes of q, k, v and the output gradient."""
        item = torch.finfo(self.torch_dtype).bits // 8
        return item * self.batch * self.head_dim * self.seqlen * (2 * self.heads + 2 * self.hkv)

    def score_bytes(self) -> int:
        """Bytes of one float32 ``(B, H, S, S)`` score matrix: what O(S²) paths materialise (at least once)."""
        return 4 * self.batch * self.heads * self.seqlen * self.seqlen

    def as_dict(self) -> dict[str, object]:
        return {"b": self.batch, "h": self.heads, "h_kv": self.hkv, "s": self.seqlen, "d": self.head_dim,
                "dtype": self.dtype, "causal": self.causal}


def tokens_rule_case(seqlen: int, head_dim: int, *, tokens: int, hd_product: int, dtype: str, causal: bool,
                     kv_heads: int | None = None) -> Case:
    """The BASELINE rule: ``B·S = tokens`` (at least one sequence) and ``H·D = hd_product``."""
    return Case(max(1, tokens // seqlen), max(1, hd_product // head_dim), seqlen, head_dim, dtype, causal, kv_heads)


def quick_cases(device_type: str) -> list[Case]:
    """Small problems, one of them GQA: the CI smoke test (CPU, float32) or a first look on a GPU (bf16)."""
    if device_type == "cuda":
        return [Case(4, 16, 1024, 64, "bfloat16", False), Case(2, 16, 2048, 128, "bfloat16", True),
                Case(2, 16, 1024, 128, "bfloat16", True, kv_heads=4)]
    return [Case(2, 4, 128, 32, "float32", False), Case(1, 4, 384, 64, "float32", True),
            Case(1, 8, 256, 64, "float32", True, kv_heads=2)]


_GRID = [(64, 512, False), (64, 16384, False), (128, 512, False), (128, 4096, False), (128, 16384, False),
         (128, 16384, True), (64, 4096, True), (128, 1024, True)]


def grid_cases(device_type: str) -> list[Case]:
    """The BASELINE grid: B·S = 16,384 tokens, H·D = 2,048, bf16 (CPU: 2,048 tokens, H·D = 256, float32)."""
    if device_type == "cuda":
        return [tokens_rule_case(s, d, tokens=16384, hd_product=2048, dtype="bfloat16", causal=c)
                for d, s, c in _GRID]
    return [tokens_rule_case(s, d, tokens=2048, hd_product=256, dtype="float32", causal=c)
            for d, s, c in ((32, 256, False), (64, 512, False), (64, 1024, True), (32, 1024, True))]


def sweep_cases(device_type: str) -> list[Case]:
    """The 80-configuration sweep: S = 128 … 65,536 (10), D = 16, 32, 64, 128, bf16 and fp32, causal.

    B·S = max(16,384, S) tokens and H·D = 2,048, as in the grid. On the CPU: S = 128 … 2,048 (40 configurations,
    2,048 tokens, H·D = 256).
    """
    if device_type == "cuda":
        seqs, tokens, hd = [128 * 2**i for i in range(10)], 16384, 2048
    else:
        seqs, tokens, hd = [128 * 2**i for i in range(5)], 2048, 256
    return [tokens_rule_case(s, d, tokens=tokens, hd_product=hd, dtype=dt, causal=True)
            for dt in ("bfloat16", "float32") for d in (16, 32, 64, 128) for s in seqs]


def curves_cases(device_type: str) -> list[Case]:
    """TFLOP/s-vs-S curves for the plots: bf16, D = 64 and 128, causal and not, S = 512 … 32,768 (28 configs)."""
    if device_type == "cuda":
        seqs, tokens, hd, dt = [512 * 2**i for i in range(7)], 16384, 2048, "bfloat16"
    else:
        seqs, tokens, hd, dt = [128 * 2**i for i in range(4)], 2048, 256, "float32"
    return [tokens_rule_case(s, d, tokens=tokens, hd_product=hd, dtype=dt, causal=c)
            for c in (False, True) for d in (64, 128) for s in seqs]


def memory_cases(device_type: str) -> list[Case]:
    """Long sequences for peak memory: B=1, H=16, D=128, bf16, causal, S = 1k, 4k, 16k, 32k, 64k, 128k
    (CPU: 256 … 2,048, float32)."""
    if device_type == "cuda":
        return [Case(1, 16, s * 1024, 128, "bfloat16", True) for s in (1, 4, 16, 32, 64, 128)]
    return [Case(1, 4, 256 * 2**i, 64, "float32", True) for i in range(4)]


def flex_cases(device_type: str) -> list[Case]:
    """Three grid shapes for FlexAttention side by side (each shape costs a compile)."""
    if device_type == "cuda":
        return [tokens_rule_case(s, d, tokens=16384, hd_product=2048, dtype="bfloat16", causal=c)
                for d, s, c in ((128, 4096, True), (128, 16384, True), (64, 16384, False))]
    return [Case(1, 4, 256, 64, "float32", True)]


# ------------------------------------------------------------------------------------------- cost model
# Guesses for an H200 (BASELINE.md, 2026-11-21), used only to balance --part splits and to print estimates;
# nothing reported is derived from them.
_ASSUMED_TFLOPS = {
    ("cudnn", "bfloat16"): 500.0, ("flash", "bfloat16"): 300.0, ("efficient", "bfloat16"): 140.0,
    ("math", "bfloat16"): 20.0, ("chunked", "bfloat16"): 60.0, ("flex", "bfloat16"): 350.0,
    ("naive", "bfloat16"): 20.0, ("efficient", "float32"): 25.0, ("math", "float32"): 15.0,
    ("chunked", "float32"): 15.0, ("flex", "float32"): 25.0, ("naive", "float32"): 15.0,
    ("fa4", "bfloat16"): 550.0,
}
_GPU_MEMORY = 140 * 2**30
_FLEX_COMPILE_S = 15.0


def _kernel_for(path: str, case: Case) -> str | None:
    """The kernel a path would run on an sm90 GPU, or ``None`` when it cannot run there (cost ~0)."""
    dt = "float16" if case.dtype == "float16" else case.dtype
    dt = "bfloat16" if dt == "float16" else dt
    best = "cudnn" if dt == "bfloat16" else "efficient"
    if path in ("sdpa", "attention(auto)", "attention(fused)", "compat"):
        return best
    for name in ("cudnn", "flash", "efficient", "math", "chunked", "fa4"):
        if path in (f"sdpa[{name}]", f"attention({name})"):
            if name in ("cudnn", "flash", "fa4") and dt == "float32":
                return None
            return name
    if path in ("flex", "naive"):
        return path
    return best


def estimate_seconds(case: Case, paths: Sequence[str], modes: Sequence[str], *, rounds: int = 15,
                     budget_s: float = 1.5, device_type: str = "cuda", max_call_s: float = 15.0) -> float:
    """A rough wall-clock estimate for one case on an H200 (CPU: a generic 0.05 TFLOP/s machine)."""
    total = 0.5
    dt = "bfloat16" if case.dtype == "float16" else case.dtype
    for path in paths:
        kernel = _kernel_for(path, case)
        if kernel is None:
            continue
        if kernel in ("math", "naive") and 3 * case.score_bytes() > _GPU_MEMORY:
            total += 0.2  # fails fast with an out-of-memory error
            continue
        tf = _ASSUMED_TFLOPS.get((kernel, dt), 20.0) if device_type == "cuda" else 0.05
        for mode in modes:
            call = max(case.flops(mode) / (tf * 1e12), 2e-5)
            if call > max_call_s:  # checked once, one warm-up call, then reported too slow
                total += 2 * call
                continue
            sample = max(call, 0.002)
            n_rounds = max(3, min(rounds, int(budget_s / sample)))
            total += 0.05 + call * 4 + sample * n_rounds
        if kernel == "flex" and device_type == "cuda":
            total += _FLEX_COMPILE_S * (2 if any(m != "fwd" for m in modes) else 1)
    return total


def split_parts(cases: Sequence[Case], part: int, parts: int, cost: dict[Case, float]) -> list[Case]:
    """Part ``part`` (1-based) of ``parts``: longest-processing-time-first over the estimated costs, so the parts
    take about the same time; each case lands in exactly one part, and a part keeps the input order."""
    if not 1 <= part <= parts:
        raise ValueError(f"Expected a part between 1 and {parts}, but got {part} instead.")
    loads = [0.0] * parts
    owner: dict[int, int] = {}
    for i in sorted(range(len(cases)), key=lambda i: (-cost.get(cases[i], 0.0), i)):
        p = min(range(parts), key=lambda j: (loads[j], j))
        owner[i] = p
        loads[p] += cost.get(cases[i], 0.0)
    return [c for i, c in enumerate(cases) if owner[i] == part - 1]


def human_seconds(s: float) -> str:
    """``75.3`` -> ``"1:15"``; ``4000`` -> ``"1:06:40"``."""
    s = max(0, math.ceil(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
