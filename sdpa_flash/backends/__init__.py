"""The backends — SDPA's kernels and optional ones such as FlashAttention-4 — one module each.

``BACKENDS`` maps a backend's name to its instance.
"""

from __future__ import annotations

from ._base import Backend, Requirements
from .chunked import ChunkedBackend
from .cudnn import CudnnBackend
from .efficient import EfficientBackend
from .fa4 import FA4Backend
from .flash import FlashBackend
from .math import MathBackend

__all__ = ["BACKENDS", "Backend", "Requirements", "get_backend"]

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (FA4Backend(), CudnnBackend(), FlashBackend(), EfficientBackend(), MathBackend(), ChunkedBackend())
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``AttentionInputError`` listing the known names otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        from ..errors import AttentionInputError

        known = ", ".join(sorted(BACKENDS))
        raise AttentionInputError(f"Expected a backend name ({known}), but got {name!r} instead.") from None
