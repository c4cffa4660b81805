"""The dense call: validate -> spec -> plan -> run, with the per-call cache (``attention()`` without padding).

The per-call path is a dictionary lookup keyed on what the decision depends on (shapes, dtypes, devices, mask
kind, options, policy, whether autograd needs a backward). A hit means the inputs were already validated and
planned for, and the call goes straight to a pre-built closure over the chosen kernel (an aten op, or an optional
kernel's own function). A miss validates (typed errors), builds the :class:`AttentionSpec`, asks :func:`plan`
and stores the closure.

Layering: this module stands on the backends and the planner; :mod:`sdpa_flash.attention` (the public
``attention()``, which adds the ``key_padding_mask`` route) and the varlen engine's grouped path both call
:func:`dense_attention`, and neither calls the other.

Two situations leave the fast path:

* another PyTorch layer must see the call — an active torch function mode, tensor subclasses such as DTensor
  or nested tensors, or a replaced ``F.scaled_dot_product_attention`` (context parallel's wrapper) — so the
  call is routed through ``F.scaled_dot_product_attention``;
* autocast is on: the inputs are cast as autocast would cast them for SDPA, then the fast path runs.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import _caches, _shadow
from . import policy as _policy
from . import stats as _stats
from ._failures import is_refusal, record_or_raise, retrying
from ._validate import attention_fields, attention_spec
from .backends import BACKENDS
from .backends._base import merge_causal, merge_mask
from .capability import capabilities
from .errors import AttentionInputError, BackendUnavailableError
from .planner import Plan, _nondeterministic, plan
from .policy import Policy, PolicyLike, resolve_policy
from .spec import AttentionSpec, window_mask_tensor

__all__ = ["dense_attention", "dense_explain"]

_SDPA = F.scaled_dot_product_attention  # the original, to notice when a layer has replaced it
_mode_on: Callable[[], bool] = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)
_has_tf: Callable[..., bool] = torch._C._has_torch_function_variadic
_grad_on = torch.is_grad_enabled
_block_policy = _policy._BLOCK.get
_any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_det_on: Callable[[], bool] = getattr(torch._C, "_get_deterministic_algorithms",
                                      torch.are_deterministic_algorithms_enabled)
_det_warn: Callable[[], bool] = getattr(torch._C, "_get_deterministic_algorithms_warn_only",
                                        torch.is_deterministic_algorithms_warn_only_enabled)
_CACHE_LIMIT = 4096

# key -> (run(q, k, v, mask, dropout_p, scale) on the user's layout, (backend, reason, warning or None) for a
#        fallback else None, the policy (kept alive: the key holds its id), the plan's call counter)
_cache: dict[Any, tuple[Callable[..., torch.Tensor], tuple[str, str, str | None] | None, Policy, Any]] = {}
_resolved: dict[Any, Policy] = {}


def _resolve(policy: PolicyLike) -> Policy:
    pol = resolve_policy(policy)
    if isinstance(policy, str) and len(_resolved) < 256:
        _resolved[policy] = pol
    return pol
_caches.register("dense.calls", _cache.clear)  # entries hold a plan and its stats counter


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str = "bhsd",
    policy: PolicyLike | None = None,
    window: Any = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sdpa_flash.attention` without ``key_padding_mask``: validate, plan (cached), run one kernel.

    The dense call both :func:`sdpa_flash.attention` and the varlen engine's grouped path stand on; see
    :func:`sdpa_flash.attention` for the arguments.
    """
    if window is not None and type(window) is not tuple:  # a list: the cache key needs it hashable
        attention_spec(query, key, value, attn_mask, causal, dropout_p, scale, layout, window, softcap, sinks)
        window = tuple(window)
    if _compiling():
        return _compiled(query, key, value, attn_mask, causal, dropout_p, scale, layout, policy, window, softcap,
                         sinks)
    if policy is None:
        pol = _block_policy() or _policy._process_policy or _policy._env_policy or _policy._from_env()
    else:
        pol = policy if type(policy) is Policy else (type(policy) is str and _resolved.get(policy)) or _resolve(policy)
    if _mode_on() or _has_tf(query, key, value) or F.scaled_dot_product_attention is not _SDPA or (
        _any_autocast() and _autocast_enabled(query.device.type)
    ):
        return _special(query, key, value, attn_mask, causal, dropout_p, scale, layout, pol, window, softcap, sinks)
    try:
        # Devices and dtypes of every input are in the key: kernels do not all check them (PyTorch's CPU flash
        # kernel reads a "meta" key as if it held data, the cuDNN kernel ignores dtypes). So is whether every
        # head dim has stride 1 (the fused kernels read it so; other inputs get a copy) and, for a call with a
        # backward, torch's deterministic-algorithms mode: False, True (not set), 2 (set) or 3 (warn_only).
        ck = (
            query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype,
            query.device, key.device, value.device,
            None if attn_mask is None else (attn_mask.shape, attn_mask.dtype, attn_mask.device,
                                            attn_mask.requires_grad and _grad_on()),
            causal, dropout_p, scale, layout, id(pol),  # the entry keeps `pol` alive, so its id stays unique
            (query.is_contiguous() and key.is_contiguous() and value.is_contiguous())
            or (query.stride(), key.stride(), value.stride()),
            _grad_on() and (query.requires_grad or key.requires_grad or value.requires_grad or (
                sinks is not None and sinks.requires_grad)) and ((_det_on() and 2 + _det_warn()) or True),
            window, softcap,
            None if sinks is None else (sinks.shape, sinks.dtype, sinks.device),
        )
        run, fallback, _, counter = _cache[ck]
    except KeyError:
        run, fallback, _, counter = _build(ck, query, key, value, attn_mask, causal, dropout_p, scale, layout, pol,
                                           window, softcap, sinks)
    except (AttributeError, TypeError):  # not tensors, or unhashable options: let validation say what is wrong
        attention_spec(query, key, value, attn_mask, causal, dropout_p, scale, layout, window, softcap, sinks)
        raise
    next(counter)
    if fallback is not None:
        _on_fallback(*fallback)
    try:
        if sinks is None:
            return run(query, key, value, attn_mask, dropout_p, scale)
        return run(query, key, value, attn_mask, dropout_p, scale, sinks)
    except _FirstCallFailed as failed:
        return _reroute(failed, query, key, value, attn_mask, causal, dropout_p, scale, layout, pol, window, softcap,
                        sinks)
    except RuntimeError:
        attention_spec(query, key, value, attn_mask, causal, dropout_p, scale, layout, window, softcap, sinks)
        raise


