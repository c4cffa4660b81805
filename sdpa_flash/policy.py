"""Which policy is in force: named policies, their parsing (arguments and environment), and their scopes.

Policy precedence, highest first: the ``policy=`` argument of a call, the innermost :func:`use_policy` block
(a ``contextvars`` variable, so threads and asyncio tasks do not see each other's blocks), the process-wide
:func:`set_policy`, the ``SDPA_FLASH_POLICY`` / ``SDPA_FLASH_FALLBACK`` environment variables, and ``"auto"``.
What a policy chooses for a call is :func:`sdpa_flash.planner.plan`'s to decide.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .backends import BACKENDS
from .errors import AttentionInputError
from .spec import format_bytes

__all__ = [
    "Policy",
    "PolicyLike",
    "get_policy",
    "resolve_policy",
    "set_policy",
    "use_policy",
]

FALLBACK_MODES = ("warn_once", "error", "silent")
NAMED_POLICIES = ("auto", "flash", "fused", "math")
SHADOW_ACTIONS = ("warn", "raise", "record")


# --------------------------------------------------------------------------------------------- policies
@dataclasses.dataclass(frozen=True)
class Policy:
    """How to choose a backend.

    Attributes:
        name: ``"auto"`` (fastest fused kernel for this GPU, math as the last resort), ``"fused"`` (any fused
            kernel, never math), ``"flash"`` / ``"math"`` / another backend name (exactly that backend), or
            ``"custom"`` for an explicit ordered list.
        backends: the ordered candidates of a ``"custom"`` or single-backend policy; empty for ``"auto"`` and
            ``"fused"``, whose order comes from :func:`~sdpa_flash.planner.ranking`.
        fallback: what happens when the call lands on a fallback — under ``"auto"`` the O(S^2) math backend,
            under a custom list any backend after the first: ``"warn_once"`` (one warning per call site and
            reason), ``"error"`` (raise :class:`BackendUnavailableError`) or ``"silent"``. Single-backend
            policies and ``"fused"`` never fall back: they raise. A call moved on only by denylist entries with
            ``reroute=True`` (see :class:`~sdpa_flash.planner.DenylistEntry`) is not a fallback.
        memory_budget: bytes the O(S^2) math backend may materialise before a non-strict policy prefers the
            exact, memory-bounded ``chunked`` backend; ``None`` means half the device's memory.
        shadow: ``N > 0`` checks 1 in N calls of each backend against the float32 math reference on a sample of
            query rows (see :mod:`sdpa_flash._shadow`); ``0`` (default) is off and costs nothing.
        shadow_action: on a shadow mismatch: ``"warn"`` (once per backend and inputs; the default),
            ``"raise"`` (:class:`~sdpa_flash.errors.ShadowMismatchError`) or ``"record"`` (only in
            :func:`sdpa_flash.stats`). Mismatches are recorded in every mode.
    """

    name: str = "auto"
    backends: tuple[str, ...] = ()
    fallback: str = "warn_once"
    memory_budget: int | None = None
    shadow: int = 0
    shadow_action: str = "warn"

    def __post_init__(self) -> None:
        known = (*NAMED_POLICIES, "custom", *BACKENDS)
        if not isinstance(self.name, str) or self.name not in known:
            raise AttentionInputError(f"Expected Policy.name to be one of {', '.join(dict.fromkeys(known))}, "
                                      f"but got {self.name!r} instead.")
        if not isinstance(self.backends, tuple) or any(b not in BACKENDS for b in self.backends):
            raise AttentionInputError(f"Expected Policy.backends to be a tuple of backend names "
                                      f"({', '.join(sorted(BACKENDS))}), but got {self.backends!r} instead.")
        if self.fallback not in FALLBACK_MODES:
            raise AttentionInputError(f"Expected fallback to be one of {', '.join(FALLBACK_MODES)}, but got "
                                      f"{self.fallback!r} instead.")
        if self.memory_budget is not None and (
                type(self.memory_budget) is not int or self.memory_budget <= 0):
            raise AttentionInputError("Expected memory_budget to be None or a positive number of bytes, but got "
                                      f"{self.memory_budget!r} instead.")
        if type(self.shadow) is not int or self.shadow < 0:
            raise AttentionInputError("Expected shadow to be a whole number N >= 0 (check 1 in N calls; 0 = off), "
                                      f"but got {self.shadow!r} instead.")
        if self.shadow_action not in SHADOW_ACTIONS:
            raise AttentionInputError(f"Expected shadow_action to be one of {', '.join(SHADOW_ACTIONS)}, but got "
                                      f"{self.shadow_action!r} instead.")

    @property
    def strict(self) -> bool:
        """Single-backend policies and ``"fused"`` raise instead of falling back."""
        return self.name == "fused" or len(self.backends) == 1

    def __hash__(self) -> int:  # cached: policies are part of attention()'s per-call cache key
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.name, self.backends, self.fallback, self.memory_budget, self.shadow,
                      self.shadow_action))
            object.__setattr__(self, "_hash", h)
        return h

    def __str__(self) -> str:
        body = self.name if self.name != "custom" else "[" + ", ".join(self.backends) + "]"
        opts = [f"fallback={self.fallback}"] if self.fallback != "warn_once" else []
        if self.memory_budget is not None:
            opts.append(f"memory_budget={format_bytes(self.memory_budget)}")
        if self.shadow:
            opts.append(f"shadow=1/{self.shadow}" + (f" {self.shadow_action}" if self.shadow_action != "warn" else ""))
        return f"{body} ({', '.join(opts)})" if opts else body


PolicyLike = str | Sequence[str] | Policy
"""A :class:`Policy`, a policy or backend name (``"auto"``, ``"flash"``, ``"cudnn"``), a comma-separated
string of backend names (``"cudnn,flash"``) or a sequence of backend names."""


def resolve_policy(
    policy: PolicyLike,
    *,
    fallback: str | None = None,
    memory_budget: int | str | None = None,
    shadow: int | str | None = None,
    shadow_action: str | None = None,
) -> Policy:
    """Turn any :data:`PolicyLike` into a :class:`Policy`; unknown names raise ``AttentionInputError``.

    ``memory_budget`` is bytes (an int) or a string such as ``"8GiB"`` / ``"512MB"``; ``shadow`` is N (check 1
    in N calls, 0 = off) and ``shadow_action`` one of ``"warn"``, ``"raise"``, ``"record"`` (see :class:`Policy`).
    """
    if fallback is not None and fallback not in FALLBACK_MODES:
        raise AttentionInputError(
            f"Expected fallback to be one of {', '.join(FALLBACK_MODES)}, but got {fallback!r} instead."
        )
    budget = parse_bytes(memory_budget, "memory_budget") if memory_budget is not None else None
    extra: dict[str, Any] = {}  # Policy's keyword arguments, of mixed types
    if shadow is not None:
        extra["shadow"] = parse_shadow(shadow)
    if shadow_action is not None:
        extra["shadow_action"] = shadow_action
    if isinstance(policy, Policy):
        changes: dict[str, Any] = dict(extra)
        if fallback is not None:
            changes["fallback"] = fallback
        if budget is not None:
            changes["memory_budget"] = budget
        return _intern(dataclasses.replace(policy, **changes)) if changes else policy
    if isinstance(policy, str):
        names = [p.strip() for p in policy.split(",")] if "," in policy else [policy.strip()]
    elif isinstance(policy, Sequence) and all(isinstance(p, str) for p in policy):
        names = list(policy)
    else:
        raise AttentionInputError(
            "Expected policy to be a Policy, a policy name (auto, flash, fused, math), a backend name or a "
            f"list of backend names, but got {policy!r} instead."
        )
    fb = fallback or "warn_once"
    if len(names) == 1 and names[0] in ("auto", "fused"):
        return _intern(Policy(names[0], (), fb, budget, **extra))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise AttentionInputError(_unknown_policy(policy, unknown))
    if len(set(names)) != len(names):
        raise AttentionInputError(f"Expected each backend at most once in policy, but got {names!r} instead.")
    if len(names) == 1:
        return _intern(Policy(names[0], (names[0],), fb, budget, **extra))
    return _intern(Policy("custom", tuple(names), fb, budget, **extra))


def _unknown_policy(policy: object, unknown: list[str]) -> str:
    """The message for unknown policy names: every name listed once, and the closest for each misspelling."""
    import difflib

    known = list(dict.fromkeys(("auto", "fused", *BACKENDS)))
    msg = (f"Expected policy to be one of {', '.join(known)}, or a comma-separated list of backend names, but got "
           f"{policy!r} instead.")
    for name in unknown:
        if name in NAMED_POLICIES:
            msg += f" {name!r} is a policy of its own, not a backend: it stands alone, not in a list."
            continue
        pool = known if len(unknown) == 1 and isinstance(policy, str) and "," not in policy else list(BACKENDS)
        close = difflib.get_close_matches(name.lower(), pool, n=1)
        if close:
            msg += f" Did you mean {close[0]!r} for {name!r}?"
    return msg


_interned: dict[Policy, Policy] = {}


def _intern(policy: Policy) -> Policy:
    """One object per distinct policy, so attention()'s cache (keyed on the policy's id) is shared by every
    ``use_policy`` block and call that asks for the same policy."""
    return _interned.setdefault(policy, policy)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str, what: str = "size") -> int:
    """``8589934592``, ``"8GiB"``, ``"512 MB"`` -> bytes; anything else raises ``AttentionInputError``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise AttentionInputError(f"Expected {what} to be a positive number of bytes or a size such as '8GiB', "
                              f"but got {value!r} instead.")


