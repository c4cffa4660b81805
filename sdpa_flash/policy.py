"""Which backend runs: named policies, the measured ranking, the denylist, and ``plan()``.

``plan(spec, caps, policy)`` is a pure function of three hashable values and is cached on them. It walks the
policy's candidates in order and returns a :class:`Plan` naming the backend that runs, every other backend
with the reasons it did not, and the exact input adaptations (padding, K/V repetition, ...) the chosen kernel
needs. Nothing here touches a torch global flag.

Policy precedence, highest first: the ``policy=`` argument of a call, the innermost :func:`use_policy` block
(a ``contextvars`` variable, so threads and asyncio tasks do not see each other's blocks), the process-wide
:func:`set_policy`, the ``SDPA_FLASH_POLICY`` / ``SDPA_FLASH_FALLBACK`` environment variables, and ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from .backends import BACKENDS
from .backends._base import Prep
from .capability import Capabilities, cudnn_version_tuple
from .errors import AttentionInputError, BackendUnavailableError
from .spec import AttentionSpec

__all__ = [
    "DenylistEntry",
    "Plan",
    "Policy",
    "PolicyLike",
    "RankingRule",
    "add_denylist_entry",
    "denylist",
    "get_policy",
    "plan",
    "ranking",
    "remove_denylist_entry",
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
            ``"fused"``, whose order comes from :func:`ranking`.
        fallback: what happens when the call lands on a fallback — under ``"auto"`` the O(S^2) math backend,
            under a custom list any backend after the first: ``"warn_once"`` (one warning per call site and
            reason), ``"error"`` (raise :class:`BackendUnavailableError`) or ``"silent"``. Single-backend
            policies and ``"fused"`` never fall back: they raise. A call moved on only by denylist entries with
            ``reroute=True`` (see :class:`DenylistEntry`) is not a fallback.
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
            opts.append(f"memory_budget={_fmt_bytes(self.memory_budget)}")
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
    extra: dict[str, object] = {}
    if shadow is not None:
        extra["shadow"] = parse_shadow(shadow)
    if shadow_action is not None:
        extra["shadow_action"] = shadow_action
    if isinstance(policy, Policy):
        changes: dict[str, object] = dict(extra)
        if fallback is not None:
            changes["fallback"] = fallback
        if budget is not None:
            changes["memory_budget"] = budget
        return _intern(dataclasses.replace(policy, **changes)) if changes else policy  # type: ignore[arg-type]
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
        return _intern(Policy(names[0], (), fb, budget, **extra))  # type: ignore[arg-type]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise AttentionInputError(
            f"Expected policy to be one of {', '.join(NAMED_POLICIES)} or backend names "
            f"({', '.join(sorted(BACKENDS))}), but got {policy!r} instead."
        )
    if len(set(names)) != len(names):
        raise AttentionInputError(f"Expected each backend at most once in policy, but got {names!r} instead.")
    if len(names) == 1:
        return _intern(Policy(names[0], (names[0],), fb, budget, **extra))  # type: ignore[arg-type]
    return _intern(Policy("custom", tuple(names), fb, budget, **extra))  # type: ignore[arg-type]


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


def _fmt_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


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


# ---------------------------------------------------------------------------------------------- ranking
@dataclasses.dataclass(frozen=True)
class RankingRule:
    """The preferred backend order for a range of devices — and optionally a class of calls — with its evidence.

    Rules are tried in order; the first that matches the device and the call decides. A rule without a shape
    class (``head_dim``, ``seqlen_q``, ``seqlen_k``, ``training`` all ``None``) is the device's general rule;
    a rule with one carries the measurement that made it differ from the general rule.

    Attributes:
        device_type, min_cc, below_cc, rocm: the devices it applies to.
        order: the backends, fastest first.
        evidence: the measurement it rests on.
        head_dim: inclusive range of ``max(D, Dv)``.
        seqlen_q / seqlen_k: inclusive ranges of the query / key length.
        training: ``True``: calls that need a backward; ``False``: forward-only calls.
        gqa: ``True``: fewer key/value heads than query heads; ``False``: as many.
    """

    device_type: str
    order: tuple[str, ...]
    evidence: str
    min_cc: tuple[int, int] | None = None
    below_cc: tuple[int, int] | None = None
    rocm: bool = False
    head_dim: tuple[int, int] | None = None
    seqlen_q: tuple[int, int] | None = None
    seqlen_k: tuple[int, int] | None = None
    training: bool | None = None
    gqa: bool | None = None

    @property
    def shape_class(self) -> bool:
        """Whether the rule applies to a class of calls rather than to every call on its devices."""
        return (self.head_dim, self.seqlen_q, self.seqlen_k, self.training, self.gqa) != (None,) * 5

    def matches(self, caps: Capabilities, spec: AttentionSpec | None = None) -> bool:
        if caps.device_type != self.device_type or self.rocm != bool(caps.hip_version):
            return False
        cc = caps.compute_capability
        if self.min_cc is not None and (cc is None or cc < self.min_cc):
            return False
        if self.below_cc is not None and (cc is None or cc >= self.below_cc):
            return False
        if not self.shape_class:
            return True
        if spec is None:
            return False

        def within(value: int, bounds: tuple[int, int] | None) -> bool:
            return bounds is None or bounds[0] <= value <= bounds[1]

        return (within(max(spec.head_dim, spec.head_dim_v), self.head_dim) and within(spec.seqlen_q, self.seqlen_q)
                and within(spec.seqlen_k, self.seqlen_k)
                and (self.training is None or self.training == spec.needs_grad)
                and (self.gqa is None or self.gqa == spec.gqa))

    def describe(self) -> str:
        """The shape class in words (empty for a device-wide rule)."""
        bits = []
        if self.head_dim is not None:
            bits.append(f"head dim {self.head_dim[0]}-{self.head_dim[1]}")
        if self.seqlen_q is not None:
            bits.append(f"Sq {self.seqlen_q[0]}-{self.seqlen_q[1]}")
        if self.seqlen_k is not None:
            bits.append(f"Sk {self.seqlen_k[0]}-{self.seqlen_k[1]}")
        if self.training is not None:
            bits.append("training" if self.training else "forward only")
        if self.gqa is not None:
            bits.append("GQA" if self.gqa else "no GQA")
        return ", ".join(bits)


from ._ranking import RANKING  # noqa: E402  (data module; needs RankingRule)


def ranking(caps: Capabilities, spec: AttentionSpec | None = None) -> RankingRule:
    """The ranking rule for ``caps`` — for the call ``spec`` when given (shape-class rules apply), else the
    device's general rule. Unknown devices get a rule that prefers math."""
    for rule in RANKING:
        if rule.matches(caps, spec):
            return rule
    return RankingRule(caps.device_type, ("math", "chunked"),
                       evidence=f"no fused kernels are modelled for {caps.device_type}")


