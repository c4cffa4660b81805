"""Property profiles: named budgets for property-based tests, and their hypothesis profiles."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["PROPERTY_PROFILES", "PropertyProfile", "property_profile", "register_hypothesis_profiles"]


@dataclasses.dataclass(frozen=True)
class PropertyProfile:
    """A named budget for property-based tests (the hypothesis profile of the same name, plus a device).

    Attributes:
        name: ``"ci"``, ``"gpu"`` or ``"dev"``.
        device: ``"cpu"`` or ``"cuda"``: where the properties run.
        max_examples: examples per headline test and parameter (the accuracy of one backend in one dtype:
            every backend and dtype on the CPU, the fused backends in float16/bfloat16 on CUDA).
        derandomize: a fixed seed per test (reproducible runs, no example database).
        description: one line.
        secondary: the share of ``max_examples`` every other property gets per parameter (see
            :meth:`examples`).
    """

    name: str
    device: str
    max_examples: int
    derandomize: bool
    description: str
    secondary: float = 0.4

    def examples(self, share: float = 1.0) -> int:
        """``max_examples * share``, rounded, at least 1: the one place a test's example count comes from.

        Example:
            >>> PROPERTY_PROFILES["ci"].examples(PROPERTY_PROFILES["ci"].secondary)
            120
        """
        return max(1, round(self.max_examples * share))


PROPERTY_PROFILES: dict[str, PropertyProfile] = {
    p.name: p for p in (
        PropertyProfile("ci", "cpu", 300, True,
                        "CPU, derandomized: >= 10,000 cases in a few minutes on 2 cores (the default)", 0.4),
        PropertyProfile("gpu", "cuda", 1000, True,
                        "CUDA: >= 1,000 cases per fused backend and half-precision dtype, forward and backward",
                        0.05),
        PropertyProfile("gpu-quick", "cuda", 400, True,
                        "CUDA: 400 cases per fused backend and half-precision dtype, for kernels that compile per "
                        "configuration (FlashAttention-4) or a short GPU session", 0.05),
        PropertyProfile("dev", "cpu", 40, False,
                        "CPU, random seeds and a local example database: quick runs while developing", 0.5),
    )
}
"""The profiles, by name; select one with ``SDPA_FLASH_HYPOTHESIS_PROFILE`` (default ``"ci"``)."""

_PROFILE_ENV = "SDPA_FLASH_HYPOTHESIS_PROFILE"


def property_profile() -> PropertyProfile:
    """The profile named by ``SDPA_FLASH_HYPOTHESIS_PROFILE`` (``"ci"`` when unset); an unknown name raises."""
    name = os.environ.get(_PROFILE_ENV, "") or "ci"
    try:
        return PROPERTY_PROFILES[name]
    except KeyError:
        from ..errors import AttentionInputError

        raise AttentionInputError(f"Expected {_PROFILE_ENV} to be one of {', '.join(PROPERTY_PROFILES)}, but got "
                                  f"{name!r} instead.") from None


def register_hypothesis_profiles() -> PropertyProfile:
    """Register every :data:`PROPERTY_PROFILES` entry with hypothesis and load the selected one.

    All profiles: no deadline (first calls plan and compile kernels), ``print_blob=True`` (a failure prints
    ``@reproduce_failure``), and the falsifying problem is printed as code that rebuilds it.

    Returns:
        The loaded :class:`PropertyProfile`.
    """
    from hypothesis import HealthCheck, settings

    for p in PROPERTY_PROFILES.values():
        extra: dict[str, Any] = {"database": None} if p.derandomize else {}
        settings.register_profile(p.name, max_examples=p.max_examples, derandomize=p.derandomize, deadline=None,
                                  print_blob=True, suppress_health_check=[HealthCheck.too_slow], **extra)
    chosen = property_profile()
    settings.load_profile(chosen.name)
    return chosen
