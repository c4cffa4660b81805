"""What every flash-attn entry point shares: the shape legends, and a prepared call (validated and planned).

Each public function is ``_execute(_prepare_<name>(...))``; ``explain_flash_attn`` runs only the preparation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..spec import dtype_name
from ._plan import CompatPlan

__all__ = ["BSHD", "THD", "Call", "describe", "execute"]

BSHD = "(batch_size, seqlen, nheads, headdim)"
THD = "(total, nheads, headdim)"


@dataclasses.dataclass
class Call:
    """A validated, planned call, ready to run."""

    plan: CompatPlan
    run: Callable[[], Any]


def execute(call: Call) -> Any:
    return call.run()


def describe(x: Any) -> str:
    """``a 4-D bfloat16 tensor of shape (2, 64, 8, 128)``, or the type's name, for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {dtype_name(x.dtype)} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