def dense_explain(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str = "bhsd",
    policy: PolicyLike | None = None,
    window: Any = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> Any:
    """The :class:`~sdpa_flash.Plan` :func:`dense_attention` would follow (see :func:`sdpa_flash.explain`)."""
    pol = _policy.get_policy() if policy is None else resolve_policy(policy)
    if isinstance(query, torch.Tensor) and _autocast_enabled(query.device.type):
        query, key, value, attn_mask = _autocast_inputs(query, key, value, attn_mask)
    spec = attention_spec(query, key, value, attn_mask, causal, dropout_p, scale, layout, window, softcap, sinks)
    p = _plan_in_layout(spec, capabilities(query.device), pol, layout)
    why = _interception(query, key, value)
    if why:
        return _sdpa_plan(p, why)
    copied = _needs_copy(p.backend, spec.device_type, query, key, value)
    if any(copied):
        p = dataclasses.replace(p, notes=(*p.notes, _copy_note(p.backend, copied, query, key, value)))
    return p


# ----------------------------------------------------------------------------------------------- build
def _plan_in_layout(spec: AttentionSpec, caps: Any, pol: Policy, layout: str) -> Plan:
    """:func:`plan`, with the inputs of a ``BackendUnavailableError`` described in the user's layout."""
    try:
        return plan(spec, caps, pol)
    except BackendUnavailableError as exc:
        if layout != "bshd":
            raise
        raise BackendUnavailableError(str(exc).split("\n", 1)[0], inputs=spec.describe(layout),
                                      reasons=exc.reasons) from None


def _build(
    ck: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
    causal: bool | str, dropout_p: float, scale: float | None, layout: str, pol: Policy, window: Any,
    softcap: float | None, sinks: torch.Tensor | None,
) -> tuple[Callable[..., torch.Tensor], tuple[str, str, str | None] | None, Policy, Any]:
    spec = attention_spec(query, key, value, attn_mask, causal, dropout_p, scale, layout, window, softcap, sinks)
    p = _plan_in_layout(spec, capabilities(query.device), pol, layout)
    run = BACKENDS[p.backend].runner(spec, p.prep)
    copied = _needs_copy(p.backend, spec.device_type, query, key, value)
    if any(copied):
        run = _with_copies(run, copied)
    variants = spec.window is not None or spec.softcap is not None or spec.sinks
    if pol.shadow and p.backend != "math" and not spec.dropout and not variants:  # (the reference has no variants)
        run = _shadow.wrap(run, spec, p.backend, pol.shadow, pol.shadow_action)
    if p.deterministic == "warn" and _nondeterministic(p.backend, p.caps):
        warnings.warn(f"sdpa_flash: the {p.backend} backend's backward is not deterministic, and "
                      "torch.use_deterministic_algorithms(True, warn_only=True) is set: it runs anyway for "
                      f"{spec.describe(layout)}. With warn_only=False sdpa_flash picks a backend whose backward is "
                      "deterministic.", UserWarning, stacklevel=3)
    if layout == "bshd":
        # A kernel that reads (B, S, H, D) itself (FA4) takes the tensors as they are when nothing is adapted.
        native = (BACKENDS[p.backend].bshd_runner(spec, p.prep)
                  if not any(copied) and not (pol.shadow and p.backend != "math") else None)
        if native is not None:
            run = native
        else:
            inner = run

            def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None, p_: float,
                    s: float | None, *sinks: torch.Tensor) -> torch.Tensor:
                return inner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, p_, s, *sinks).transpose(1, 2)

    fallback = None
    if p.fallback:
        blocked = "; ".join(f"{n}: {r[0]}" for n, r in p.reasons.items() if n in p.order[: p.order.index(p.backend)])
        message = (
            f"sdpa_flash fell back to the {p.backend} backend ({BACKENDS[p.backend].memory} memory) for "
            f"{spec.describe(layout)} because {blocked}. sdpa_flash.explain(...) shows every reason; "
            "fallback='error' makes this an error, fallback='silent' silences it."
        )
        fallback = (p.backend, blocked, message if p.policy.fallback == "warn_once" else None)
    entry = (run, fallback, pol, _stats.plan_counter(p.backend, p.route, spec.describe()))
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    # The first call runs guarded (a kernel may refuse a configuration only when it builds it); once it has run,
    # the entry holds the plain runner, so later calls pay nothing for the guard.
    _cache[ck] = first = (_first_call(run, ck, entry, p.backend, spec), *entry[1:])
    return first


