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

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .backends import BACKENDS
from .backends._base import Prep
from .capability import Capabilities
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
            policies and ``"fused"`` never fall back: they raise.
        memory_budget: bytes the O(S^2) math backend may materialise before a non-strict policy prefers the
            exact, memory-bounded ``chunked`` backend; ``None`` means half the device's memory.
    """

    name: str = "auto"
    backends: tuple[str, ...] = ()
    fallback: str = "warn_once"
    memory_budget: int | None = None

    @property
    def strict(self) -> bool:
        """Single-backend policies and ``"fused"`` raise instead of falling back."""
        return self.name == "fused" or len(self.backends) == 1

    def __hash__(self) -> int:  # cached: policies are part of attention()'s per-call cache key
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.name, self.backends, self.fallback, self.memory_budget))
            object.__setattr__(self, "_hash", h)
        return h

    def __str__(self) -> str:
        body = self.name if self.name != "custom" else "[" + ", ".join(self.backends) + "]"
        opts = [f"fallback={self.fallback}"] if self.fallback != "warn_once" else []
        if self.memory_budget is not None:
            opts.append(f"memory_budget={_fmt_bytes(self.memory_budget)}")
        return f"{body} ({', '.join(opts)})" if opts else body


PolicyLike = str | Sequence[str] | Policy
"""A :class:`Policy`, a policy or backend name (``"auto"``, ``"flash"``, ``"cudnn"``), a comma-separated
string of backend names (``"cudnn,flash"``) or a sequence of backend names."""


def resolve_policy(
    policy: PolicyLike, *, fallback: str | None = None, memory_budget: int | str | None = None
) -> Policy:
    """Turn any :data:`PolicyLike` into a :class:`Policy`; unknown names raise ``AttentionInputError``.

    ``memory_budget`` is bytes (an int) or a string such as ``"8GiB"`` / ``"512MB"``.
    """
    if fallback is not None and fallback not in FALLBACK_MODES:
        raise AttentionInputError(
            f"Expected fallback to be one of {', '.join(FALLBACK_MODES)}, but got {fallback!r} instead."
        )
    budget = parse_bytes(memory_budget, "memory_budget") if memory_budget is not None else None
    if isinstance(policy, Policy):
        changes: dict[str, object] = {}
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
        return _intern(Policy(names[0], (), fb, budget))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise AttentionInputError(
            f"Expected policy to be one of {', '.join(NAMED_POLICIES)} or backend names "
            f"({', '.join(sorted(BACKENDS))}), but got {policy!r} instead."
        )
    if len(set(names)) != len(names):
        raise AttentionInputError(f"Expected each backend at most once in policy, but got {names!r} instead.")
    if len(names) == 1:
        return _intern(Policy(names[0], (names[0],), fb, budget))
    return _intern(Policy("custom", tuple(names), fb, budget))


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
        try:
            _env_policy = resolve_policy(raw or "auto", fallback=fb or None, memory_budget=mb or None)
        except AttentionInputError as exc:
            raise AttentionInputError(
                f"Invalid environment: SDPA_FLASH_POLICY={raw!r} SDPA_FLASH_FALLBACK={fb!r} "
                f"SDPA_FLASH_MEMORY_BUDGET={mb!r}: {exc}"
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
    policy: PolicyLike | None, *, fallback: str | None = None, memory_budget: int | str | None = None
) -> None:
    """Set (or with ``None``, clear) the process-wide policy. ``use_policy`` blocks still take precedence."""
    global _process_policy
    _process_policy = None if policy is None else resolve_policy(
        policy, fallback=fallback, memory_budget=memory_budget)


@contextlib.contextmanager
def use_policy(
    policy: PolicyLike, *, fallback: str | None = None, memory_budget: int | str | None = None
) -> Iterator[Policy]:
    """Use ``policy`` for every ``attention()`` call in this block (this thread / asyncio task only).

    Example::

        with sdpa_flash.use_policy("flash"):          # strict: raises if FLASH_ATTENTION cannot run
            out = sdpa_flash.attention(q, k, v)
    """
    resolved = resolve_policy(policy, fallback=fallback, memory_budget=memory_budget)
    token = _BLOCK.set(resolved)
    try:
        yield resolved
    finally:
        _BLOCK.reset(token)


# ---------------------------------------------------------------------------------------------- ranking
@dataclasses.dataclass(frozen=True)
class RankingRule:
    """The preferred backend order for a range of devices, with the evidence it rests on."""

    device_type: str
    order: tuple[str, ...]
    evidence: str
    min_cc: tuple[int, int] | None = None
    below_cc: tuple[int, int] | None = None
    rocm: bool = False

    def matches(self, caps: Capabilities) -> bool:
        if caps.device_type != self.device_type or self.rocm != bool(caps.hip_version):
            return False
        cc = caps.compute_capability
        if self.min_cc is not None and (cc is None or cc < self.min_cc):
            return False
        return not (self.below_cc is not None and (cc is None or cc >= self.below_cc))


RANKING: tuple[RankingRule, ...] = (
    RankingRule(
        "cuda", ("cudnn", "flash", "efficient", "math", "chunked"), min_cc=(9, 0),
        evidence="measured on an H200 (sm90), torch 2.11 + cuDNN 9.19: cuDNN ran 1.5-1.8x FLASH and FLASH "
                 "1.7-2.2x EFFICIENT at every shape of benchmarks/RESULTS.md (2026-11-21)",
    ),
    RankingRule(
        "cuda", ("flash", "efficient", "cudnn", "math", "chunked"), min_cc=(8, 0), below_cc=(9, 0),
        evidence="PyTorch's own default priority for Ampere/Ada (flash, then efficient); not yet measured here",
    ),
    RankingRule(
        "cuda", ("efficient", "flash", "cudnn", "math", "chunked"), below_cc=(8, 0),
        evidence="only the efficient kernel supports compute capability < 8.0",
    ),
    RankingRule("cuda", ("flash", "efficient", "math", "chunked"), rocm=True,
                evidence="ROCm builds ship flash and efficient through AOTriton; not measured here"),
    RankingRule("cpu", ("flash", "math", "chunked"),
                evidence="PyTorch's CPU flash kernel is O(N) memory; math is O(N^2)"),
)


def ranking(caps: Capabilities) -> RankingRule:
    """The ranking rule for ``caps`` (the fallback rule for unknown devices prefers math)."""
    for rule in RANKING:
        if rule.matches(caps):
            return rule
    return RankingRule(caps.device_type, ("math", "chunked"),
                       evidence=f"no fused kernels are modelled for {caps.device_type}")


# --------------------------------------------------------------------------------------------- denylist
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
        torch: a PEP 440 specifier of affected torch versions (``"<2.5.1"``), ``None`` for any.
        cudnn: a specifier of affected cuDNN versions as ``major.minor.patch`` (``">=9.1,<9.3"``).
        when: an extra condition on the call, e.g. ``lambda s: s.needs_grad and s.head_dim > 128``.
    """

    backend: str
    reason: str
    source: str = ""
    device_type: str = "cuda"
    min_cc: tuple[int, int] | None = None
    max_cc: tuple[int, int] | None = None
    torch: str | None = None
    cudnn: str | None = None
    when: Callable[[AttentionSpec], bool] | None = None

    def matches(self, spec: AttentionSpec, caps: Capabilities) -> bool:
        if caps.device_type != self.device_type:
            return False
        cc = caps.compute_capability
        if self.min_cc is not None and (cc is None or cc < self.min_cc):
            return False
        if self.max_cc is not None and (cc is None or cc > self.max_cc):
            return False
        if self.torch is not None and Version(caps.torch_version) not in SpecifierSet(self.torch):
            return False
        if self.cudnn is not None:
            if caps.cudnn_version is None:
                return False
            v = caps.cudnn_version
            if Version(f"{v // 10000}.{v // 100 % 100}.{v % 100}") not in SpecifierSet(self.cudnn):
                return False
        return self.when is None or bool(self.when(spec))

    def describe(self) -> str:
        return f"denylisted: {self.reason}" + (f" [{self.source}]" if self.source else "")


