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
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import _caches, _shadow
from . import policy as _policy
from . import stats as _stats
from .backends import BACKENDS
from .backends._base import make_runner, merge_causal
from .capability import capabilities
from .errors import AttentionInputError, BackendUnavailableError
from .planner import Plan, _nondeterministic, plan
from .policy import Policy, PolicyLike, resolve_policy
from .spec import CAUSAL_KINDS, FLOAT_DTYPES, AttentionSpec, dtype_name

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
) -> torch.Tensor:
    """:func:`sdpa_flash.attention` without ``key_padding_mask``: validate, plan (cached), run one kernel.

    The dense call both :func:`sdpa_flash.attention` and the varlen engine's grouped path stand on; see
    :func:`sdpa_flash.attention` for the arguments.
    """
    if _compiling():
        return _compiled(query, key, value, attn_mask, causal, dropout_p, scale, layout, policy)
    if policy is None:
        pol = _block_policy() or _policy._process_policy or _policy._env_policy or _policy._from_env()
    else:
        pol = policy if type(policy) is Policy else (type(policy) is str and _resolved.get(policy)) or _resolve(policy)
    if _mode_on() or _has_tf(query, key, value) or F.scaled_dot_product_attention is not _SDPA or (
        _any_autocast() and _autocast_enabled(query.device.type)
    ):
        return _special(query, key, value, attn_mask, causal, dropout_p, scale, layout, pol)
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
            _grad_on() and (query.requires_grad or key.requires_grad or value.requires_grad) and (
                (_det_on() and 2 + _det_warn()) or True),
        )
        run, fallback, _, counter = _cache[ck]
    except KeyError:
        run, fallback, _, counter = _build(ck, query, key, value, attn_mask, causal, dropout_p, scale, layout, pol)
    except (AttributeError, TypeError):  # not tensors, or unhashable options: let validation say what is wrong
        _validate(query, key, value, attn_mask, causal, dropout_p, scale, layout)
        raise
    next(counter)
    if fallback is not None:
        _on_fallback(*fallback)
    try:
        return run(query, key, value, attn_mask, dropout_p, scale)
    except RuntimeError:
        _validate(query, key, value, attn_mask, causal, dropout_p, scale, layout)
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
) -> Any:
    """The :class:`~sdpa_flash.Plan` :func:`dense_attention` would follow (see :func:`sdpa_flash.explain`)."""
    pol = _policy.get_policy() if policy is None else resolve_policy(policy)
    if isinstance(query, torch.Tensor) and _autocast_enabled(query.device.type):
        query, key, value, attn_mask = _autocast_inputs(query, key, value, attn_mask)
    spec = _validate(query, key, value, attn_mask, causal, dropout_p, scale, layout)
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
    causal: bool | str, dropout_p: float, scale: float | None, layout: str, pol: Policy,
) -> tuple[Callable[..., torch.Tensor], tuple[str, str, str | None] | None, Policy, Any]:
    spec = _validate(query, key, value, attn_mask, causal, dropout_p, scale, layout)
    p = _plan_in_layout(spec, capabilities(query.device), pol, layout)
    run = BACKENDS[p.backend].runner(spec, p.prep)
    copied = _needs_copy(p.backend, spec.device_type, query, key, value)
    if any(copied):
        run = _with_copies(run, copied)
    if pol.shadow and p.backend != "math" and not spec.dropout:
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
                    s: float | None) -> torch.Tensor:
                return inner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, p_, s).transpose(1, 2)

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
    _cache[ck] = entry
    return entry


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
                   s: float | None) -> torch.Tensor:
        return run(q.contiguous() if cq else q, k.contiguous() if ck else k, v.contiguous() if cv else v, m, p_, s)

    return run_copied


_PACKAGE_DIR = __file__.rsplit("/", 1)[0].rsplit("\\", 1)[0]


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
             causal: bool | str, dropout_p: float, scale: float | None, layout: str, pol: Policy) -> torch.Tensor:
    if isinstance(query, torch.Tensor) and _autocast_enabled(query.device.type):
        query, key, value, attn_mask = _autocast_inputs(query, key, value, attn_mask)
        with torch.autocast(query.device.type, enabled=False):
            return dense_attention(query, key, value, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p,
                                   scale=scale, layout=layout, policy=pol)
    why = _interception(query, key, value)
    spec = _validate(query, key, value, attn_mask, causal, dropout_p, scale, layout)
    if not spec.nested:
        p = plan(spec, capabilities(query.device), pol)  # the policy still has to allow the call
        next(_stats.plan_counter(p.backend, "sdpa", spec.describe()))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value)) if layout == "bshd" else (query, key, value)
    kind = spec.effective_causal
    is_causal = kind == "top_left" and attn_mask is None
    if kind is not None and not is_causal:
        attn_mask = merge_causal(attn_mask, kind, spec.seqlen_q, spec.seqlen_k, q.device)
    kwargs: dict[str, Any] = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if spec.gqa:
        kwargs["enable_gqa"] = True
    del why
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out.transpose(1, 2) if layout == "bshd" else out