class _FirstCallFailed(Exception):
    """A kernel raised at the first call of a cache entry (internal: :func:`_reroute` handles it)."""

    def __init__(self, backend: str, spec: AttentionSpec) -> None:
        super().__init__(backend)
        self.backend, self.spec = backend, spec


def _first_call(run: Callable[..., torch.Tensor], ck: Any, entry: Any, backend: str, spec: AttentionSpec
                ) -> Callable[..., torch.Tensor]:
    def first(*args: Any) -> torch.Tensor:
        try:
            out = run(*args)
        except Exception as exc:
            if is_refusal(exc):
                raise _FirstCallFailed(backend, spec) from exc
            raise
        if _cache.get(ck) is not None:
            _cache[ck] = entry
        return out

    return first


def _reroute(failed: _FirstCallFailed, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attn_mask: torch.Tensor | None, causal: bool | str, dropout_p: float, scale: float | None, layout: str,
             pol: Policy, window: Any, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """A kernel failed at its first call: record it and run the call on the next backend, once, with one warning;
    or raise :class:`KernelFailedError` when the policy allows no other backend (or the next one failed too)."""
    exc = failed.__cause__ or failed
    backend, inputs = failed.backend, failed.spec.describe(layout)
    what = f"the {backend} kernel failed at its first call for {inputs}: {type(exc).__name__}: {exc}"
    reason = record_or_raise(backend, backend, failed.spec, exc, pol, inputs, what)
    with retrying(what):
        out = dense_attention(query, key, value, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p, scale=scale,
                              layout=layout, policy=pol, window=window, softcap=softcap, sinks=sinks)
    p = dense_explain(query, key, value, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p, scale=scale,
                      layout=layout, policy=pol, window=window, softcap=softcap, sinks=sinks)
    warnings.warn(f"sdpa_flash: {what}. The {p.backend} backend ran the call instead, and will run these inputs "
                  f"from now on in this process (explain() lists the {backend} backend as: {reason}).", UserWarning,
                  stacklevel=_user_level())
    return out


def _needs_copy(backend: str, device_type: str, *tensors: torch.Tensor) -> tuple[bool, ...]:
    """Which of q, k, v the backend's kernel cannot read in place.

    Kernels with ``contiguous_last_dim`` read the head dim at stride 1, and write the output (which PyTorch
    allocates with the query's layout) the same way: so a head dim of another stride, and a query with another
    dim of stride 1 (its layout is then ambiguous, and the output's head dim may not get stride 1; measured on
    PyTorch's CPU flash kernel, torch 2.13: F.scaled_dot_product_attention returns garbage there too), are copied.
    """
    req = BACKENDS[backend].requirements(device_type)
    if req is None or not req.contiguous_last_dim:
        return (False,) * len(tensors)
    out = [t.stride(-1) != 1 and t.size(-1) > 1 for t in tensors]
    q = tensors[0]
    out[0] = out[0] or (q.size(-1) > 1 and any(st == 1 and n > 1 for st, n in zip(q.stride()[:-1], q.shape[:-1],
                                                                                strict=True)))
    return tuple(out)


def _copy_note(backend: str, copied: tuple[bool, ...], *tensors: torch.Tensor) -> str:
    names = [f"{n} (strides {tuple(t.stride())})" for n, t, c in zip(("query", "key", "value"), tensors, copied,
                                                                    strict=True) if c]
    return (f"{', '.join(names)} copied to contiguous memory first: the {backend} kernel reads and writes the head "
            "dim with stride 1")


def _with_copies(run: Callable[..., torch.Tensor], copied: tuple[bool, ...]) -> Callable[..., torch.Tensor]:
    cq, ck, cv = copied

    def run_copied(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None, p_: float,
                   s: float | None, *sinks: torch.Tensor) -> torch.Tensor:
        return run(q.contiguous() if cq else q, k.contiguous() if ck else k, v.contiguous() if cv else v, m, p_, s,
                   *sinks)

    return run_copied


_PACKAGE_DIR = __file__.rsplit("/", 1)[0].rsplit("\\", 1)[0]


def _user_level() -> int:
    """The ``stacklevel`` of the first frame outside this package, for a warning issued by the caller."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _on_fallback(backend: str, reason: str, message: str | None) -> None:
    """Count a fallback at its call site (outside this package); warn the first time there, if asked to."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    first = _stats.record_fallback(backend, reason, frame.f_code.co_filename, frame.f_lineno)
    if first and message is not None:
        warnings.warn(message, UserWarning, stacklevel=level)


# ------------------------------------------------------------------------------- leaving the fast path
def _interception(query: Any, key: Any, value: Any) -> str:
    """Why the call must go through ``F.scaled_dot_product_attention`` ('' when it need not)."""
    if getattr(query, "is_nested", False):
        return "nested (jagged) tensors are handled by PyTorch's SDPA dispatcher"
    if F.scaled_dot_product_attention is not _SDPA:
        return "torch.nn.functional.scaled_dot_product_attention is wrapped (e.g. by context parallel)"
    if _mode_on():  # checked before subclasses: with a mode active, every tensor reports __torch_function__
        return "a torch function mode is active"
    if _has_tf(query, key, value):
        return "a tensor subclass (e.g. DTensor) must see the call"
    return ""


def _sdpa_plan(p: Plan, why: str) -> Plan:
    return dataclasses.replace(
        p, route="sdpa",
        route_reason=f"{why}; PyTorch's dispatcher picks the kernel inside that layer",
    )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch._C.is_autocast_enabled(device_type))
    except RuntimeError:  # a device type autocast does not know ("meta"): it cannot be on there
        return False


