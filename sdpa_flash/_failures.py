"""Kernels that failed at their first call here: the reasons the planner reads, and the one reroute.

A kernel can refuse a configuration only when it runs: a JIT compiler that cannot build a tile (FA4 compiles each
new configuration on its first call), a kernel image missing for this GPU, a shape a library rejects past its
documented limits. Under ``auto`` such a failure must not end a user's training run when another backend could have
run the call, and it must not be retried on every call either. So the first failure of a backend for a class of
calls is recorded here, in this process; the planner treats it as one more reason that backend cannot run that
class (``explain()`` shows it); the call moves on to the next backend once, with one warning. A strict policy (one
backend, or ``"fused"``) and ``fallback="error"`` raise :class:`~sdpa_flash.errors.KernelFailedError` with the
kernel's own message instead.

What is not a kernel's refusal is never recorded: input errors (they are the caller's), running out of memory
(another backend would need more, not less), and failures after a configuration has run once (those are not about
whether the kernel can build it).

The class of a call is its :class:`~sdpa_flash.spec.AttentionSpec` with the batch size left out: the batch never
changes which kernel a library builds, the sequence lengths can (FA4 gives a query of one tile its own kernel). A
backend's packed (``cu_seqlens``) kernel is recorded apart from its dense one, under ``"<name> (packed)"``, for the
spec the planner gives a ragged batch (its longest query and key as one sequence).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from . import _caches
from .spec import AttentionSpec

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["failure_reasons", "forget_failures", "is_refusal", "record_failure", "record_or_raise", "recorded_failures",
           "retrying"]

_failed: dict[tuple[str, AttentionSpec], str] = {}


def is_refusal(exc: BaseException) -> bool:
    """Whether a kernel's exception at its first call may be the kernel refusing the configuration: not one of our
    own errors (they are the caller's), not running out of memory."""
    from .errors import SdpaFlashError

    oom = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
    return not isinstance(exc, (SdpaFlashError, *oom)) and "out of memory" not in str(exc).lower()


def _class_of(spec: AttentionSpec) -> AttentionSpec:
    return dataclasses.replace(spec, batch=1) if spec.batch != 1 else spec


def record_failure(backend: str, spec: AttentionSpec, exc: BaseException) -> str:
    """Record that ``backend`` failed at its first call on ``spec``'s class; returns the reason as the planner will
    give it. Every cached plan is made afresh."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
    if len(message) > 300:
        message = message[:297] + "..."
    reason = f"failed at its first call in this process: {type(exc).__name__}: {message}"
    _failed[(backend, _class_of(spec))] = reason
    _caches.clear_all()
    return reason


_retrying: contextvars.ContextVar[str] = contextvars.ContextVar("sdpa_flash_retrying", default="")


def record_or_raise(backend: str, recorded_as: str, spec: AttentionSpec, exc: BaseException, policy: Policy,
                    inputs: str, what: str) -> str:
    """The one decision after a first-call failure (``what`` says it in words): raise
    :class:`~sdpa_flash.errors.KernelFailedError` when ``policy`` allows no other backend (one backend, ``"fused"``,
    ``fallback="error"``) or the call is already a retry after another failure; else record it under
    ``recorded_as`` for ``spec``'s class and return the reason the planner will give. The caller then retries the
    call once, inside :func:`retrying`."""
    from .errors import KernelFailedError

    earlier = _retrying.get()
    if earlier or policy.strict or policy.fallback == "error":
        why = (f"after {earlier}" if earlier else f"policy {policy} allows no other backend" if policy.strict
               else f"policy {policy} has fallback='error'")
        raise KernelFailedError(
            f"sdpa_flash: {what} ({why}). Run it under policy='auto' to let another backend take these inputs, or "
            f"report the kernel's error to the {backend} kernel's project.", backend=backend, inputs=inputs) from exc
    return record_failure(recorded_as, spec, exc)


@contextlib.contextmanager
def retrying(what: str) -> Iterator[None]:
    """The retry after the failure ``what``: a second first-call failure inside it raises, naming both."""
    token = _retrying.set(what)
    try:
        yield
    finally:
        _retrying.reset(token)


def failure_reasons(backend: str, spec: AttentionSpec) -> list[str]:
    """The recorded first-call failure of ``backend`` on ``spec``'s class, as a reason (empty: none)."""
    if not _failed:
        return []
    why = _failed.get((backend, _class_of(spec)))
    return [why] if why else []


def recorded_failures() -> dict[tuple[str, AttentionSpec], str]:
    """Every recorded failure: ``(backend, class of call) -> reason`` (a copy)."""
    return dict(_failed)


def forget_failures() -> None:
    """Forget every recorded failure (after upgrading a kernel in place, or in tests): the backends are tried again."""
    if _failed:
        _failed.clear()
        _caches.clear_all()