# --------------------------------------------------------------------------------------------- denylist
_DEVICE_TYPES = ("cuda", "cpu", "mps", "xpu")
# backends installed as their own package: the Capabilities field holding its version (DenylistEntry.kernel)
_PACKAGES = {"fa4": "fa4_version"}


@dataclasses.dataclass(frozen=True)
class DenylistEntry:
    """A known-bad configuration: ``backend`` is vetoed where every given condition holds.

    Attributes:
        backend: the vetoed backend's name.
        reason: one line stating the problem, shown in ``explain()`` and errors.
        source: where it is documented (an issue URL or number).
        device_type: the device type it applies to.
        min_cc: lowest compute capability affected, inclusive (``None``: any).
        max_cc: highest compute capability affected, inclusive (``None``: any).
        torch: a PEP 440 specifier of affected torch versions (``"<2.5.1"``), ``None`` for any; nightlies and vendor
            pre-release builds count as the release they lead to.
        cudnn: a specifier of affected cuDNN versions as ``major.minor.patch`` (``">=9.1,<9.3"``).
        kernel: a specifier of affected versions of the backend's own package, for a backend installed as one
            (``fa4``: ``flash-attn-4``, e.g. ``"<=4.0.0b36"``); pre-releases match. ``None`` for any.
        when: an extra condition on the call, e.g. ``lambda s: s.needs_grad and s.head_dim > 128``.
        reroute: the entry moves calls to the next backend without it counting as a fallback (no warning, and no
            error under ``fallback="error"``): for known-bad kernel behaviour on shapes where the next backend is
            exact and the cost is negligible. A policy that names only the vetoed backend still refuses the call,
            with the entry as the reason.
    """

    backend: str
    reason: str
    source: str = ""
    device_type: str = "cuda"
    min_cc: tuple[int, int] | None = None
    max_cc: tuple[int, int] | None = None
    torch: str | None = None
    cudnn: str | None = None
    kernel: str | None = None
    when: Callable[[AttentionSpec], bool] | None = None
    reroute: bool = False

    def __post_init__(self) -> None:  # checked here, so a bad entry fails where it is written, not in plan()
        def fail(field: str, expected: str, value: object) -> AttentionInputError:
            return AttentionInputError(f"Expected DenylistEntry.{field} to be {expected}, but got {value!r} instead.")

        if self.backend not in BACKENDS:
            raise fail("backend", f"one of {', '.join(sorted(BACKENDS))}", self.backend)
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise fail("reason", "a non-empty string", self.reason)
        if not isinstance(self.device_type, str) or self.device_type not in _DEVICE_TYPES:
            raise fail("device_type", f"a device type ({', '.join(_DEVICE_TYPES)})", self.device_type)
        for field in ("min_cc", "max_cc"):
            cc = getattr(self, field)
            if cc is not None and not (isinstance(cc, tuple) and len(cc) == 2
                                       and all(type(x) is int and x >= 0 for x in cc)):
                raise fail(field, "None or a (major, minor) tuple of ints such as (9, 0)", cc)
        if self.kernel is not None and self.backend not in _PACKAGES:
            raise fail("kernel", f"None for {self.backend!r}, which is part of torch (kernel= is for "
                       f"{', '.join(sorted(_PACKAGES))})", self.kernel)
        for field in ("torch", "cudnn", "kernel"):
            text = getattr(self, field)
            if text is not None:
                try:
                    SpecifierSet(text)
                except (InvalidSpecifier, TypeError):
                    raise fail(field, "None or a PEP 440 version specifier such as '>=2.5,<2.6'", text) from None
        if self.when is not None and not callable(self.when):
            raise fail("when", "None or a callable taking an AttentionSpec", self.when)
        if not isinstance(self.reroute, bool):
            raise fail("reroute", "a bool", self.reroute)

    def matches(self, spec: AttentionSpec, caps: Capabilities) -> bool:
        if caps.device_type != self.device_type:
            return False
        cc = caps.compute_capability
        if self.min_cc is not None and (cc is None or cc < self.min_cc):
            return False
        if self.max_cc is not None and (cc is None or cc > self.max_cc):
            return False
        if self.torch is not None and not _version_in(caps.torch_version, self.torch, release=True):
            return False
        if self.cudnn is not None:
            if caps.cudnn_version is None:
                return False
            if not _version_in(".".join(map(str, cudnn_version_tuple(caps.cudnn_version))), self.cudnn):
                return False
        if self.kernel is not None:
            installed = getattr(caps, _PACKAGES[self.backend])
            if installed is None or not _version_in(installed, self.kernel):
                return False
        return self.when is None or bool(self.when(spec))

    def describe(self) -> str:
        return f"denylisted: {self.reason}" + (f" [{self.source}]" if self.source else "")


