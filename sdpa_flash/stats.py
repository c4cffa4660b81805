"""Telemetry: how often each backend ran, and every fallback with its reason and call site.

Cheap enough to stay on: a call on the fast path bumps one counter (``next()`` on an ``itertools.count``, which
is atomic under the GIL and costs tens of nanoseconds); fallbacks, which are rare, also record the caller's
``file:line``. Calls inside ``torch.compile``'d code are decided once, while tracing, and are counted then.
Shadow checks (opt-in, ``SDPA_FLASH_SHADOW``) record how many ran and every mismatch, per backend and inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any

from . import _caches

__all__ = ["FallbackStat", "ShadowMismatch", "ShadowStats", "Stats", "reset_stats", "stats"]

_lock = threading.Lock()
_plans: dict[tuple[str, str, str], itertools.count] = {}  # (backend, route, inputs) -> calls
_fallbacks: dict[tuple[str, str, str, int], itertools.count] = {}  # (backend, reason, file, line) -> calls
_shadow_checks: dict[tuple[str, str], itertools.count] = {}  # (backend, inputs) -> shadow checks run
# (backend, inputs) -> [mismatches, worst error, its bound, worst error / bound, where] (a record of mixed types)
_shadow_bad: dict[tuple[str, str], list[Any]] = {}


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


def record_shadow(backend: str, inputs: str, error: float, bound: float, where: tuple[int, ...]) -> bool:
    """Count one shadow check; with ``error > bound`` also a mismatch. True for the first mismatch of its kind."""
    key = (backend, inputs)
    c = _shadow_checks.get(key)
    if c is None:
        with _lock:
            c = _shadow_checks.setdefault(key, itertools.count())
    next(c)
    if not error > bound:  # NaN where the reference is finite counts: error is then inf
        return False
    ratio = error / bound if bound > 0 else float("inf")
    with _lock:
        entry = _shadow_bad.get(key)
        if entry is None:
            _shadow_bad[key] = [1, error, bound, ratio, where]
            return True
        entry[0] = int(entry[0]) + 1
        if ratio > entry[3]:
            entry[1:] = [error, bound, ratio, where]
    return False


@dataclasses.dataclass(frozen=True)
class ShadowMismatch:
    """Shadow checks of one backend and kind of inputs that disagreed with the float32 math reference.

    Attributes:
        backend: the backend that ran.
        inputs: the inputs' one-line summary (shapes, dtype, device, options).
        count: how many checks failed.
        checks: how many checks ran for this backend and inputs.
        worst_error: the largest absolute error found, at ``worst_index`` (b, h, query row, column) in the
            (B, H, S, D) layout; ``inf`` where the backend gave NaN/inf and the reference did not (or back).
        bound: the tolerance at that element.
    """

    backend: str
    inputs: str
    count: int
    checks: int
    worst_error: float
    bound: float
    worst_index: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShadowStats:
    """Shadow checking so far: ``checks`` run in all, and every ``mismatches`` entry."""

    checks: int = 0
    mismatches: tuple[ShadowMismatch, ...] = ()


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
        shadow: shadow checks run and mismatches found (see :class:`ShadowStats`).
    """

    calls: dict[str, int]
    plans: dict[tuple[str, str, str], int]
    fallbacks: tuple[FallbackStat, ...]
    shadow: ShadowStats = dataclasses.field(default_factory=ShadowStats)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __str__(self) -> str:
        lines = [f"sdpa_flash: {self.total} attention calls"]
        lines += [f"  {name:<10} {n}" for name, n in sorted(self.calls.items(), key=lambda kv: -kv[1])]
        for f in self.fallbacks:
            lines.append(f"  fallback to {f.backend} x{f.count} at {f.call_site}: {f.reason}")
        if self.shadow.checks:
            lines.append(f"  shadow checks: {self.shadow.checks}, mismatches: "
                         f"{sum(m.count for m in self.shadow.mismatches)}")
        for m in self.shadow.mismatches:
            lines.append(f"  shadow mismatch {m.backend} x{m.count}/{m.checks}: worst error {m.worst_error:.3g} "
                         f"(bound {m.bound:.3g}) for {m.inputs}")
        return "\n".join(lines)


def stats() -> Stats:
    """The counts so far (see :class:`Stats`)."""
    with _lock:
        plans = {k: _value(c) for k, c in _plans.items()}
        falls = tuple(FallbackStat(b, r, f, ln, _value(c)) for (b, r, f, ln), c in _fallbacks.items())
        checks = {k: _value(c) for k, c in _shadow_checks.items()}
        bad = tuple(ShadowMismatch(b, i, int(e[0]), checks.get((b, i), 0), float(e[1]), float(e[2]),
                                   tuple(e[4]))
                    for (b, i), e in _shadow_bad.items())
    calls: dict[str, int] = {}
    for (backend, _, _), n in plans.items():
        if n:
            calls[backend] = calls.get(backend, 0) + n
    return Stats(calls, {k: n for k, n in plans.items() if n}, falls, ShadowStats(sum(checks.values()), bad))


def reset_stats() -> None:
    """Start counting afresh (fallback warnings are issued again, once per call site)."""
    with _lock:
        _plans.clear()
        _fallbacks.clear()
        _shadow_checks.clear()
        _shadow_bad.clear()
    _caches.clear_all()  # the per-call caches hold their plan's counter: rebuild them afresh