from ._denylist import BUILTIN_DENYLIST  # noqa: E402  (data module; needs DenylistEntry)

_user_denylist: list[DenylistEntry] = []


def denylist() -> tuple[DenylistEntry, ...]:
    """The entries in force: the built-in ones, then those added with :func:`add_denylist_entry`."""
    return BUILTIN_DENYLIST + tuple(_user_denylist)


def add_denylist_entry(entry: DenylistEntry) -> None:
    """Veto a backend where ``entry`` matches, from now on (plans are re-made)."""
    if entry.backend not in BACKENDS:
        raise AttentionInputError(
            f"Expected DenylistEntry.backend to be one of {', '.join(sorted(BACKENDS))}, "
            f"but got {entry.backend!r} instead."
        )
    _user_denylist.append(entry)
    _invalidate()


def remove_denylist_entry(entry: DenylistEntry) -> None:
    """Undo :func:`add_denylist_entry`."""
    _user_denylist.remove(entry)
    _invalidate()


_invalidation_hooks: list[Callable[[], None]] = []


def _invalidate() -> None:
    plan.cache_clear()
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
        fallback: ``True`` when the call landed on a fallback (see :class:`Policy`).
        notes: exact adaptations made for the chosen kernel (padding, K/V repetition, mask materialisation).
        route: ``"direct"`` (the kernel's own aten op, no dispatcher, no global flags) or ``"sdpa"``
            (``torch.nn.functional.scaled_dot_product_attention``, so another PyTorch layer can intercept).
        route_reason: why that route.
        evidence: the ranking's evidence for this device.
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
    prep: Prep = dataclasses.field(default_factory=Prep, repr=False, compare=False)

    def __str__(self) -> str:
        why = "; ".join(f"{name}: {r[0]}" for name, r in self.reasons.items() if r)
        head = f"{self.backend} via {'direct aten op' if self.route == 'direct' else 'F.scaled_dot_product_attention'}"
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


def _candidates(policy: Policy, caps: Capabilities) -> tuple[tuple[str, ...], str]:
    rule = ranking(caps)
    if policy.name == "auto":
        return rule.order, rule.evidence
    if policy.name == "fused":
        return tuple(b for b in rule.order if BACKENDS[b].fused), rule.evidence
    return policy.backends, ""


@functools.lru_cache(maxsize=4096)
def plan(spec: AttentionSpec, caps: Capabilities, policy: Policy = _DEFAULT) -> Plan:
    """Decide which backend runs ``spec`` on ``caps`` under ``policy``.

    Raises:
        BackendUnavailableError: no backend the policy allows can run it (or the policy's fallback mode is
            ``"error"`` and only a fallback could).
    """
    order, evidence = _candidates(policy, caps)
    if spec.batch == 0 or spec.heads_q == 0 or spec.seqlen_q == 0 or spec.seqlen_k == 0:
        note = "zero-size problem: the result is empty (or zeros when there are no keys); nothing to choose"
        prep = BACKENDS["math"].prep(spec, caps.device_type if caps.device_type in BACKENDS["math"].REQUIREMENTS
                                     else "cpu")
        return Plan("math", spec, caps, policy, order, {}, notes=(note,), evidence=evidence, prep=prep)
    blocked: dict[str, tuple[str, ...]] = {}
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
        reasons += [e.describe() for e in entries if e.backend == name and e.matches(spec, caps)]
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
    fallback = (policy.name == "auto" and not BACKENDS[chosen].fused) or (
        policy.name == "custom" and chosen != order[0]
    )
    if fallback and policy.fallback == "error":
        raise BackendUnavailableError(
            f"Policy {policy} would fall back to {chosen!r}, and its fallback mode is 'error'.",
            inputs=spec.describe(), reasons=blocked,
        )
    reasons = dict(blocked)
    for name in order[order.index(chosen) + 1:]:
        why = BACKENDS[name].not_supported_reasons(spec, caps)
        reasons[name] = tuple(why) if why else (f"ranked below {chosen} for {caps.arch} by the policy",)
    for name in BACKENDS:
        if name not in reasons and name != chosen:
            why = BACKENDS[name].not_supported_reasons(spec, caps) if policy.name == "auto" else []
            reasons[name] = tuple(why) or (f"not allowed by policy {policy}",)
    prep = BACKENDS[chosen].prep(spec, caps.device_type)
    return Plan(chosen, spec, caps, policy, order, reasons, fallback=fallback,
                notes=prep.notes(spec), evidence=evidence, prep=prep)
