"""Which path a flash-attn call takes, and why the others were not taken.

Four paths, each exact. The kernel is never chosen here: which kernel runs a call is the one planner's decision
(:func:`sdpa_flash.planner.plan`, the ranking, a tuned table, the denylist, plug-in backends), as for
:func:`sdpa_flash.attention`. The other paths are formulations for what no fused kernel of the policy takes:

* ``sdpa``: :func:`sdpa_flash.attention` (``layout="bshd"``, bottom-right causal, ``window=``, ``softcap=``) or the
  varlen engine: the policy layer's kernels. Windows and softcap go here when the planner gives them a fused
  kernel that does them natively (FlashAttention-4; PyTorch's flash kernel for windows; the ``flex`` backend,
  FlexAttention, for softcap and float32 windows on CUDA);
* ``flex``: the same FlexAttention module's score and mask functions (:func:`sdpa_flash.backends.flex.flex_run`)
  for ALiBi, and for windows and softcap the policy's kernels do not take, on CUDA;
* ``masked``: :func:`sdpa_flash.attention` with the window as a boolean mask and ALiBi as an additive float bias
  built from flash-attn's definitions (no softcap: it is not additive);
* ``exact``: tiled plain PyTorch with its own backward (:mod:`sdpa_flash.compat._exact`): everything, any device,
  and the dropout pattern (``return_attn_probs=True`` with dropout).

:func:`plan_call` is pure and cached on its arguments.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Mapping

import torch

from .. import _caches
from .._validate import check_window
from ..backends import flex as _flex
from ..capability import Capabilities
from ..errors import AttentionInputError, BackendUnavailableError
from ..policy import Policy, resolve_policy
from ..spec import AttentionSpec, dtype_name, format_bytes
from ._common import Features

__all__ = ["PATHS", "CompatPlan", "CompatSpec", "plan_call", "use_path"]

PATHS = ("sdpa", "flex", "masked", "exact")
_CPU_MASK_BUDGET = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class CompatSpec:
    """The small, hashable summary of one flash-attn call that the path decision depends on.

    Attributes:
        api: ``"dense"`` (flash_attn_func and its packed forms), ``"varlen"`` or ``"kvcache"``.
        device_type: where the tensors are.
        dtype: of q, k, v.
        batch: B (the number of sequences for varlen).
        heads_q, heads_kv: query and key/value heads.
        seqlen_q, seqlen_k: Sq and Sk (max_seqlen_q / max_seqlen_k for varlen; the cache length for kvcache).
        head_dim, head_dim_v: D and Dv.
        features: causal, window, softcap, ALiBi (normalised).
        dropout: ``dropout_p > 0``.
        needs_grad: autograd will need a backward.
        deterministic: ``deterministic=True`` and a backward is needed (and torch's deterministic mode is off).
        lse: the log-sum-exp is returned.
        probs: ``return_attn_probs=True`` with dropout, so the dropout pattern (S_dmask) is returned.
        key_ranges: per-row key ranges (a KV cache with per-row lengths or left padding).
    """

    api: str
    device_type: str
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    features: Features = dataclasses.field(default_factory=Features)
    dropout: bool = False
    needs_grad: bool = False
    deterministic: bool = False
    lse: bool = False
    probs: bool = False
    key_ranges: bool = False

    def describe(self) -> str:
        parts = [f"{self.api}: q ({self.batch}, {self.seqlen_q}, {self.heads_q}, {self.head_dim})",
                 f"k/v ({self.batch}, {self.seqlen_k}, {self.heads_kv}, {self.head_dim}/{self.head_dim_v})",
                 f"{dtype_name(self.dtype)} on {self.device_type}", f"features: {self.features.describe()}"]
        for flag in ("dropout", "needs_grad", "deterministic", "lse", "probs", "key_ranges"):
            if getattr(self, flag):
                parts.append(flag)
        return ", ".join(parts)

    def mask_bytes(self) -> int:
        """What the masked path materialises: the bias ``(B?, H?, Sq, Sk)`` (float with ALiBi, else bool)."""
        f = self.features
        heads = self.heads_q if f.alibi else 1
        batch = self.batch if (f.alibi == "batch_heads" or self.key_ranges) else 1
        if self.api == "varlen":
            batch = 1  # one sequence at a time
        item = self.dtype.itemsize if f.alibi else 1
        return batch * heads * self.seqlen_q * self.seqlen_k * item


@dataclasses.dataclass(frozen=True)
class CompatPlan:
    """What runs for one kind of flash-attn call, and why.

    Attributes:
        path: ``"sdpa"``, ``"flex"``, ``"masked"`` or ``"exact"``.
        spec: the call's summary.
        order: the paths considered, in order.
        reasons: for every other path, why it was not taken.
        notes: how the call is carried out on that path.
        fallback: the first choice for this device could not run the call.
        kernel: on the ``sdpa`` path with a window or softcap, the fused kernel the planner chose (the backend's
            name); ``None`` otherwise (a plain call's kernel is planned when it runs: ``sdpa_flash.explain``).
    """

    path: str
    spec: CompatSpec
    order: tuple[str, ...]
    reasons: Mapping[str, tuple[str, ...]]
    notes: tuple[str, ...] = ()
    fallback: bool = False
    kernel: str | None = None

    def __str__(self) -> str:
        head = self.path + (f" ({self.kernel})" if self.kernel else "") + (" [fallback]" if self.fallback else "")
        return "\n".join((head, *(f"  {name}: {r[0]}" for name, r in self.reasons.items() if r)))

    def explain(self) -> str:
        """A multi-line account: inputs, the path, how, and each other path's reasons."""
        lines = [f"path:    {self.path}" + (f" on {self.kernel}" if self.kernel else "")
                 + ("  [fallback]" if self.fallback else ""),
                 f"inputs:  {self.spec.describe()}", f"order:   {' > '.join(self.order)}"]
        lines += [f"how:     {n}" for n in self.notes]
        for name, why in self.reasons.items():
            lines.append(f"{name}:")
            lines.extend(f"  - {w}" for w in why)
        return "\n".join(lines)


_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("sdpa_flash_compat_path", default=None)


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
    """Force one path (``"sdpa"``, ``"flex"``, ``"masked"``, ``"exact"``) for flash-attn calls here.

    A forced path that cannot run the call raises :class:`~sdpa_flash.BackendUnavailableError` with its reasons.
    ``None`` restores automatic choice. Scoped to this thread / asyncio task (a ``contextvars`` variable).
    """
    if path is not None and path not in PATHS:
        raise AttentionInputError(f"Expected path to be one of {', '.join(PATHS)} or None, but got {path!r} instead.")
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_path() -> str | None:
    return _FORCED.get()


def _shared_reasons(spec: CompatSpec) -> list[str]:
    reasons = []
    if spec.probs:
        reasons.append("return_attn_probs=True with dropout_p > 0 returns the dropout pattern (S_dmask), which "
                       "only the exact path exposes")
    if spec.deterministic and spec.device_type == "cuda":
        reasons.append("deterministic=True: PyTorch's fused attention backward is not guaranteed deterministic "
                       "unless torch.use_deterministic_algorithms(True) is on; the exact path is")
    return reasons


def _kernel(spec: CompatSpec, caps: Capabilities, policy: Policy) -> tuple[str | None, list[str]]:
    """The fused kernel the one planner gives a call with a window or softcap, or ``None`` and the planner's reasons.

    The call is planned as ``attention()`` (dense calls) or the varlen engine (its packed kernel, else its grouped
    dense route) would plan it, under the policy in force, so the ranking, a tuned table, the denylist and any
    plug-in backend decide here as they do everywhere else. Only a fused kernel counts: when the planner would land
    on a tiled or materialising reference (chunked, math), FlexAttention and the exact path are the better ones.
    """
    from ..backends import get_backend
    from ..planner import plan

    f = spec.features
    window = check_window((f.left, f.right), "bottom_right" if f.causal else None, spec.seqlen_q, spec.seqlen_k)
    dense = AttentionSpec(spec.device_type, spec.dtype, max(spec.batch, 1), spec.heads_q, spec.heads_kv,
                          max(spec.seqlen_q, 1), max(spec.seqlen_k, 1), spec.head_dim, spec.head_dim_v,
                          "bottom_right" if f.causal else None, None, spec.dropout, spec.needs_grad,
                          window=window, softcap=f.softcap or None)
    reasons: list[str] = []
    for entry in ("packed", "dense") if spec.api == "varlen" else ("dense",):
        try:
            chosen = plan(dense, caps, policy, entry=entry)
        except BackendUnavailableError as exc:
            reasons += [f"{name}: {why[0]}" for name, why in exc.reasons.items() if why]
            continue
        if get_backend(chosen.backend).fused:
            return chosen.backend, []
        reasons.append(f"the planner would run it on {chosen.backend}, not a fused kernel; "
                       + "; ".join(f"{name}: {why[0]}" for name, why in chosen.reasons.items()
                                   if why and get_backend(name).fused))
    return None, reasons or ["no backend of the policy in force runs it"]


def _reasons(path: str, spec: CompatSpec, caps: Capabilities, budget: int | None, policy: Policy) -> list[str]:
    f = spec.features
    if path == "exact":
        return []
    if path == "flex":
        return _flex.not_supported_reasons(spec, caps)
    reasons = _shared_reasons(spec)
    if path == "sdpa":
        if f.alibi:
            reasons.insert(0, "the policy layer's kernels have no ALiBi (the flex, masked and exact paths do)")
        elif spec.api == "kvcache" and f.extra:
            reasons.insert(0, f"per-row key ranges with {', '.join(f.extra)}: the policy layer's kernels take "
                              "them as a causal flag or a mask only")
        elif f.extra and not reasons:
            reasons += _kernel(spec, caps, policy)[1]
        return reasons
    # masked
    if f.softcap > 0:
        reasons.insert(0, "softcap is a non-linear function of the scores; no additive mask expresses it")
    if f.alibi and spec.dtype in (torch.float16, torch.bfloat16):
        reasons.append(f"ALiBi: SDPA adds a mask of the query's dtype, and a {dtype_name(spec.dtype)} bias rounds "
                       "-slope * |i - j| (flash-attn adds it in float32)")
    if budget is not None and spec.mask_bytes() > budget:
        reasons.append(f"the dense mask would take {format_bytes(spec.mask_bytes())}, over the memory budget of "
                       f"{format_bytes(budget)} (sdpa_flash policy memory_budget=); the exact path is "
                       "memory-bounded")
    return reasons


def _order(spec: CompatSpec, caps: Capabilities) -> tuple[str, ...]:
    if not spec.features.extra:
        return ("sdpa", "exact")
    if caps.device_type == "cuda":  # (the device the call's tensors are on)
        return ("sdpa", "flex", "masked", "exact")
    return ("sdpa", "masked", "exact", "flex")


@functools.lru_cache(maxsize=4096)
def plan_call(spec: CompatSpec, caps: Capabilities, forced: str | None = None, fallback_mode: str = "warn_once",
              budget: int | None = None, flex_failed: bool = False, policy: Policy | None = None) -> CompatPlan:
    """Choose the path for ``spec`` on ``caps``.

    Args:
        spec: the call.
        caps: the device.
        forced: a path to use (see :func:`use_path`), or ``None``.
        fallback_mode: the sdpa_flash policy's fallback mode; ``"error"`` raises instead of falling back from
            FlexAttention to a slower path on CUDA.
        budget: bytes the masked path may materialise (``None``: half the device memory; 4 GiB on the CPU).
        flex_failed: FlexAttention raised for this call before (it is then not tried again).
        policy: the sdpa_flash policy in force (``None``: ``auto``), under which the ``sdpa`` path's kernel is
            planned.

    Raises:
        BackendUnavailableError: the forced path cannot run the call, or (``fallback_mode="error"``) only a
            fallback could.
    """
    if budget is None:
        budget = caps.total_memory // 2 if caps.total_memory else _CPU_MASK_BUDGET
    policy = policy or resolve_policy("auto")
    order = (forced,) if forced else _order(spec, caps)
    blocked: dict[str, tuple[str, ...]] = {}
    chosen = None
    for path in order:
        why = _reasons(path, spec, caps, budget, policy)
        if path == "flex" and flex_failed and not forced:
            why = ["FlexAttention raised for this call earlier in this process (see the warning it gave)"]
        if why:
            blocked[path] = tuple(why)
        else:
            chosen = path
            break
    if chosen is None:
        raise BackendUnavailableError(f"The {order[0]} path cannot run this flash-attn call."
                                      if forced else "No path can run this flash-attn call.",
                                      inputs=spec.describe(), reasons=blocked)
    # A fused kernel for a window or softcap is optional (FlashAttention-4 is an extra, PyTorch's flash kernel has
    # no softcap): not running one is never a fallback; leaving FlexAttention for a slower path is
    preferred = ("sdpa", "flex") if spec.features.extra else ("sdpa",)
    fallback = forced is None and chosen not in preferred and spec.device_type == "cuda"
    if fallback and fallback_mode == "error":
        raise BackendUnavailableError(f"This flash-attn call would fall back to the {chosen} path, and the policy's "
                                      "fallback mode is 'error'.", inputs=spec.describe(), reasons=blocked)
    reasons = dict(blocked)
    for path in PATHS:
        if path in reasons or path == chosen:
            continue
        why = _reasons(path, spec, caps, budget, policy)
        if forced:
            reasons[path] = (f"not used: the {forced} path was forced (sdpa_flash.compat.use_path)",)
        elif path in order:
            reasons[path] = tuple(why) or (f"not needed: the {chosen} path runs the call",)
        else:
            reasons[path] = tuple(why) or ("not needed: the call has no window, softcap or ALiBi",)
    kernel = _kernel(spec, caps, policy)[0] if chosen == "sdpa" and spec.features.extra else None
    return CompatPlan(chosen, spec, order, reasons, _notes(chosen, spec), fallback, kernel)


def _notes(path: str, spec: CompatSpec) -> tuple[str, ...]:
    f = spec.features
    notes = []
    if path == "sdpa":
        variants = "".join(f", {a}" for a, on in (("window=", f.window), ("softcap=", f.softcap > 0)) if on)
        if spec.api == "varlen":
            notes.append("sdpa_flash varlen attention over the packed sequences (per-sequence bottom-right causal"
                         f"{variants})")
        elif spec.key_ranges:
            notes.append("sdpa_flash.attention() with the per-row valid keys as a boolean mask")
        else:
            notes.append("sdpa_flash.attention(layout='bshd'" + (", causal='bottom_right'" if f.causal else "")
                         + f"{variants}): the policy's fused kernels, no copy")
    elif path == "masked":
        what = []
        if f.causal or f.window or spec.key_ranges:
            what.append("visible keys as a boolean mask")
        if f.alibi:
            what.append("ALiBi as an additive float bias (-inf where masked)")
        notes.append("sdpa_flash.attention() with " + " and ".join(what or ["no mask"])
                     + (", one sequence at a time" if spec.api == "varlen" else ""))
    elif path == "flex":
        how = {"dense": "block mask cached per shape and window", "varlen": "a document block mask over the packed "
               "sequences", "kvcache": "per-row key ranges masked in the score function"}[spec.api]
        notes.append(f"FlexAttention, compiled once per call structure; {how}")
    else:
        notes.append("tiled online softmax in float32 (float64 for float64 inputs) with its own backward"
                     + (", one sequence at a time" if spec.api == "varlen" else ""))
    if spec.lse and path in ("sdpa", "masked"):
        notes.append("softmax_lse computed by the exact path's tiled pass (float32), without a gradient")
    return tuple(notes)

_caches.register("compat.plan", plan_call.cache_clear)
