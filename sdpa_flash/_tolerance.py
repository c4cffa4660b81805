"""The tolerance rule's constants, below everything that compares numbers: the tests (:mod:`sdpa_flash.testing`)
and the runtime shadow check (:mod:`sdpa_flash._shadow`) both take them from here.

The rule (derived and evidenced in :mod:`sdpa_flash.testing`'s docstring): every element of a candidate output or
gradient may be at most ``K`` times as far from the float64 reference as PyTorch's math backend is in the same
dtype, plus a floor of ``FLOOR_UNITS`` units of the algorithm's own first-order rounding bound at that element.
"""

from __future__ import annotations

__all__ = ["FLOOR_UNITS", "K"]

K = 2.0
"""How many times the same-dtype math backend's error a candidate may have."""

FLOOR_UNITS = 2.0
"""The floor, in units of ``eps * M + eps_acc * Ms`` (``M = P|V|``, ``Ms`` the score-magnitude term)."""