# ---------------------------------------------------------------------------------------- torch.compile
_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)
def _compile_choice(fields: tuple[Any, ...], device: torch.device, pol: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """Plan once, while torch.compile traces; the result is baked into the graph as constants."""
    spec = AttentionSpec(*fields)
    policy = _policy.get_policy() if pol is None else Policy(*pol)
    try:
        p = plan(spec, capabilities(device), policy)
    except BackendUnavailableError as exc:
        return ("", str(exc))  # raised as a typed error by the traced code: dynamo wraps errors raised here
    if p.fallback and p.policy.fallback == "warn_once":
        warnings.warn(f"sdpa_flash fell back to the {p.backend} backend for {spec.describe()} (decided while "
                      "compiling). Use sdpa_flash.explain(...) for details.", UserWarning, stacklevel=2)
    b = BACKENDS[p.backend]
    return (p.backend, b.MASKED_VALUE, b.ZERO_MASKED_ROWS, *dataclasses.astuple(p.prep))


# What torch.compiler.assume_constant_result does (in torch 2.5 through 2.13), without importing torch._dynamo
# (1.5 s) when sdpa_flash is imported: dynamo calls the function while tracing and bakes the result in.
_compile_choice._dynamo_marked_constant = True  # type: ignore[attr-defined]  # a function attribute dynamo reads


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
              causal: bool | str, dropout_p: float, scale: float | None, layout: str, policy: PolicyLike | None
              ) -> torch.Tensor:
    """attention() as torch.compile traces it: same validation and plan, no per-call cache or contextvars.

    The policy is the ``policy=`` argument, else the one in force when the function is compiled.
    """
    fields = _validate_fields(query, key, value, attn_mask, causal, dropout_p, scale, layout)
    # The plan depends on the sizes, so they must reach _compile_choice as Python ints: with dynamic shapes
    # this specialises the graph on them (recompiling per distinct attention shape, as static shapes do).
    # (With dynamic=True dynamo also makes float defaults such as dropout_p symbolic: branch to a constant.)
    fields = (*fields[:2], *(_concrete_int(f) for f in fields[2:9]), fields[9], fields[10],
              True if fields[11] else False, *fields[12:])
    if fields[-1]:
        raise AttentionInputError("Expected dense tensors under torch.compile, but got nested tensors; call "
                                  "torch.nn.functional.scaled_dot_product_attention on them instead.")
    pol = None
    if policy is not None:
        resolved = policy if isinstance(policy, Policy) else resolve_policy(policy)
        pol = (resolved.name, resolved.backends, resolved.fallback, resolved.memory_budget)
    choice = _compile_choice(fields, query.device, pol)
    if not choice[0]:
        raise BackendUnavailableError(choice[1])
    name, masked_value, zero_rows, *prep = choice
    # Under torch.compile the kernels are called through their aten overloads (or custom ops), which dynamo traces.
    kernel = BACKENDS[name].kernel(fields[0], traced=True)
    run = make_runner(kernel, fields[12], masked_value, zero_rows, fields[7], fields[8], fields[5], *prep)
    copied = _needs_copy(name, fields[0], query, key, value)  # as eagerly; dynamo guards on the strides it reads
    if any(copied):
        query, key, value = (t.contiguous() if c else t for t, c in zip((query, key, value), copied, strict=True))
    if layout == "bshd":
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        return run(q, k, v, attn_mask, dropout_p, scale).transpose(1, 2)
    return run(query, key, value, attn_mask, dropout_p, scale)


# ------------------------------------------------------------------------------------------ validation
# The arguments as the caller passed them (Any: checking them is the point)
def _validate(query: Any, key: Any, value: Any, attn_mask: Any, causal: Any, dropout_p: Any, scale: Any,
              layout: Any) -> AttentionSpec:
    return AttentionSpec(*_validate_fields(query, key, value, attn_mask, causal, dropout_p, scale, layout))