def parse_shadow(value: int | str) -> int:
    """``100``, ``"100"`` -> 100 (check 1 in 100 calls); ``0`` / ``"0"`` is off; anything else raises."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if type(value) is int and value >= 0:
        return value
    raise AttentionInputError("Expected shadow (SDPA_FLASH_SHADOW) to be a whole number N >= 0 (check 1 in N "
                              f"calls; 0 = off), but got {value!r} instead.")


_DEFAULT = Policy()
_interned[_DEFAULT] = _DEFAULT
_BLOCK: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("sdpa_flash_policy", default=None)
_process_policy: Policy | None = None
_env_policy: Policy | None = None


def _from_env() -> Policy:
    global _env_policy
    if _env_policy is None:
        raw = os.environ.get("SDPA_FLASH_POLICY", "auto")
        fb = os.environ.get("SDPA_FLASH_FALLBACK")
        mb = os.environ.get("SDPA_FLASH_MEMORY_BUDGET")
        sh = os.environ.get("SDPA_FLASH_SHADOW")
        sa = os.environ.get("SDPA_FLASH_SHADOW_ACTION")
        try:
            _env_policy = resolve_policy(raw or "auto", fallback=fb or None, memory_budget=mb or None,
                                         shadow=sh or None, shadow_action=sa or None)
        except AttentionInputError as exc:
            raise AttentionInputError(
                f"Invalid environment: SDPA_FLASH_POLICY={raw!r} SDPA_FLASH_FALLBACK={fb!r} "
                f"SDPA_FLASH_MEMORY_BUDGET={mb!r} SDPA_FLASH_SHADOW={sh!r} SDPA_FLASH_SHADOW_ACTION={sa!r}: {exc}"
            ) from None
    return _env_policy


def get_policy() -> Policy:
    """The policy in force here: the innermost ``use_policy`` block, else the process-wide one, else the
    environment's, else ``"auto"``."""
    block = _BLOCK.get()
    if block is not None:
        return block
    if _process_policy is not None:
        return _process_policy
    return _from_env()