@functools.lru_cache(maxsize=256)
def _version_in(version: str, specifier: str, release: bool = False) -> bool:
    """``version`` satisfies the PEP 440 ``specifier`` (parsed once per pair: plan() asks for every candidate).
    Pre-releases match (FA4 ships as ``4.0.0b…``). With ``release`` (torch's), the version counts as the release it
    leads to: a nightly ``2.12.0.dev…`` or a vendor build ``2.11.0a0+….nv26.01`` is 2.12.0 / 2.11.0."""
    v = Version(version)
    return SpecifierSet(specifier).contains(Version(v.base_version) if release else v, prereleases=True)


from ._denylist import BUILTIN_DENYLIST  # noqa: E402  (data module; needs DenylistEntry)

_user_denylist: list[DenylistEntry] = []


def denylist() -> tuple[DenylistEntry, ...]:
    """The entries in force: the built-in ones, then those added with :func:`add_denylist_entry`."""
    return BUILTIN_DENYLIST + tuple(_user_denylist)


def denylist_reasons(backend: str, spec: AttentionSpec, caps: Capabilities) -> list[str]:
    """The denylist entries in force that veto ``backend`` for ``spec`` here, described (for the planners beside
    :func:`plan`: the packed varlen kernel and flash-attn compat's paths)."""
    return [e.describe() for e in denylist() if e.backend == backend and e.matches(spec, caps)]


