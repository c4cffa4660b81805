"""Telemetry: how often each backend ran, and every fallback with its reason and call site.

Cheap enough to stay on: a call on the fast path bumps one counter (``next()`` on an ``itertools.count``, which
is atomic under the GIL and costs tens of nanoseconds); fallbacks, which are rare, also record the caller's
``file:line``. Calls inside ``torch.compile``'d code are decided once, while tracing, and are counted then.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable

__all__ = ["FallbackStat", "Stats", "reset_stats", "stats"]

_lock = threading.Lock()
_reset_hooks: list[Callable[[], None]] = []
_plans: dict[tuple[str, str, str], itertools.count] = {}  # (backend, route, inputs) -> calls
_fallbacks: dict[tuple[str, str, str, int], itertools.count] = {}  # (backend, reason, file, line) -> calls


def _value(counter: itertools.count) -> int:
    return int(repr(counter)[6:-1])  # "count(5)" -> 5: reading it without consuming a value


def plan_counter(backend: str, route: str, inputs: str) -> itertools.count:
    """The counter shared by every cache entry of one plan."""
    with _lock:
        return _plans.setdefault((backend, route, inputs), itertools.count())


def record_fallback(backend: str, reason: str, filename: str, lineno: int) -> bool:
    """Count a fallback at a call site; True the first time this (site, reason) is seen."""
    key = (backend, reason, filename, lineno)
    c = _fallbacks.get(key)
    if c is None:
        with _lock:
            c = _fallbacks.setdefault(key, itertools.count())
    return next(c) == 0


@dataclasses.dataclass(frozen=True)
class FallbackStat:
    """One fallback: which backend was used instead, why, where, how often."""

    backend: str
    reason: str
    filename: str
    lineno: int
    count: int

    @property
    def call_site(self) -> str:
        return f"{self.filename}:{self.lineno}"


@dataclasses.dataclass(frozen=True)
class Stats:
    """A snapshot of :func:`sdpa_flash.attention` calls since the start (or the last :func:`reset_stats`).

    Attributes:
        calls: backend name -> number of calls.
        plans: (backend, route, inputs summary) -> number of calls.
        fallbacks: every fallback, per backend, reason and call site.
    """

    calls: dict[str, int]
    plans: dict[tuple[str, str, str], int]
    fallbacks: tuple[FallbackStat, ...]

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __str__(self) -> str:
        lines = [f"sdpa_flash: {self.total} attention calls"]
        lines += [f"  {name:<10} {n}" for name, n in sorted(self.calls.items(), key=lambda kv: -kv[1])]
        for f in self.fallbacks:
            lines.append(f"  fallback to {f.backend} x{f.count} at {f.call_site}: {f.reason}")
        return "\n".join(lines)


def stats() -> Stats:
    """The counts so far (see :class:`Stats`)."""
    with _lock:
        plans = {k: _value(c) for k, c in _plans.items()}
        falls = tuple(FallbackStat(b, r, f, ln, _value(c)) for (b, r, f, ln), c in _fallbacks.items())
    calls: dict[str, int] = {}
    for (backend, _, _), n in plans.items():
        if n:
            calls[backend] = calls.get(backend, 0) + n
    return Stats(calls, {k: n for k, n in plans.items() if n}, falls)


def reset_stats() -> None:
    """Start counting afresh (fallback warnings are issued again, once per call site)."""
    with _lock:
        _plans.clear()
        _fallbacks.clear()
    for hook in _reset_hooks:  # attention()'s cache entries hold their plan's counter: rebuild them afresh
        hook()