def _validate_fields(query: Any, key: Any, value: Any, attn_mask: Any, causal: Any, dropout_p: Any, scale: Any,
                     layout: Any) -> tuple[Any, ...]:
    """Check every argument (typed errors naming the problem) and return the AttentionSpec's fields."""

    def fail(msg: str) -> AttentionInputError:
        return AttentionInputError(msg)

    if layout not in ("bhsd", "bshd"):
        raise fail(f"Expected layout to be 'bhsd' (B, H, S, D) or 'bshd' (B, S, H, D), but got {layout!r} instead.")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise fail(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__} instead.")
    shape_doc = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise fail(f"Expected {name} to be 4-D {shape_doc} for layout={layout!r}, but got a {t.dim()}-D "
                       f"tensor of shape {tuple(t.shape)} instead.")
        if t.dtype not in FLOAT_DTYPES:
            raise fail(f"Expected {name} to be a floating-point tensor (float16, bfloat16, float32, float64), "
                       f"but got dtype={dtype_name(t.dtype)} instead.")
    if not (query.dtype == key.dtype == value.dtype):
        raise fail("Expected query, key and value to have one dtype, but got "
                   f"{dtype_name(query.dtype)}, {dtype_name(key.dtype)}, {dtype_name(value.dtype)} instead; "
                   "cast them to one dtype (or run under torch.autocast).")
    if not (query.device == key.device == value.device):
        raise fail(f"Expected query, key and value on one device, but got {query.device}, {key.device}, "
                   f"{value.device} instead.")
    nested = bool(getattr(query, "is_nested", False))
    if nested:
        if layout != "bhsd":
            raise fail("Expected layout='bhsd' (B, H, j, D) for nested tensors, but got 'bshd' instead.")
        b, hq, d = query.size(0), query.size(1), query.size(-1)
        hk, dk, dv = key.size(1), key.size(-1), value.size(-1)
        sq = sk = 1  # ragged; the spec's lengths are placeholders
    else:
        if layout == "bhsd":
            b, hq, sq, d = query.shape
            bk, hk, sk, dk = key.shape
            bv, hv, sv, dv = value.shape
        else:
            b, sq, hq, d = query.shape
            bk, sk, hk, dk = key.shape
            bv, sv, hv, dv = value.shape
        if not (b == bk == bv):
            raise fail(f"Expected query, key and value to have one batch size, but got {b}, {bk}, {bv} instead.")
        if hk != hv:
            raise fail(f"Expected key and value to have the same number of heads, but got {hk} and {hv} instead.")
        if sk != sv:
            raise fail(f"Expected key and value to have the same sequence length, but got {sk} and {sv} instead.")
    if d != dk:
        raise fail(f"Expected query and key to have the same head dim, but got {d} and {dk} instead.")
    if d == 0 or dv == 0:
        raise fail(f"Expected non-zero head dims, but got query/key head dim {d} and value head dim {dv} instead.")
    if (hk == 0 and hq != 0) or (hk and hq % hk):
        raise fail(f"Expected the query heads ({hq}) to be a multiple of the key/value heads ({hk}) (GQA/MQA), "
                   "but they are not.")
    kind = CAUSAL_KINDS.get(causal, "invalid") if isinstance(causal, (int, str, type(None))) else "invalid"
    if kind == "invalid":
        raise fail(f"Expected causal to be False, True, 'top_left' or 'bottom_right', but got {causal!r} instead.")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise fail(f"Expected dropout_p to be a float in [0, 1), but got {dropout_p!r} instead.")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise fail(f"Expected scale to be None or a finite float, but got {scale!r} instead.")
    mask_kind = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise fail(f"Expected attn_mask to be a torch.Tensor or None, but got {type(attn_mask).__name__} instead.")
        if attn_mask.device != query.device:
            raise fail(f"Expected attn_mask on {query.device} like the query, but got {attn_mask.device} instead.")
        if attn_mask.dtype == torch.bool:
            mask_kind = "bool"
        elif attn_mask.dtype == query.dtype:
            mask_kind = "float"
        else:
            raise fail(f"Expected attn_mask to be boolean or of the query's dtype {dtype_name(query.dtype)}, but got "
                       f"dtype={dtype_name(attn_mask.dtype)} instead.")
        full = (b, hq, sq, sk)
        if nested:
            raise fail("Expected attn_mask=None with nested tensors (their raggedness is the mask), but got a mask.")
        ok = attn_mask.dim() <= 4 and all(
            m in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full), strict=False)
        )
        if not ok:
            raise fail(f"Expected attn_mask to broadcast to (B, Hq, Sq, Sk) = {full}, but got shape "
                       f"{tuple(attn_mask.shape)} instead.")
    grad_on = torch.is_grad_enabled()
    mask_grad = grad_on and attn_mask is not None and attn_mask.requires_grad
    needs_grad = mask_grad or (grad_on and (query.requires_grad or key.requires_grad or value.requires_grad))
    return (query.device.type, query.dtype, b, hq, hk, sq, sk, d, dv, kind, mask_kind, dropout_p > 0, needs_grad,
            nested, mask_grad)
