"""``explain_flash_attn``: the path a flash-attn call would take, from the entry points' own preparation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _common as c
from ._call import Call
from ._interface import (
    _prepare_func,
    _prepare_kvpacked,
    _prepare_qkvpacked,
    _prepare_varlen,
    _prepare_varlen_kvpacked,
    _prepare_varlen_qkvpacked,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from ._kvcache import _prepare_kvcache, flash_attn_with_kvcache
from ._plan import CompatPlan

__all__ = ["explain_flash_attn"]


def explain_flash_attn(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CompatPlan:
    """The :class:`~sdpa_flash.compat.CompatPlan` that ``fn(*args, **kwargs)`` would follow, without running it.

    ``fn`` is one of this module's flash-attn functions (or :func:`~sdpa_flash.compat.flash_attn_with_kvcache`,
    whose cache is then left untouched). Raises what the call would raise for invalid arguments.

    Example:
        >>> q = torch.randn(1, 64, 4, 32)
        >>> str(explain_flash_attn(flash_attn_func, q, q, q, window_size=(16, 0))).split()[0]
        'masked'
    """
    prep: dict[Any, Callable[..., Call]] = {
        flash_attn_func: _prepare_func,
        flash_attn_qkvpacked_func: _prepare_qkvpacked,
        flash_attn_kvpacked_func: _prepare_kvpacked,
        flash_attn_varlen_func: _prepare_varlen,
        flash_attn_varlen_qkvpacked_func: _prepare_varlen_qkvpacked,
        flash_attn_varlen_kvpacked_func: _prepare_varlen_kvpacked,
        flash_attn_with_kvcache: _prepare_kvcache,
    }
    if fn not in prep:
        names = ", ".join(sorted(f.__name__ for f in prep))
        got = getattr(fn, "__name__", type(fn).__name__)
        raise c.fail(f"Expected fn to be one of {names}, but got {got!r} instead.")
    return prep[fn](*args, **kwargs).plan

