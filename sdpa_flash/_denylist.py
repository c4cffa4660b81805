"""Built-in denylist: public incidents where a backend gave wrong results, NaNs or crashes.

Each entry is data (see :class:`sdpa_flash.DenylistEntry`) and cites the PyTorch issue it comes from; users add
their own with :func:`sdpa_flash.add_denylist_entry`. An entry only vetoes a backend: the policy then picks the
next one, and ``explain()`` shows the entry as the reason.
"""

from __future__ import annotations

from .policy import DenylistEntry

__all__ = ["BUILTIN_DENYLIST"]

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
)
