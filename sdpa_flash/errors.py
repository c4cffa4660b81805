"""The library's exception family.

Every error sdpa_flash raises on purpose derives from :class:`SdpaFlashError`, so callers can catch the
whole family in one clause. Bad input is also a :class:`ValueError` (or :class:`TypeError` where the
*type* of an argument is wrong), so code written against plain PyTorch keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "AttentionInputError",
    "BackendUnavailableError",
    "KernelFailedError",
    "SdpaFlashError",
    "ShadowMismatchError",
    "TunedTableError",
    "TunedTableWarning",
]


class SdpaFlashError(Exception):
    """Base class of every error raised by sdpa_flash."""


class AttentionInputError(SdpaFlashError, ValueError):
    """The arguments of a call are invalid; the message says which one, what it was and what is expected."""


class BackendUnavailableError(SdpaFlashError, RuntimeError):
    """No backend allowed by the policy can run these inputs on this device.

    Attributes:
        inputs: a one-line description of the inputs (shapes, dtype, device, options).
        reasons: every backend that was tried, in order, with the reasons it could not run.
    """

    def __init__(
        self,
        message: str,
        *,
        inputs: str = "",
        reasons: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.inputs = inputs
        self.reasons: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in (reasons or {}).items()}
        lines = [message]
        if inputs:
            lines.append(f"  inputs: {inputs}")
        for name, why in self.reasons.items():
            lines.append(f"  `{name}` is not supported because:")
            lines.extend(f"    - {w}" for w in why)
        super().__init__("\n".join(lines))


class KernelFailedError(SdpaFlashError, RuntimeError):
    """A backend's kernel failed at its first call on these inputs (a JIT compile error, an unsupported tile), and
    the policy does not let sdpa_flash move on to another backend (a single backend, ``"fused"``, or
    ``fallback="error"``), or the next backend failed too. The kernel's own exception is the ``__cause__``.

    Attributes:
        backend: the backend whose kernel failed.
        inputs: a one-line description of the inputs.
    """

    def __init__(self, message: str, *, backend: str, inputs: str) -> None:
        self.backend, self.inputs = backend, inputs
        super().__init__(message)


class ShadowMismatchError(SdpaFlashError, RuntimeError):
    """A shadow check (``SDPA_FLASH_SHADOW``, ``SDPA_FLASH_SHADOW_ACTION=raise``) found a backend's output
    beyond tolerance of the float32 math reference on the sampled rows.

    Attributes:
        backend: the backend that ran.
        inputs: a one-line description of the inputs.
        error: the largest absolute error on the sample (``inf`` for a NaN/inf where the reference has none).
        bound: the tolerance at that element.
    """

    def __init__(self, message: str, *, backend: str, inputs: str, error: float, bound: float) -> None:
        self.backend, self.inputs, self.error, self.bound = backend, inputs, error, bound
        super().__init__(message)


class TunedTableError(SdpaFlashError, ValueError):
    """A tuned table file (``python -m sdpa_flash tune``) is not valid: the message names the file, what is wrong and
    what was expected. The planner never raises it: it ignores such a file with a :class:`TunedTableWarning`."""


class TunedTableWarning(UserWarning):
    """A tuned table was found and ignored (corrupt, another format, another GPU, or measured with other versions);
    issued once per file and problem, with what to do about it."""
