"""Which backend runs: the measured ranking and the denylist in force, and ``plan()``.

``plan(spec, caps, policy)`` is a pure function of three hashable values and is cached on them. It walks the
policy's candidates in order and returns a :class:`Plan` naming the backend that runs, every other backend
with the reasons it did not, and the exact input adaptations (padding, K/V repetition, ...) the chosen kernel
needs. Nothing here touches a torch global flag. The policies themselves are :mod:`sdpa_flash.policy`'s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

from . import _caches
from ._denylist import BUILTIN_DENYLIST
from ._failures import failure_reasons
from ._ranking import RANKING
from ._rules import DenylistEntry, RankingRule
from .backends import BACKENDS, ranked
from .backends._base import Prep
from .capability import Capabilities
from .errors import AttentionInputError, BackendUnavailableError
from .policy import _DEFAULT, Policy
from .spec import AttentionSpec, format_bytes
from .tuning._table import BUILTIN_SOURCE, tables_for

__all__ = [
    "DenylistEntry",
    "Plan",
    "RankingRule",
    "add_denylist_entry",
    "denylist",
    "plan",
    "ranking",
    "ranking_source",
    "remove_denylist_entry",
]


# ---------------------------------------------------------------------------------------------- ranking


def ranking(caps: Capabilities, spec: AttentionSpec | None = None, *, entry: str = "dense") -> RankingRule:
    """The ranking rule for ``caps`` — for the call ``spec`` when given (shape-class rules apply, tuned tables
    first), else the device's general rule. Unknown devices get a rule that prefers math. See
    :func:`ranking_source` for where the rule comes from."""
    return ranking_source(caps, spec, entry=entry)[0]


def ranking_source(caps: Capabilities, spec: AttentionSpec | None = None, *, entry: str = "dense"
                   ) -> tuple[RankingRule, str]:
    """The ranking rule in force for the call ``spec`` on ``caps``, and where it comes from, in this order:

    1. a table tuned on this machine (``python -m sdpa_flash tune``) whose key is this machine's exactly;
    2. the table shipped with sdpa_flash for this GPU (name and compute capability; other versions allowed);
    3. the built-in rules (``sdpa_flash/_ranking.py``).

    The first rule that matches decides; a call of a class a table did not measure goes on to the next level.
    Tables hold rules for classes of calls only, so without ``spec`` the built-in rules answer. For
    ``entry="packed"`` (the packed kernel of a ragged batch) the rules measured on packed calls come first; without
    one, the batch is ranked as a dense call of its longest sequence.

    Returns:
        The rule, and one line naming its source (the table's file and how it was measured, or the built-in rules).
    """
    if spec is not None:
        tables = tables_for(caps)
        for table in tables.tables:
            rule = table.rule_for(caps, spec, entry)
            if rule is not None:
                return rule, tables.source(table)
    for rule in RANKING:
        if rule.matches(caps, spec, entry):
            return rule, BUILTIN_SOURCE
    if entry != "dense":
        return ranking_source(caps, spec)
    return RankingRule(caps.device_type, ("math", "chunked"),
                       evidence=f"no fused kernels are modelled for {caps.device_type}"), BUILTIN_SOURCE


# --------------------------------------------------------------------------------------------- denylist

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


def _invalidate() -> None:
    """What the plans depend on changed: every cached decision is made afresh."""
    _caches.clear_all()


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
        ranking_source: where the ranking rule comes from: a tuned table (its file), the table shipped for this GPU,
            or the built-in rules (see :func:`ranking_source`).
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
    ranking_source: str = ""
    deterministic: str = "off"
    prep: Prep = dataclasses.field(default_factory=Prep, repr=False, compare=False)

    def __str__(self) -> str:
        """``"flash via direct aten op"`` on the first line, then each other backend's first reason, one a line."""
        how = BACKENDS[self.backend].DIRECT_LABEL if self.route == "direct" else "F.scaled_dot_product_attention"
        head = f"{self.backend} via {how}"
        if self.fallback:
            head += " [fallback]"
        return "\n".join((head, *(f"  {name}: {r[0]}" for name, r in self.reasons.items() if r)))

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
            if self.ranking_source:
                lines.append(f"table:   {self.ranking_source}")
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


@dataclasses.dataclass(frozen=True)
class _Candidates:
    order: tuple[str, ...]
    evidence: str  # empty for a policy that names its backends
    source: str
    failed: Mapping[str, str]  # backends that raised on this class when it was tuned

    def failure(self, name: str) -> list[str]:
        """``name``'s recorded failure on this class, as a reason (none when it has none)."""
        if name not in self.failed:
            return []
        return [f"raised on this class of calls when tuned: {self.failed[name]} [{self.source}]"]


def _candidates(policy: Policy, caps: Capabilities, spec: AttentionSpec | None = None, entry: str = "dense"
                ) -> _Candidates:
    rule, source = ranking_source(caps, spec, entry=entry)
    evidence = f"{rule.describe()}: {rule.evidence}" if rule.shape_class else rule.evidence
    order = ranked(rule.order, caps.device_type)  # with the plug-ins (and Flex) where they stand
    failed = dict(rule.failed)
    if policy.name == "auto":
        return _Candidates(order, evidence, source, failed)
    if policy.name == "fused":
        return _Candidates(tuple(b for b in order if BACKENDS[b].fused), evidence, source, failed)
    return _Candidates(policy.backends, "", source, failed)


DETERMINISTIC_MODES = ("off", "warn", "error")


def deterministic_mode() -> str:
    """``torch.use_deterministic_algorithms`` as :func:`plan` honours it: ``"off"``, ``"warn"`` (set with
    ``warn_only=True``) or ``"error"``."""
    import torch

    if not torch.are_deterministic_algorithms_enabled():
        return "off"
    return "warn" if torch.is_deterministic_algorithms_warn_only_enabled() else "error"


ENTRIES = ("dense", "packed")


def plan(
    spec: AttentionSpec, caps: Capabilities, policy: Policy = _DEFAULT, *, deterministic: str | None = None,
    entry: str = "dense",
) -> Plan:
    """Decide which backend runs ``spec`` on ``caps`` under ``policy``.

    A pure function of its arguments, cached on them. The one decision of the package: dense calls, the packed
    (``cu_seqlens``) kernel of a ragged batch and the flash-attn API's kernel paths are all planned here, over the
    same ranking rules (shape classes included), denylist and requirements.

    Args:
        spec: the call. For ``entry="packed"``: the ragged batch's longest query and key as one sequence, causal
            (if any) bottom-right.
        caps: the device.
        policy: the policy.
        deterministic: the ``torch.use_deterministic_algorithms`` mode to honour when ``spec.needs_grad``:
            ``"off"``, ``"warn"`` or ``"error"`` (see :attr:`Requirements.deterministic_backward`); ``None``
            (default) reads torch's current setting. Calls without a backward are not affected. (Packed
            kernels take the mode themselves: flash's aten op reads it, FA4 gets ``deterministic=``.)
        entry: ``"dense"`` (:meth:`Backend.runner`: the inputs are adapted to the kernel) or ``"packed"`` (the
            backend's packed kernel, :meth:`Backend.varlen`, on the tensors as they are: no padding, no mask;
            a backend without one is refused with that reason). A packed plan is never a fallback: when no
            packed kernel can run, the caller has its own dense route.

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
    if entry not in ENTRIES:
        raise AttentionInputError(f"Expected entry to be one of {', '.join(ENTRIES)}, but got {entry!r} instead.")
    if entry == "packed":
        return _plan(spec, caps, policy, "off", "packed")
    return _plan(spec, caps, policy, mode)


def _nondeterministic(name: str, caps: Capabilities) -> str | None:
    """Why ``name``'s backward on ``caps`` does not count as deterministic (``None`` when it does)."""
    req = BACKENDS[name].requirements(caps.device_type)
    if req is None or req.deterministic_backward:
        return None
    return "backward is not deterministic" if req.deterministic_backward is False else (
        "backward is not known to be deterministic")


def _reasons(name: str, spec: AttentionSpec, caps: Capabilities, packed: bool) -> list[str]:
    """Why ``name`` cannot run ``spec`` through the entry point in question (dense runner or packed kernel)."""
    backend = BACKENDS[name]
    if packed:
        return backend.varlen_reasons(spec, caps) + failure_reasons(f"{name} (packed)", spec)
    return backend.not_supported_reasons(spec, caps) + failure_reasons(name, spec)


@functools.lru_cache(maxsize=4096)
def _plan(spec: AttentionSpec, caps: Capabilities, policy: Policy, deterministic: str, entry: str = "dense") -> Plan:
    cands = _candidates(policy, caps, spec, entry)
    order, evidence = cands.order, cands.evidence
    packed = entry == "packed"
    if (not packed and spec.batch == 0) or spec.heads_q == 0 or spec.seqlen_q == 0 or spec.seqlen_k == 0:
        note = "zero-size problem: the result is empty (or zeros when there are no keys); nothing to choose"
        prep = BACKENDS["math"].prep(spec, caps.device_type if caps.device_type in BACKENDS["math"].REQUIREMENTS
                                     else "cpu")
        return Plan("math", spec, caps, policy, order, {}, notes=(note,), evidence=evidence, prep=prep,
                    deterministic=deterministic, ranking_source=cands.source)
    blocked: dict[str, tuple[str, ...]] = {}
    rerouted: set[str] = set()  # blocked by reroute=True denylist entries and nothing else
    chosen: str | None = None
    device = None
    if caps.probed and caps.device_type == "cuda":
        import torch

        device = torch.device("cuda", caps.device_index)  # type: ignore[arg-type]  # None works; torch's stubs say int
    entries = denylist()
    budget = policy.memory_budget if policy.memory_budget is not None else (
        caps.total_memory // 2 if caps.total_memory else None)
    reasons: list[str] | dict[str, tuple[str, ...]]  # one backend's in the loop; then the plan's, by backend
    for name in order:
        backend = BACKENDS[name]
        reasons = _reasons(name, spec, caps, packed)
        if not packed and name == "math" and not policy.strict and budget is not None and _math_bytes(spec) > budget:
            reasons.append(
                f"would materialise {format_bytes(_math_bytes(spec))} of attention scores, over the memory budget of "
                f"{format_bytes(budget)} (memory_budget= / SDPA_FLASH_MEMORY_BUDGET); the chunked backend computes "
                "the same exactly in blocks")
        if deterministic == "error":
            why_not = _nondeterministic(name, caps)
            if why_not:
                reasons.append(f"{why_not}; torch.use_deterministic_algorithms(True) is set")
        vetoes = [e for e in entries if e.backend == name and e.matches(spec, caps)]
        if vetoes and not reasons and all(e.reroute for e in vetoes):
            rerouted.add(name)
        reasons += [e.describe() for e in vetoes]
        reasons += cands.failure(name)
        if not reasons and not packed and device is not None and backend.TORCH_CHECK:
            reasons = backend.torch_reasons(spec, backend.prep(spec, caps.device_type), device)
        if reasons:
            blocked[name] = tuple(reasons)
        else:
            chosen = name
            break
    if chosen is None:
        what = "a packed (cu_seqlens) kernel for this ragged batch" if packed else "this call"
        raise BackendUnavailableError(
            f"No backend allowed by policy {policy} can run {what} on {caps.name or caps.device_type} "
            f"({caps.arch}).", inputs=spec.describe(), reasons=blocked,
        )
    # Reached only because every backend ranked above it was rerouted by denylist entries (reroute=True): known-bad
    # kernel behaviour on calls the next backend runs exactly and cheaply, so not a fallback.
    above = order[:order.index(chosen)]
    was_rerouted = bool(above) and all(name in rerouted for name in above)
    fallback = not packed and not was_rerouted and ((policy.name == "auto" and not BACKENDS[chosen].fused) or (
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
        why = _reasons(name, spec, caps, packed) + cands.failure(name)
        reasons[name] = tuple(why) if why else (f"ranked below {chosen} for {caps.arch} by the policy",)
    for name in BACKENDS:
        if name not in reasons and name != chosen:
            # A backend that cannot run here says why in its own words (cuDNN on the CPU: not available on the
            # device), whatever the policy; one that could run but is outside the policy says that.
            why = _reasons(name, spec, caps, packed) + cands.failure(name)
            if not why and policy.name == "fused" and not BACKENDS[name].fused:
                why = [f"not a fused kernel ({BACKENDS[name].memory} memory), and policy fused allows only fused "
                       "kernels"]
            reasons[name] = tuple(why) or (f"not allowed by policy {policy}",)
    if packed:  # the packed kernel takes the tensors as they are
        return Plan(chosen, spec, caps, policy, order, reasons, route_reason="the backend's packed (cu_seqlens) "
                    "kernel, one call for the whole ragged batch", evidence=evidence, ranking_source=cands.source)
    prep = BACKENDS[chosen].prep(spec, caps.device_type)
    notes = prep.notes(spec)
    if deterministic == "warn" and _nondeterministic(chosen, caps):
        notes += (f"{_nondeterministic(chosen, caps)}, and torch.use_deterministic_algorithms(True, warn_only=True) "
                  "is set: it runs anyway, with a warning",)
    return Plan(chosen, spec, caps, policy, order, reasons, fallback=fallback, notes=notes,
                route_reason=BACKENDS[chosen].ROUTE_REASON, evidence=evidence, prep=prep, deterministic=deterministic,
                ranking_source=cands.source)


plan.cache_clear = _plan.cache_clear  # type: ignore[attr-defined]  # functools' cache API on the public wrapper
_caches.register("planner.plan", _plan.cache_clear)
