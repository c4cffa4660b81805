"""What every flash-attn entry point shares: the typed errors, argument checks and the feature description.

The semantics implemented here are flash-attn 2.8's documented ones, for one sequence of ``Sq`` queries and ``Sk``
keys (per sequence in varlen calls, ``Sk`` = the keys valid after appending in kvcache calls):

* score ``s_ij = softmax_scale * q_i . k_j``; with ``softcap > 0`` it becomes ``softcap * tanh(s_ij / softcap)``;
  with ALiBi, ``- slope * |i + Sk - Sq - j|`` is then added (after the softcap, as flash-attn's kernel does);
* ``causal``: key ``j`` is visible from query ``i`` iff ``j <= i + Sk - Sq`` (bottom-right aligned);
* ``window_size=(left, right)``: visible iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``, a negative
  side meaning unbounded; ``causal=True`` sets ``right = 0``. Like flash-attn, a side at least as large as the
  key length it is compared with (``Sk``; ``max_seqlen_k`` for varlen; the cache capacity for kvcache) counts as
  unbounded;
* a query row that sees no key gives an output of 0 and a log-sum-exp of ``+inf`` (flash-attn's convention,
  so that ``exp(s - lse)`` is 0 in a backward).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import operator
from typing import Any

import torch

from .. import _validate
from ..errors import AttentionInputError, SdpaFlashError
from ..spec import dtype_name

__all__ = ["Features", "UnsupportedArgumentError"]



class UnsupportedArgumentError(SdpaFlashError, NotImplementedError):
    """A flash-attn argument (or combination) that this layer cannot compute exactly; nothing is approximated.

    Attributes:
        argument: the name of the argument, as flash-attn spells it.
    """

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(message)


def fail(message: str) -> AttentionInputError:
    return AttentionInputError(message)


@dataclasses.dataclass(frozen=True)
class Features:
    """The score modifications and masks of one call (hashable; part of the path decision).

    Attributes:
        causal: bottom-right causal masking.
        left: window left side, ``-1`` when unbounded (after flash-attn's normalisation).
        right: window right side, ``-1`` when unbounded; ``0`` whenever ``causal``.
        softcap: the softcap value, ``0.0`` when off.
        alibi: ``None``, ``"heads"`` (slopes ``(H,)``) or ``"batch_heads"`` (slopes ``(B, H)``).
    """

    causal: bool = False
    left: int = -1
    right: int = -1
    softcap: float = 0.0
    alibi: str | None = None

    @property
    def window(self) -> bool:
        """A sliding window beyond plain causal masking."""
        return self.left >= 0 or (self.right >= 0 and not (self.causal and self.right == 0))

    @property
    def extra(self) -> tuple[str, ...]:
        """The features SDPA's kernels cannot express directly (window, softcap, alibi)."""
        out = []
        if self.window:
            out.append(f"window_size=({self.left}, {self.right})")
        if self.softcap > 0:
            out.append(f"softcap={self.softcap:g}")
        if self.alibi:
            out.append("alibi_slopes")
        return tuple(out)

    def describe(self) -> str:
        parts = ["causal"] if self.causal else []
        return ", ".join([*parts, *self.extra]) or "none"


# ------------------------------------------------------------------------------------------------ checks
check_tensor = _validate.check_tensor


def check_same(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: str = "q, k and v") -> None:
    _validate.check_same(q, k, v, names)


def check_heads(hq: int, hk: int, hv: int, d: int, dk: int, dv: int) -> None:
    _validate.check_heads(hq, hk, hv, d, dk, dv, ("q", "k", "v"))


def check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise fail(f"Expected {name} to be a bool, but got {value!r} instead.")


def check_dropout(dropout_p: Any) -> float:
    return _validate.check_dropout(dropout_p, bools=False)


def check_scale(softmax_scale: Any, head_dim: int) -> float:
    """The softmax scale, ``1 / sqrt(head_dim)`` for ``None``."""
    scale = _validate.check_scale(softmax_scale, "softmax_scale", bools=False)
    return head_dim ** -0.5 if scale is None else scale


def check_softcap(softcap: Any) -> float:
    ok = isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
    if not ok or not math.isfinite(softcap) or softcap < 0:
        raise fail(f"Expected softcap to be a finite float >= 0 (0 disables it), but got {softcap!r} instead.")
    return float(softcap)


def _window_side(w: Any) -> int | None:
    """One side of a window: a Python or NumPy integer or a 0-d integer tensor (not a bool), else None."""
    if isinstance(w, torch.Tensor):
        ok = w.dim() == 0 and not (w.is_floating_point() or w.is_complex() or w.dtype == torch.bool)
        return int(w.item()) if ok else None
    if isinstance(w, numbers.Integral) and not isinstance(w, bool):
        return operator.index(w)
    return None


def check_window(window_size: Any) -> tuple[int, int]:
    """``(left, right)`` as ints; a negative side means unbounded (flash-attn writes -1).

    Accepted, as flash-attn accepts them: a tuple or list of two integers, each a Python int, a NumPy integer or a
    0-d integer tensor, or a 1-D integer tensor of two elements (flash-attn's own tests pass
    ``torch.randint(0, seqlen_k, (2,))``). A tensor's values are read on the host (one sync for a GPU tensor).
    Refused: bools, floats, and anything not of length 2.
    """
    sides: Any = None
    if isinstance(window_size, torch.Tensor):
        if window_size.dim() == 1 and window_size.numel() == 2 and not (
                window_size.is_floating_point() or window_size.is_complex() or window_size.dtype == torch.bool):
            sides = window_size.tolist()
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        sides = [_window_side(w) for w in window_size]
    if sides is None or any(w is None for w in sides):
        shown = (f"a {window_size.dim()}-D {dtype_name(window_size.dtype)} tensor of shape "
                 f"{tuple(window_size.shape)}" if isinstance(window_size, torch.Tensor) else repr(window_size))
        raise fail("Expected window_size to be a pair of ints (left, right), -1 meaning unbounded (a tuple or list "
                   "of ints, NumPy integers or 0-d integer tensors, or a 1-D integer tensor of 2 elements), but got "
                   f"{shown} instead.")
    left, right = (int(w) for w in sides)
    return (left if left >= 0 else -1), (right if right >= 0 else -1)


def features(causal: bool, window: tuple[int, int], softcap: float, alibi: str | None, seqlen_k: int) -> Features:
    """Normalise as flash-attn does: sides >= the key length are unbounded; causal sets the right side to 0."""
    left, right = window
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if not causal and left < 0 and right == 0:  # (-1, 0) is causal, as flash-attn treats it
        causal = True
    if causal:
        right = 0
    return Features(causal=causal, left=left, right=right, softcap=softcap, alibi=alibi)


def check_alibi(alibi_slopes: Any, batch: int, heads: int, device: torch.device) -> str | None:
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise fail(f"Expected alibi_slopes to be None or a torch.Tensor, but got {type(alibi_slopes).__name__} "
                   "instead.")
    if alibi_slopes.dtype != torch.float32:
        raise fail(f"Expected alibi_slopes to have dtype float32, but got dtype={dtype_name(alibi_slopes.dtype)} "
                   "instead.")
    if alibi_slopes.device != device:
        raise fail(f"Expected alibi_slopes on {device} like q, but got {alibi_slopes.device} instead.")
    shape = tuple(alibi_slopes.shape)
    if shape == (heads,):
        return "heads"
    if shape == (batch, heads):
        return "batch_heads"
    raise fail(f"Expected alibi_slopes of shape (nheads,) = ({heads},) or (batch_size, nheads) = ({batch}, {heads}), "
               f"but got {shape} instead.")


def slopes_2d(alibi_slopes: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Slopes as ``(1, H)`` or ``(B, H)`` float32."""
    if alibi_slopes is None:
        return None
    return alibi_slopes.unsqueeze(0) if alibi_slopes.dim() == 1 else alibi_slopes


def check_cu_seqlens(name: str, cu: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise fail(f"Expected {name} to be an int32 torch.Tensor of shape (batch_size + 1,), but got "
                   f"{type(cu).__name__} instead.")
    if cu.dtype != torch.int32:
        raise fail(f"Expected {name} to have dtype int32, but got dtype={dtype_name(cu.dtype)} instead.")
    if cu.dim() != 1 or cu.numel() < 1:
        raise fail(f"Expected {name} to be 1-D of shape (batch_size + 1,), but got shape {tuple(cu.shape)} instead.")
    if cu.device != device:
        raise fail(f"Expected {name} on {device} like q, but got {cu.device} instead.")
    return cu


def check_lengths(name: str, cu: list[int], total: int, max_seqlen: Any, max_name: str) -> int:
    """Values of a cu_seqlens list: leading 0, non-decreasing, within ``total``; ``max_seqlen`` covers them."""
    if cu[0] != 0:
        raise fail(f"Expected {name} to start at 0, but got {name}[0] = {cu[0]} instead.")
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    if any(n < 0 for n in lengths):
        raise fail(f"Expected {name} to be non-decreasing (cumulative lengths), but got {cu} instead.")
    if cu[-1] > total:
        raise fail(f"Expected {name}[-1] = {cu[-1]} to be at most the number of packed tokens {total}, but it "
                   "is not.")
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1 and not max_seqlen.is_floating_point():
        max_seqlen = int(max_seqlen.item())
    if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise fail(f"Expected {max_name} to be a non-negative int, but got {max_seqlen!r} instead.")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise fail(f"Expected {max_name} >= the longest sequence in {name} ({longest}), but got {max_seqlen} "
                   "instead; flash-attn would silently skip the rows past it.")
    return int(max_seqlen)


def index_values_readable(device: torch.device) -> bool:
    """Whether index tensors' values (cache_seqlens, block_table, ...) can be read on the host before a call.

    Not while ``torch.compile`` traces (the values do not exist yet), not while a CUDA graph is being captured (a
    host sync is forbidden there), and not on the meta device. Where this is False the range checks are skipped and
    out-of-range indices are the caller's responsibility, as in flash-attn.
    """
    if device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast``, cast floating inputs (not float64) to the autocast dtype, as SDPA's inputs are."""
    if not tensors or not torch.is_autocast_enabled(tensors[0].device.type):
        return tensors
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