def _autocast_inputs(q: torch.Tensor, k: Any, v: Any, m: Any) -> tuple[Any, Any, Any, Any]:
    """Cast as autocast casts SDPA's inputs: floating tensors other than float64 to the autocast dtype."""
    dtype = torch.get_autocast_dtype(q.device.type)

    def cast(t: Any) -> Any:  # not validated yet: anything but a floating tensor passes through
        ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if ok else t

    return cast(q), cast(k), cast(v), cast(m)


def _special(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
             causal: bool | str, dropout_p: float, scale: float | None, layout: str, pol: Policy, window: Any,
             softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    if isinstance(query, torch.Tensor) and _autocast_enabled(query.device.type):
        query, key, value, attn_mask = _autocast_inputs(query, key, value, attn_mask)
        with torch.autocast(query.device.type, enabled=False):
            return dense_attention(query, key, value, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p,
                                   scale=scale, layout=layout, policy=pol, window=window, softcap=softcap,
                                   sinks=sinks)
    why = _interception(query, key, value)
    spec = attention_spec(query, key, value, attn_mask, causal, dropout_p, scale, layout, window, softcap, sinks)
    if spec.softcap is not None or spec.sinks:
        raise BackendUnavailableError(
            f"The call must go through torch.nn.functional.scaled_dot_product_attention ({why}), which has no "
            "softcap or attention sinks.", inputs=spec.describe(layout))
    if not spec.nested:
        p = plan(spec, capabilities(query.device), pol)  # the policy still has to allow the call
        next(_stats.plan_counter(p.backend, "sdpa", spec.describe()))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value)) if layout == "bshd" else (query, key, value)
    kind = spec.effective_causal
    is_causal = kind == "top_left" and attn_mask is None and spec.window is None
    if kind is not None and not is_causal:
        attn_mask = merge_causal(attn_mask, kind, spec.seqlen_q, spec.seqlen_k, q.device)
    if spec.window is not None:  # (F.sdpa has no window: the layer that intercepts sees a mask)
        attn_mask = merge_mask(attn_mask, window_mask_tensor(spec.window, spec.seqlen_q, spec.seqlen_k, q.device))
    kwargs: dict[str, Any] = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if spec.gqa:
        kwargs["enable_gqa"] = True
    del why
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out.transpose(1, 2) if layout == "bshd" else out


