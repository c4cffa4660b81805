"""Routes and their counts: how each attention call was computed (:class:`Route`), per path and reason."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ._decision import _Decision

__all__ = ["Route", "RouteStat", "record", "reset_route_counts", "route_counts", "route_stats"]

_lock = threading.Lock()
_counts: dict[tuple[str, str], int] = {}
_recording: contextvars.ContextVar[list[Route] | None] = contextvars.ContextVar("sdpa_flash_hf_record", default=None)


@dataclasses.dataclass(frozen=True)
class Route:
    """How one attention call of a transformers model was computed.

    Attributes:
        path: ``"no_mask"``, ``"varlen"``, ``"dense"`` or ``"packed"`` (see the package docstring).
        reason: why, in one line.
        causal: the causal kind passed to :func:`sdpa_flash.attention` (``None``, ``"top_left"``,
            ``"bottom_right"``).
        layer: the module's ``layer_idx`` when it has one.
        query_shape: ``(B, Hq, Sq, D)``.
        key_shape: ``(B, Hkv, Sk, D)``.
        plan: the plan :func:`sdpa_flash.explain` gives for the call (only from :func:`explain`, else ``None``).
    """

    path: str
    reason: str
    causal: str | None
    layer: int | None
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    plan: Any = None

    def __str__(self) -> str:
        where = f"layer {self.layer}: " if self.layer is not None else ""
        return f"{where}{self.path} (causal={self.causal}) q{self.query_shape} k{self.key_shape}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class RouteStat:
    """How many calls took ``path`` for ``reason``."""

    path: str
    reason: str
    count: int


def route_counts() -> dict[str, int]:
    """Calls per path (``"varlen"``, ``"dense"``, ...) since the start or :func:`reset_route_counts`.

    Only calls that reached sdpa_flash are counted: ``{}`` after a forward pass means the model's attention did not
    run here. :func:`check` says why (most often: another model was built from the same config object, which
    switched this one's ``attn_implementation``).
    """
    out: dict[str, int] = {}
    with _lock:
        for (path, _), n in _counts.items():
            out[path] = out.get(path, 0) + n
    return out


def route_stats() -> list[RouteStat]:
    """Calls per path and reason, most frequent first."""
    with _lock:
        items = list(_counts.items())
    return [RouteStat(p, r, n) for (p, r), n in sorted(items, key=lambda kv: -kv[1])]


def reset_route_counts() -> None:
    """Start counting afresh."""
    with _lock:
        _counts.clear()


@contextlib.contextmanager
def record() -> Iterator[list[Route]]:
    """Collect the :class:`Route` of every attention call made in this block (this thread / task only).

    Example:
        >>> with record() as routes:                      # doctest: +SKIP
        ...     model(input_ids, attention_mask=mask)
        >>> {r.path for r in routes}                      # doctest: +SKIP
        {'varlen'}
    """
    routes: list[Route] = []
    token = _recording.set(routes)
    try:
        yield routes
    finally:
        _recording.reset(token)


def _count(module: Any, query: torch.Tensor, key: torch.Tensor, d: _Decision) -> None:
    k = (d.path, d.reason)
    with _lock:
        _counts[k] = _counts.get(k, 0) + 1
    routes = _recording.get()
    if routes is not None:
        routes.append(Route(d.path, d.reason, d.causal, getattr(module, "layer_idx", None), tuple(query.shape),
                            tuple(key.shape)))
