"""Built-in denylist: public incidents where a backend gave wrong results, NaNs or crashes.

Each entry is data (see :class:`sdpa_flash.DenylistEntry`) and cites the PyTorch issue it comes from; users add
their own with :func:`sdpa_flash.add_denylist_entry`. An entry only vetoes a backend: the policy then picks the
next one, and ``explain()`` shows the entry as the reason. Under ``"auto"`` that counts as a fallback (with its
warning) unless the entry has ``reroute=True``: known-bad kernel behaviour on calls the next backend runs exactly and
at negligible cost.
"""

from __future__ import annotations

import torch

from ._rules import DenylistEntry
from .spec import AttentionSpec

__all__ = ["BUILTIN_DENYLIST"]


def _cpu_flash_zeroes_nan_rows(s: AttentionSpec) -> bool:
    """pytorch/pytorch#141128, as measured by ``benchmarks/cpu_flash_nan_probe.py`` on torch 2.11.0, 2.13.0 and
    2.14.1 (AVX-512): without an ``attn_mask`` the CPU flash kernel reduces a key block shorter than one SIMD vector
    in a scalar loop that skips NaN, so a query row all of whose visible scores are NaN gives 0 instead of NaN.
    Affected: no mask; causal off or top-left (bottom-right with ``Sq != Sk`` reaches the kernel as a mask); fewer
    keys than one AVX-512 vector holds: 16 in float32, bfloat16 and float16 (they reduce in float32), 8 in float64.
    AVX2 vectors are half as wide (8 and 4), so this range covers AVX2 CPUs too. Head dim, query length and batch
    make no difference. (torch 2.5.1 zeroed such rows at every key length; it is below the supported floor.)
    ``test_cpu_flash_nan_canary`` in ``tests/test_numerics.py`` checks on every run that the installed torch's
    kernel misbehaves only where this holds, and says so when a release no longer does."""
    limit = 8 if s.dtype == torch.float64 else 16
    return s.mask is None and s.effective_causal != "bottom_right" and s.seqlen_k < limit


def _fa4_sm90_dq_tail(s: AttentionSpec) -> bool:
    """Dao-AILab/flash-attention#2896 (open as of FA4 4.0.0b36): on sm90 FA4's backward kernel rounds the head dim
    up to a multiple of 16 where its interface allocates and reads back the dQ accumulator at a multiple of 32, so
    for head dims whose multiple of 16 is an odd one (<= 128: above that the kernel rounds to 64), the accumulator's
    tail is never written and dQ comes back wrong (with GQA/MQA, whose dK/dV go through accumulators too, flash-attn's
    suite saw dK and dV wrong as well; the forward is right). Measured on the H200 with
    ``benchmarks/fa4_bwd_head_dims.py`` (4.0.0b36, bf16, causal and not): dQ off by 0.96-1.70 (PyTorch's own error
    0.003-0.008) at head dims 16, 40, 48, 72, 80; 104 and 112 wrong causal and failing to compile otherwise; 24, 32,
    56, 64, 88, 96, 120, 128, 160, 192, 256 right. The head dim is the one the kernel sees (sdpa_flash pads to a
    multiple of 8)."""
    d = -(-s.head_dim // 8) * 8
    return s.needs_grad and d <= 128 and -(-d // 16) * 16 % 32 == 16


BUILTIN_DENYLIST: tuple[DenylistEntry, ...] = (
    DenylistEntry(
        "cudnn",
        "cuDNN attention training on torch 2.5.0 diverged (loss explosion / NaN gradients; output strides did "
        "not follow the query's for non-(B, H, S, D) layouts)",
        source="pytorch/pytorch#139298, pytorch/pytorch#138340",
        torch="==2.5.0",
        when=lambda s: s.needs_grad,
    ),
    DenylistEntry(
        "cudnn",
        "cuDNN attention with a sequence of length 1 raised a cuDNN Frontend error on torch 2.5",
        source="pytorch/pytorch#138529",
        torch="<2.6",
        when=lambda s: s.seqlen_q == 1 or s.seqlen_k == 1,
    ),
    DenylistEntry(
        "cudnn",
        "intermittent NaN in the query gradient from cuDNN attention on sm90 with torch 2.9.0 (fixed in 2.9.1 by a "
        "cuDNN frontend update)",
        source="pytorch/pytorch#166211",
        min_cc=(9, 0),
        max_cc=(9, 0),
        torch="==2.9.0",
        when=lambda s: s.needs_grad,
    ),
    DenylistEntry(
        "cudnn",
        "illegal memory access in cuDNN attention's backward with cuDNN <= 9.15.0 when seqlen_q is not a "
        "multiple of 128",
        source="pytorch/pytorch#169849",
        cudnn="<=9.15.0",
        when=lambda s: s.needs_grad and s.seqlen_q % 128 != 0,
    ),
    DenylistEntry(
        "cudnn",
        "cuDNN attention's backward returned NaN query gradients on H100/H200 with an explicit attn_mask when a "
        "sequence length is 64 mod 128",
        source="pytorch/pytorch#196678",
        min_cc=(9, 0),
        max_cc=(9, 0),
        torch=">=2.11",
        when=lambda s: s.needs_grad and s.mask is not None and (s.seqlen_q % 128 == 64 or s.seqlen_k % 128 == 64),
    ),
    DenylistEntry(
        "cudnn",
        "cuDNN attention silently corrupted generation on B200 (sm100) for GQA with fewer than 8 key/value heads",
        source="pytorch/pytorch#193893",
        min_cc=(10, 0),
        max_cc=(10, 0),
        torch=">=2.11",
        when=lambda s: s.gqa and s.heads_kv < 8,
    ),
    DenylistEntry(
        "flash",
        "PyTorch's CPU flash kernel gives 0 instead of NaN for a query row whose visible scores are all NaN when "
        "there is no attn_mask and fewer keys than one SIMD vector (16; 8 in float64): the NaN would vanish "
        "silently. These calls are tiny, and math keeps the NaN",
        source="pytorch/pytorch#141128",
        device_type="cpu",
        torch=">=2.11",  # every supported release (the floor); measured still there in 2.14.1
        when=_cpu_flash_zeroes_nan_rows,
        reroute=True,  # math is exact here and the calls are tiny: not a fallback, no warning
    ),
    DenylistEntry(
        "fa4",
        "FlashAttention-4's backward on Hopper returns a wrong dQ for head dims whose multiple of 16 is an odd "
        "one (8, 16, 40, 48, 72, 80, 104, 112): its kernel and its dQ accumulator disagree on the padding",
        source="Dao-AILab/flash-attention#2896",
        min_cc=(9, 0),
        max_cc=(9, 0),
        kernel="<4.1",  # every supported release: measured in 4.0.0b36, the fix is not merged
        when=_fa4_sm90_dq_tail,
        reroute=True,  # cuDNN / flash run these exactly, at most ~1.2x slower at long sequences: no warning
    ),
)