def set_policy(
    policy: PolicyLike | None,
    *,
    fallback: str | None = None,
    memory_budget: int | str | None = None,
    shadow: int | str | None = None,
    shadow_action: str | None = None,
) -> None:
    """Set (or with ``None``, clear) the process-wide policy. ``use_policy`` blocks still take precedence."""
    global _process_policy
    _process_policy = None if policy is None else resolve_policy(
        policy, fallback=fallback, memory_budget=memory_budget, shadow=shadow, shadow_action=shadow_action)


@contextlib.contextmanager
def use_policy(
    policy: PolicyLike,
    *,
    fallback: str | None = None,
    memory_budget: int | str | None = None,
    shadow: int | str | None = None,
    shadow_action: str | None = None,
) -> Iterator[Policy]:
    """Use ``policy`` for every ``attention()`` call in this block (this thread / asyncio task only).

    Example::

        with sdpa_flash.use_policy("flash"):          # strict: raises if FLASH_ATTENTION cannot run
            out = sdpa_flash.attention(q, k, v)
        with sdpa_flash.use_policy("auto", shadow=100):  # check 1 in 100 calls against the math reference
            out = sdpa_flash.attention(q, k, v)
    """
    resolved = resolve_policy(policy, fallback=fallback, memory_budget=memory_budget, shadow=shadow,
                              shadow_action=shadow_action)
    token = _BLOCK.set(resolved)
    try:
        yield resolved
    finally:
        _BLOCK.reset(token)
