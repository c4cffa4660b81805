"""One registry of the per-process caches, and :func:`clear_all`.

Every cache that holds a decision (plans, capability probes, the per-call closures of ``attention()`` and the
varlen engine, flash-attn compat's decisions) or a counter tied to one (telemetry, shadow-check sampling) is
registered here where it is defined. Anything that changes what those decisions depend on — a denylist entry
added or removed, a backend registered, statistics reset, a kernel found broken at run time — calls
:func:`clear_all`, so no module needs to know which others keep caches. Clearing is cheap and rare; the next call
of each kind plans afresh.

This module imports nothing from the package, so every layer can register with it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["clear_all", "register"]

_clears: dict[str, Callable[[], object]] = {}


def register(name: str, clear: Callable[[], object]) -> None:
    """Have :func:`clear_all` call ``clear()``; ``name`` (``"module.cache"``) makes re-registration idempotent."""
    _clears[name] = clear


def clear_all() -> None:
    """Empty every registered cache (in registration order: lower layers first)."""
    for clear in tuple(_clears.values()):
        clear()