def add_denylist_entry(entry: DenylistEntry) -> None:
    """Veto a backend where ``entry`` matches, from now on (plans are re-made)."""
    if not isinstance(entry, DenylistEntry):
        raise AttentionInputError(f"Expected a sdpa_flash.DenylistEntry, but got {type(entry).__name__} instead.")
    if entry.backend not in BACKENDS:
        raise AttentionInputError(
            f"Expected DenylistEntry.backend to be one of {', '.join(sorted(BACKENDS))}, "
            f"but got {entry.backend!r} instead."
        )
    _user_denylist.append(entry)
    _invalidate()


def remove_denylist_entry(entry: DenylistEntry) -> None:
    """Undo :func:`add_denylist_entry`."""
    if entry not in _user_denylist:
        raise AttentionInputError(f"Expected an entry added with add_denylist_entry(), but got {entry!r} instead "
                                  f"({len(_user_denylist)} user entries are in force).")
    _user_denylist.remove(entry)
    _invalidate()


_invalidation_hooks: list[Callable[[], None]] = []


def _invalidate() -> None:
    _plan.cache_clear()
    for hook in _invalidation_hooks:
        hook()


# ------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for one kind of call, and why.

    Attributes:
        backend: the backend that runs (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``).
        spec: the call's summary.
        caps: the device's capabilities.
        policy: the policy that decided.
        order: the candidates in the order they were considered.
        reasons: for every other backend, why it was not used (unsupported reasons, a denylist entry, or its
            place in the ranking).
        fallback: ``True`` when the call landed on a fallback (see :class:`Policy`); not when it got there only
            because denylist entries with ``reroute=True`` moved it on.
        notes: exact adaptations made for the chosen kernel (padding, K/V repetition, mask materialisation).
        route: ``"direct"`` (the kernel's own aten op, no dispatcher, no global flags) or ``"sdpa"``
            (``torch.nn.functional.scaled_dot_product_attention``, so another PyTorch layer can intercept).
        route_reason: why that route.
        evidence: the ranking's evidence for this device.
        deterministic: the ``torch.use_deterministic_algorithms`` mode the plan honoured: ``"off"`` (not set,
            or no backward is needed), ``"error"`` (backends whose backward is not deterministic were skipped)
            or ``"warn"`` (``warn_only=True``: they may run, with a warning).
    """

    backend: str
    spec: AttentionSpec
    caps: Capabilities
    policy: Policy
    order: tuple[str, ...]
    reasons: Mapping[str, tuple[str, ...]]
    fallback: bool = False
    notes: tuple[str, ...] = ()
    route: str = "direct"
    route_reason: str = "the chosen kernel's aten op is called directly: exact, and no global flags change"
    evidence: str = ""
    deterministic: str = "off"
    prep: Prep = dataclasses.field(default_factory=Prep, repr=False, compare=False)

    def __str__(self) -> str:
        why = "; ".join(f"{name}: {r[0]}" for name, r in self.reasons.items() if r)
        how = BACKENDS[self.backend].DIRECT_LABEL if self.route == "direct" else "F.scaled_dot_product_attention"
        head = f"{self.backend} via {how}"
        if self.fallback:
            head += " [fallback]"
        return f"{head}  ({why})" if why else head

    def explain(self) -> str:
        """A multi-line account: the inputs, the decision, each other backend's reasons, adaptations, route."""
        lines = [
            f"backend: {self.backend}" + ("  [fallback]" if self.fallback else ""),
            f"policy:  {self.policy}",
            f"device:  {self.caps.name} ({self.caps.arch}), torch {self.caps.torch_version}",
            f"inputs:  {self.spec.describe()}",
            f"route:   {self.route} - {self.route_reason}",
        ]
        if self.evidence:
            lines.append(f"ranking: {' > '.join(self.order)} - {self.evidence}")
        for note in self.notes:
            lines.append(f"adapted: {note}")
        for name, why in self.reasons.items():
            lines.append(f"{name}:")
            lines.extend(f"  - {w}" for w in why)
        return "\n".join(lines)


def _math_bytes(spec: AttentionSpec) -> int:
    """What the math backend materialises: scores and probabilities (B, H, Sq, Sk) in at least float32."""
    import torch

    item = max(torch.finfo(spec.dtype).bits // 8, 4)
    copies = 3 if spec.needs_grad else 2
    return copies * spec.batch * spec.heads_q * spec.seqlen_q * spec.seqlen_k * item


def _candidates(policy: Policy, caps: Capabilities, spec: AttentionSpec | None = None
                ) -> tuple[tuple[str, ...], str]:
    rule = ranking(caps, spec)
    evidence = f"{rule.describe()}: {rule.evidence}" if rule.shape_class else rule.evidence
    if policy.name == "auto":
        return rule.order, evidence
    if policy.name == "fused":
        return tuple(b for b in rule.order if BACKENDS[b].fused), evidence
    return policy.backends, ""


DETERMINISTIC_MODES = ("off", "warn", "error")


def deterministic_mode() -> str:
    """``torch.use_deterministic_algorithms`` as :func:`plan` honours it: ``"off"``, ``"warn"`` (set with
    ``warn_only=True``) or ``"error"``."""
    import torch

    if not torch.are_deterministic_algorithms_enabled():
        return "off"
    return "warn" if torch.is_deterministic_algorithms_warn_only_enabled() else "error"


def plan(
    spec: AttentionSpec, caps: Capabilities, policy: Policy = _DEFAULT, *, deterministic: str | None = None
) -> Plan:
    """Decide which backend runs ``spec`` on ``caps`` under ``policy``.

    A pure function of its arguments, cached on them.

    Args:
        spec: the call.
        caps: the device.
        policy: the policy.
        deterministic: the ``torch.use_deterministic_algorithms`` mode to honour when ``spec.needs_grad``:
            ``"off"``, ``"warn"`` or ``"error"`` (see :attr:`Requirements.deterministic_backward`); ``None``
            (default) reads torch's current setting. Calls without a backward are not affected.

    Raises:
        BackendUnavailableError: no backend the policy allows can run it (or the policy's fallback mode is
            ``"error"`` and only a fallback could).
        AttentionInputError: ``deterministic`` is not one of the modes.
    """
    if not spec.needs_grad:
        mode = "off"
    elif deterministic is None:
        mode = deterministic_mode()
    elif deterministic in DETERMINISTIC_MODES:
        mode = deterministic
    else:
        raise AttentionInputError(f"Expected deterministic to be None or one of {', '.join(DETERMINISTIC_MODES)}, "
                                  f"but got {deterministic!r} instead.")
    return _plan(spec, caps, policy, mode)


def _nondeterministic(name: str, caps: Capabilities) -> str | None:
    """Why ``name``'s backward on ``caps`` does not count as deterministic (``None`` when it does)."""
    req = BACKENDS[name].requirements(caps.device_type)
    if req is None or req.deterministic_backward:
        return None
    return "backward is not deterministic" if req.deterministic_backward is False else (
        "backward is not known to be deterministic")


@functools.lru_cache(maxsize=4096)
def _plan(spec: AttentionSpec, caps: Capabilities, policy: Policy, deterministic: str) -> Plan:
    order, evidence = _candidates(policy, caps, spec)
    if spec.batch == 0 or spec.heads_q == 0 or spec.seqlen_q == 0 or spec.seqlen_k == 0:
        note = "zero-size problem: the result is empty (or zeros when there are no keys); nothing to choose"
        prep = BACKENDS["math"].prep(spec, caps.device_type if caps.device_type in BACKENDS["math"].REQUIREMENTS
                                     else "cpu")
        return Plan("math", spec, caps, policy, order, {}, notes=(note,), evidence=evidence, prep=prep,
                    deterministic=deterministic)
    blocked: dict[str, tuple[str, ...]] = {}
    rerouted: set[str] = set()  # blocked by reroute=True denylist entries and nothing else
    chosen: str | None = None
    device = None
    if caps.probed and caps.device_type == "cuda":
        import torch

        device = torch.device("cuda", caps.device_index)
    entries = denylist()
    budget = policy.memory_budget if policy.memory_budget is not None else (
        caps.total_memory // 2 if caps.total_memory else None)
    for name in order:
        backend = BACKENDS[name]
        reasons = backend.not_supported_reasons(spec, caps)
        if name == "math" and not policy.strict and budget is not None and _math_bytes(spec) > budget:
            reasons.append(
                f"would materialise {_fmt_bytes(_math_bytes(spec))} of attention scores, over the memory budget of "
                f"{_fmt_bytes(budget)} (memory_budget= / SDPA_FLASH_MEMORY_BUDGET); the chunked backend computes "
                "the same exactly in blocks")
        if deterministic == "error":
            why_not = _nondeterministic(name, caps)
            if why_not:
                reasons.append(f"{why_not}; torch.use_deterministic_algorithms(True) is set")
        vetoes = [e for e in entries if e.backend == name and e.matches(spec, caps)]
        if vetoes and not reasons and all(e.reroute for e in vetoes):
            rerouted.add(name)
        reasons += [e.describe() for e in vetoes]
        if not reasons and device is not None and backend.TORCH_CHECK:
            reasons = backend.torch_reasons(spec, backend.prep(spec, caps.device_type), device)
        if reasons:
            blocked[name] = tuple(reasons)
        else:
            chosen = name
            break
    if chosen is None:
        raise BackendUnavailableError(
            f"No backend allowed by policy {policy} can run this call on {caps.name or caps.device_type} "
            f"({caps.arch}).", inputs=spec.describe(), reasons=blocked,
        )
    # Reached only because every backend ranked above it was rerouted by denylist entries (reroute=True): known-bad
    # kernel behaviour on calls the next backend runs exactly and cheaply, so not a fallback.
    above = order[:order.index(chosen)]
    was_rerouted = bool(above) and all(name in rerouted for name in above)
    fallback = not was_rerouted and ((policy.name == "auto" and not BACKENDS[chosen].fused) or (
        policy.name == "custom" and chosen != order[0]
    ))
    if fallback and policy.fallback == "error":
        raise BackendUnavailableError(
            f"Policy {policy} would fall back to {chosen!r}, and its fallback mode is 'error'.",
            inputs=spec.describe(), reasons=blocked,
        )
    reasons = dict(blocked)
    if was_rerouted:
        for name in above:
            reasons[name] += (f"the entry has reroute=True: {chosen} runs instead, and that is not a fallback",)
    for name in order[order.index(chosen) + 1:]:
        why = BACKENDS[name].not_supported_reasons(spec, caps)
        reasons[name] = tuple(why) if why else (f"ranked below {chosen} for {caps.arch} by the policy",)
    for name in BACKENDS:
        if name not in reasons and name != chosen:
            why = BACKENDS[name].not_supported_reasons(spec, caps) if policy.name == "auto" else []
            reasons[name] = tuple(why) or (f"not allowed by policy {policy}",)
    prep = BACKENDS[chosen].prep(spec, caps.device_type)
    notes = prep.notes(spec)
    if deterministic == "warn" and _nondeterministic(chosen, caps):
        notes += (f"{_nondeterministic(chosen, caps)}, and torch.use_deterministic_algorithms(True, warn_only=True) "
                  "is set: it runs anyway, with a warning",)
    return Plan(chosen, spec, caps, policy, order, reasons, fallback=fallback, notes=notes,
                route_reason=BACKENDS[chosen].ROUTE_REASON, evidence=evidence, prep=prep, deterministic=deterministic)


plan.cache_clear = _plan.cache_clear  # type: ignore[attr-defined]
