"""Verifying attention against float64 math: the tolerance rule, random problems, and what actually ran.

Used by sdpa_flash's own tests, the CLI self-check, and by users for their models. Nothing here needs
``hypothesis`` except :func:`attention_problems` (and :func:`register_hypothesis_profiles`), which import it
when called, so ``import sdpa_flash.testing`` works without it.

The tolerance rule
------------------
One rule for every backend, dtype, device, output and gradient::

    |candidate_i - ref64_i| <= K * max_j |math_j - ref64_j|  +  FLOOR_UNITS * (eps * M_i + eps_acc * Ms_i)

for every compared element ``i``, where

* ``ref64`` is PyTorch's math backend in float64 on the same (already rounded) inputs, and ``math`` the math
  backend in the candidate's own dtype: a candidate may be ``K = 2`` times as far from the exact answer as
  PyTorch's own implementation is in that dtype — flash-attn's rule for its own kernels;
* the second term, the *floor*, is what any correct kernel must be allowed however lucky the math backend is:
  ``eps`` is the machine epsilon of the candidate's dtype, ``eps_acc`` that of its accumulation type (float32,
  or float64 for float64); ``M_i`` is element ``i`` evaluated with the absolute value of every factor (``P|V|``
  for the output, ``P^T|dO|`` for dV, ``scale * (P o (|dO||V|^T + rowsum|dO o O|)) |K|`` for dQ, ...: the size
  of what a kernel rounds when it stores P, dS or O in the input dtype), and ``Ms_i`` is how far element ``i``
  moves, to first order, per unit relative error in the attention scores (which kernels accumulate in
  ``eps_acc``). ``FLOOR_UNITS = 2``.

Why this floor and not a larger K (evidence: 30,000 random CPU problems, B <= 2, H <= 4, S <= 160, D <= 16,
every causal kind and mask, torch 2.13; ``tests/test_testing.py`` keeps the pieces of it that are cheap):

* PyTorch's math backend computes float16/bfloat16 in float32 and rounds once at the end (unless
  ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``): 99.98% of its half-precision outputs
  are the correctly rounded float64 result, so its error is the output's own rounding. A FlashAttention-2
  kernel rounds P to the input dtype before ``P @ V`` and computes the backward's ``rowsum(dO o O)`` from the
  rounded output, so the ratio of the two errors is unbounded whenever the math backend happens to be exact
  — e.g. one visible key, where math's dQ is exactly 0 (an all-cancelling row). Measured on PyTorch's CPU
  flash kernel: error / same-dtype math error reached 2.9 (float16 output), 6.7 (float32 dV) and infinity
  (math exact) in 30-50% of half-precision dQ/dK cases. No finite K is the fix.
* The floor it replaces, ``8 * eps * max(1, max|ref64|)``, was unsound both ways: in bfloat16/float16 it
  was above ``2 x`` the math error in every one of 2,400 cases (so K never decided anything there, and the
  rule tolerated 16 half-ulps at unit scale), while float64 gradients still failed it (16 of 286) because
  the magnitude of a result that cancels to ~0 is not the magnitude of what was rounded; and ``max(1, .)``
  made it depend on the inputs being of unit scale.
* The new floor is a first-order error bound of the algorithm class: a kernel with float32 accumulators that
  stores P (forward) or dS and uses the stored O (backward) in the input dtype is off by at most about
  ``eps * M`` (forward) and ``1.5 * eps * M`` (backward); ``FLOOR_UNITS = 2`` covers both. Measured, the
  largest floor actually needed beyond ``K x math`` was 0.4 units (half precision) and 0.2 units (float32,
  float64) on the CPU kernels and the chunked backend. It shrinks with the inputs' scale, never asks for
  less than the rounding of stored intermediates, and in float64 (where ``math`` *is* the reference, so the
  K term is 0) it is the whole tolerance: a few float64 ulps of the terms summed.

Non-finite inputs are compared as what they are: a NaN or infinity of the candidate must sit where the reference
has the same one, and the floor of every other element is computed with the non-finite input elements taken as
0 (an element that does not see them owes them nothing; one that does is NaN or infinite in the reference).

Rows of queries that see no key (``causal="bottom_right"`` with ``Sq > Sk``, a mask row that is all False)
have no defined output yet. :func:`compare_attention` leaves them out of the value comparison, the upstream
gradient of those rows is zero (so they feed nothing into dK/dV), and ``tests/test_properties.py`` checks
separately that every backend and the reference agree on them (on torch 2.13 CPU all give 0, and dQ 0).
"""

from __future__ import annotations

from .._tolerance import FLOOR_UNITS, K
from ._compare import Comparison, assert_close_to_reference, compare_attention, compare_to_reference
from ._problems import AttentionProblem, ProblemParams, References, attention_outputs, attention_references
from ._profiles import PROPERTY_PROFILES, PropertyProfile, property_profile, register_hypothesis_profiles
from ._ran import ran_backends
from ._reference import reference_attention
from ._strategies import attention_problems

__all__ = [
    "FLOOR_UNITS",
    "PROPERTY_PROFILES",
    "AttentionProblem",
    "Comparison",
    "K",
    "ProblemParams",
    "PropertyProfile",
    "References",
    "assert_close_to_reference",
    "attention_outputs",
    "attention_problems",
    "attention_references",
    "compare_attention",
    "compare_to_reference",
    "property_profile",
    "ran_backends",
    "reference_attention",
    "register_hypothesis_profiles",
]
