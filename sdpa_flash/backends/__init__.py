"""The backends — SDPA's kernels, optional ones such as FlashAttention-4, and any a user plugs in — one module each.

``BACKENDS`` maps each registered backend's name to its instance, in registration order. The built-in backends
register through the same door as a user's (:func:`register_backend`); their places in ``auto``'s ranking come
from the measured tables (``sdpa_flash/_ranking.py``), a plug-in's from where it asked to stand.
"""

from __future__ import annotations

import re

from .. import _caches
from ..errors import AttentionInputError
from ._base import Backend, Device, KernelCall, KernelFn, KernelOptions, Prep, Requirements, Runner
from .chunked import ChunkedBackend
from .cudnn import CudnnBackend
from .efficient import EfficientBackend
from .fa4 import FA4Backend
from .flash import FlashBackend
from .flex import FlexBackend
from .math import MathBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "Device",
    "KernelCall",
    "KernelFn",
    "KernelOptions",
    "Prep",
    "Requirements",
    "Runner",
    "get_backend",
    "ranked",
    "register_backend",
    "unregister_backend",
]

BACKENDS: dict[str, Backend] = {}
_BUILTIN: frozenset[str] = frozenset()
_PLACES: dict[str, str | None] = {}  # plug-in -> the backend it is ranked just before (None: last)
# built-in backends that no measured ranking lists, and where they stand in every one: FlexAttention after every
# fused SDPA kernel and FA4 (on an H200 it ran plain causal at ~0.7x of cuDNN), before the reference, which
# materialises what it runs natively (windows, softcap)
_BUILTIN_PLACES: dict[str, str | None] = {"flex": "math"}
_RESERVED = ("auto", "fused", "custom")  # policy names that are not backends
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _check(backend: object) -> Backend:
    if not isinstance(backend, Backend):
        raise AttentionInputError("Expected an instance of a sdpa_flash.backends.Backend subclass, but got "
                                  f"{type(backend).__name__} instead.")
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise AttentionInputError(f"Expected Backend.name to be a lower-case identifier other than "
                                  f"{', '.join(_RESERVED)}, but got {name!r} instead.")
    reqs = getattr(backend, "REQUIREMENTS", None)
    if not isinstance(reqs, dict) or not reqs or not all(
            isinstance(k, str) and isinstance(v, Requirements) for k, v in reqs.items()):
        raise AttentionInputError(f"Expected {name}.REQUIREMENTS to be a non-empty dict of device type -> "
                                  f"sdpa_flash.backends.Requirements, but got {reqs!r} instead.")
    return backend


def register_backend(backend: Backend, *, before: str | None = "math", replace: bool = False) -> None:
    """Add a backend: from now on it is planned, explained, ranked, shadow-checked and benchmarked like the
    built-in ones (every plan is made afresh).

    A backend is a :class:`Backend` subclass instance that declares its :class:`Requirements` per device type and
    returns its kernel function from :meth:`Backend.kernel` (see :data:`KernelFn`); the layer adapts every call to
    those requirements (head-dim padding, K/V repetition for GQA, causal corners, masks as additive biases) and
    refuses, with the reason, what they exclude. ``examples/plugin_backend.py`` is a complete one.

    Args:
        backend: the backend instance; its ``name`` becomes a policy name (``policy="mykernel"``).
        before: where ``auto`` (and ``fused``, for a fused backend) ranks it: just before this backend in every
            ranking, e.g. ``"cudnn"`` to prefer it wherever it can run; ``None`` ranks it last. The default puts
            it after the built-in fused kernels and before the math reference.
        replace: allow replacing a registered backend of the same name (not a built-in one).

    Raises:
        AttentionInputError: not a backend, a name that is taken or reserved, requirements that are not data,
            or ``before`` naming no registered backend.
    """
    _check(backend)
    name = backend.name
    if name in _BUILTIN:
        raise AttentionInputError(f"Expected a new backend name, but {name!r} is a built-in backend (pick another "
                                  "name, or rank yours before it with before=).")
    if name in BACKENDS and not replace:
        raise AttentionInputError(f"Expected a new backend name, but {name!r} is registered already (pass "
                                  "replace=True to replace it, or unregister_backend() it first).")
    if before is not None and (before not in BACKENDS or before == name):
        raise AttentionInputError(f"Expected before= to name a registered backend ({', '.join(BACKENDS)}) or None, "
                                  f"but got {before!r} instead.")
    BACKENDS[name] = backend
    _PLACES[name] = before
    _caches.clear_all()


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (built-in backends stay)."""
    if name not in _PLACES:
        plugged = ", ".join(_PLACES) or "none"
        raise AttentionInputError(f"Expected the name of a backend added with register_backend() ({plugged}), but "
                                  f"got {name!r} instead.")
    del BACKENDS[name], _PLACES[name]
    _caches.clear_all()


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``AttentionInputError`` listing the registered names otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise AttentionInputError(f"Expected a backend name ({known}), but got {name!r} instead.") from None


def ranked(order: tuple[str, ...], device_type: str | None = None) -> tuple[str, ...]:
    """A ranking of built-in names with the plug-ins, and the built-in backends no ranking lists (FlexAttention,
    on the device types it has kernels for), put where they stand (and no unregistered name)."""
    builtin = [(n, b) for n, b in _BUILTIN_PLACES.items() if device_type in BACKENDS[n].REQUIREMENTS]
    if not builtin and not _PLACES:
        return order
    out = [n for n in order if n in BACKENDS]
    for name, before in (*builtin, *_PLACES.items()):
        if name in out:
            continue
        anchor = before if before in out else "math"  # (a device whose ranking lacks it: before the reference)
        out.insert(out.index(anchor) if anchor in out else len(out), name)
    return tuple(out)


for _b in (FA4Backend(), CudnnBackend(), FlashBackend(), EfficientBackend(), FlexBackend(), MathBackend(),
           ChunkedBackend()):
    BACKENDS[_check(_b).name] = _b
_BUILTIN = frozenset(BACKENDS)
del _b