# ---------------------------------------------------------------------------------------- torch.compile
_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)
def _compile_choice(fields: dict[str, Any], device: torch.device, pol: tuple[Any, ...] | None
                    ) -> tuple[str, Any, Any]:
    """Plan once, while torch.compile traces; the result is baked into the graph as constants: ``(backend, spec,
    prep)``, or ``("", message, None)`` when no backend can run the call."""
    spec = AttentionSpec(**fields)
    policy = _policy.get_policy() if pol is None else Policy(*pol)
    try:
        p = plan(spec, capabilities(device), policy)
    except BackendUnavailableError as exc:
        return ("", str(exc), None)  # raised as a typed error by the traced code: dynamo wraps errors raised here
    if p.fallback and p.policy.fallback == "warn_once":
        warnings.warn(f"sdpa_flash fell back to the {p.backend} backend for {spec.describe()} (decided while "
                      "compiling). Use sdpa_flash.explain(...) for details.", UserWarning, stacklevel=2)
    return (p.backend, spec, p.prep)


# What torch.compiler.assume_constant_result does (in torch 2.5 through 2.13), without importing torch._dynamo
# (1.5 s) when sdpa_flash is imported: dynamo calls the function while tracing and bakes the result in.
_compile_choice._dynamo_marked_constant = True  # type: ignore[attr-defined]  # a function attribute dynamo reads


_SIZE_FIELDS = ("batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k", "head_dim", "head_dim_v")


def _concrete_int(x: Any) -> int:
    """``x`` as a Python int, also when dynamo traces it as a symbolic size (SymInt).

    Dynamo keeps ``int(symint)`` symbolic, but it evaluates each comparison with a guard, so a binary search
    over comparisons rebuilds the exact value as a constant (guarding the graph on it). On plain ints the
    comparisons fold away while tracing.
    """
    n = 0
    for bit in range(62, -1, -1):
        if x >= n + (1 << bit):
            n += 1 << bit
    return n


def _compiled(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              causal: bool | str, dropout_p: float, scale: float | None, layout: str, policy: PolicyLike | None,
              window: Any, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """attention() as torch.compile traces it: same validation and plan, no per-call cache or contextvars.

    The policy is the ``policy=`` argument, else the one in force when the function is compiled.
    """
    fields = attention_fields(query, key, value, attn_mask, causal, dropout_p, scale, layout, window, softcap, sinks)
    # The plan depends on the sizes, so they must reach _compile_choice as Python ints: with dynamic shapes
    # this specialises the graph on them (recompiling per distinct attention shape, as static shapes do).
    # (With dynamic=True dynamo also makes float defaults such as dropout_p symbolic: branch to a constant.)
    for name in _SIZE_FIELDS:
        fields[name] = _concrete_int(fields[name])
    fields["dropout"] = True if fields["dropout"] else False
    if fields["nested"]:
        raise AttentionInputError("Expected dense tensors under torch.compile, but got nested tensors; call "
                                  "torch.nn.functional.scaled_dot_product_attention on them instead.")
    pol = None
    if policy is not None:
        resolved = policy if isinstance(policy, Policy) else resolve_policy(policy)
        pol = (resolved.name, resolved.backends, resolved.fallback, resolved.memory_budget)
    name, spec, prep = _compile_choice(fields, query.device, pol)
    if not name:
        raise BackendUnavailableError(spec)
    # Under torch.compile the kernels are called through their aten overloads (or custom ops), which dynamo traces.
    run = BACKENDS[name].runner(spec, prep, traced=True)
    copied = _needs_copy(name, spec.device_type, query, key, value)  # as eagerly; dynamo guards on the strides it reads
    if any(copied):
        query, key, value = (t.contiguous() if c else t for t, c in zip((query, key, value), copied, strict=True))
    extra = () if sinks is None else (sinks,)
    if layout == "bshd":
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        return run(q, k, v, attn_mask, dropout_p, scale, *extra).transpose(1, 2)
    return run(query, key, value, attn_mask, dropout_p, scale, *extra)
