"""The one validator: every entry point's arguments are checked here, before any kernel runs.

Each check raises :class:`~sdpa_flash.errors.AttentionInputError` with one sentence that names the argument, what
was expected and what came (``Expected query to be a 4-D tensor (B, H, S, D) ..., but got a 3-D tensor ...``).
The dense call (:func:`attention_fields`), the packed call (:mod:`sdpa_flash._varlen`) and the flash-attn API
(:mod:`sdpa_flash.compat`) use the same checks with their own argument names (``query`` / ``q``, ``scale`` /
``softmax_scale``), so one kind of mistake reads the same wherever it is made.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .errors import AttentionInputError
from .spec import CAUSAL_KINDS, FLOAT_DTYPES, AttentionSpec, CausalKind, Window, dtype_name

__all__ = ["attention_fields", "attention_spec", "causal_kind", "check_dropout", "check_heads", "check_packed_window",
           "check_same", "check_scale", "check_sinks", "check_softcap", "check_tensor", "check_window", "fail"]


def fail(message: str) -> AttentionInputError:
    return AttentionInputError(message)


def check_tensor(name: str, t: Any, ndim: int, doc: str) -> torch.Tensor:
    """``t`` is a floating-point tensor with ``ndim`` dims (``doc`` describes them: ``"(B, H, S, D)"``)."""
    if not isinstance(t, torch.Tensor):
        raise fail(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__} instead.")
    if t.dim() != ndim:
        raise fail(f"Expected {name} to be a {ndim}-D tensor {doc}, but got a {t.dim()}-D tensor of shape "
                   f"{tuple(t.shape)} instead.")
    if t.dtype not in FLOAT_DTYPES:
        raise fail(f"Expected {name} to be a floating-point tensor (float16, bfloat16, float32, float64), but got "
                   f"dtype={dtype_name(t.dtype)} instead.")
    return t


def check_same(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: str = "query, key and value") -> None:
    """One dtype and one device for the three tensors."""
    if not (q.dtype == k.dtype == v.dtype):
        raise fail(f"Expected {names} to have one dtype, but got {dtype_name(q.dtype)}, {dtype_name(k.dtype)}, "
                   f"{dtype_name(v.dtype)} instead; cast them to one dtype (or run under torch.autocast).")
    if not (q.device == k.device == v.device):
        raise fail(f"Expected {names} on one device, but got {q.device}, {k.device}, {v.device} instead.")


def check_heads(hq: int, hk: int, hv: int, d: int, dk: int, dv: int, names: tuple[str, str, str] = (
        "query", "key", "value")) -> None:
    """Key and value heads agree, query heads are a multiple of them (GQA/MQA), head dims match and are non-zero."""
    qn, kn, vn = names
    if hk != hv:
        raise fail(f"Expected {kn} and {vn} to have the same number of heads, but got {hk} and {hv} instead.")
    if (hk == 0 and hq != 0) or (hk and hq % hk):
        raise fail(f"Expected the query heads ({hq}) to be a multiple of the key/value heads ({hk}) (GQA/MQA), "
                   "but they are not.")
    if d != dk:
        raise fail(f"Expected {qn} and {kn} to have the same head dim, but got {d} and {dk} instead.")
    if d == 0 or dv == 0:
        raise fail(f"Expected non-zero head dims, but got {qn}/{kn} head dim {d} and {vn} head dim {dv} instead.")


def causal_kind(causal: Any) -> CausalKind:
    """``False`` / ``True`` / ``"top_left"`` / ``"bottom_right"`` as a :data:`~sdpa_flash.spec.CausalKind`."""
    kind = CAUSAL_KINDS.get(causal, "invalid") if isinstance(causal, (int, str, type(None))) else "invalid"
    if kind == "invalid":
        raise fail(f"Expected causal to be False, True, 'top_left' or 'bottom_right', but got {causal!r} instead.")
    return kind


def check_dropout(dropout_p: Any, *, bools: bool = True) -> float:
    """A probability in [0, 1). ``bools``: ``False`` counts as 0 (Python's numeric alias, as in
    :func:`sdpa_flash.attention`); the flash-attn API refuses bools, as flash-attn's type check does."""
    ok = (isinstance(dropout_p, numbers.Real) and (bools or not isinstance(dropout_p, bool))
          and 0.0 <= float(dropout_p) < 1.0)
    if not ok:
        raise fail(f"Expected dropout_p to be a float in [0, 1), but got {dropout_p!r} instead.")
    return float(dropout_p)


def check_scale(scale: Any, name: str = "scale", *, bools: bool = True) -> float | None:
    """``None`` (``1 / sqrt(D)``) or a finite number (``bools``: ``True`` counts as 1, see :func:`check_dropout`)."""
    if scale is None:
        return None
    if not (isinstance(scale, numbers.Real) and (bools or not isinstance(scale, bool))) or not math.isfinite(scale):
        raise fail(f"Expected {name} to be None or a finite float, but got {scale!r} instead.")
    return float(scale)


def check_window(window: Any, kind: CausalKind, sq: int, sk: int, where: str = "") -> Window | None:
    """``window=(left, right)`` as the spec keeps it: ``None`` (or a negative int, flash-attn's ``-1``) on a side is
    unbounded; a side that reaches past every key, or a right side that causal masking already caps, is dropped,
    and a window with nothing left to bound is ``None`` (a plain call). ``where`` names the sequence the lengths
    belong to in the error (packed calls: ``" in sequence 3"``)."""
    if window is None:
        return None
    sides = tuple(window) if isinstance(window, (tuple, list)) else ()
    if len(sides) != 2 or not all(s is None or (isinstance(s, numbers.Integral) and not isinstance(s, bool))
                                  for s in sides):
        raise fail(f"Expected window to be None or (left, right) of ints or None (None or -1: unbounded), but got "
                   f"{window!r} instead.")
    left, right = (None if s is None or int(s) < 0 else int(s) for s in sides)
    if kind == "top_left" and sq != sk:
        raise fail(f"Expected causal=False or 'bottom_right' with a window and Sq={sq} != Sk={sk}{where}, but got "
                   "causal='top_left': windows are aligned bottom-right (query i's own position is key "
                   "i + Sk - Sq, as in flash-attn and FA4); pass causal='bottom_right'.")
    if left is not None and left >= sk - 1:
        left = None
    if right is not None and (right >= sq - 1 or (kind is not None and right >= 0)):
        right = None
    return None if left is None and right is None else (left, right)


def check_packed_window(window: Any, kind: CausalKind, seqlens_q: tuple[int, ...], seqlens_k: tuple[int, ...]
                        ) -> Window | None:
    """:func:`check_window` for a ragged batch, whose window is aligned per sequence (bottom-right: query i of
    sequence s sees key j iff ``-left <= j - (i + Lk_s - Lq_s) <= right``): the same checks and errors, the top-left
    one asked of every sequence that has queries and keys, and a side dropped only when it reaches past every key of
    every sequence."""
    if window is not None and kind == "top_left":
        for i, (lq, lk) in enumerate(zip(seqlens_q, seqlens_k, strict=True)):
            if lq != lk and lq and lk:
                return check_window(window, kind, lq, lk, f" in sequence {i}")  # (raises)
        kind = "bottom_right"  # every sequence with queries and keys is square: the two corners are one
    return check_window(window, kind, max(seqlens_q, default=0), max(seqlens_k, default=0))


def check_softcap(softcap: Any) -> float | None:
    """``None`` or 0 (off), else a finite number > 0."""
    if softcap is None:
        return None
    ok = isinstance(softcap, numbers.Real) and not isinstance(softcap, bool) and math.isfinite(softcap)
    if not ok or softcap < 0:
        raise fail(f"Expected softcap to be None or a finite float >= 0 (0: off), but got {softcap!r} instead.")
    return float(softcap) or None


def check_sinks(sinks: Any, heads_q: int, device: torch.device) -> bool:
    """``None``, or one sink logit per query head: a floating-point tensor of shape ``(Hq,)`` on the query's
    device."""
    if sinks is None:
        return False
    if not isinstance(sinks, torch.Tensor):
        raise fail(f"Expected sinks to be None or a torch.Tensor, but got {type(sinks).__name__} instead.")
    if sinks.shape != (heads_q,) or sinks.dtype not in FLOAT_DTYPES:
        raise fail(f"Expected sinks to be a floating-point tensor of shape (Hq,) = ({heads_q},), one logit per query "
                   f"head, but got shape {tuple(sinks.shape)} dtype={dtype_name(sinks.dtype)} instead.")
    if sinks.device != device:
        raise fail(f"Expected sinks on {device} like the query, but got {sinks.device} instead.")
    return True


# ------------------------------------------------------------------------------------------- the dense call
def attention_spec(query: Any, key: Any, value: Any, attn_mask: Any, causal: Any, dropout_p: Any, scale: Any,
                   layout: Any, window: Any = None, softcap: Any = None, sinks: Any = None) -> AttentionSpec:
    """Check the arguments of :func:`sdpa_flash.attention` and summarise them (see :func:`attention_fields`)."""
    return AttentionSpec(**attention_fields(query, key, value, attn_mask, causal, dropout_p, scale, layout, window,
                                            softcap, sinks))


def attention_fields(query: Any, key: Any, value: Any, attn_mask: Any, causal: Any, dropout_p: Any, scale: Any,
                     layout: Any, window: Any = None, softcap: Any = None, sinks: Any = None) -> dict[str, Any]:
    """Check every argument of the dense call (the arguments as passed: checking them is the point) and return the
    :class:`~sdpa_flash.spec.AttentionSpec`'s fields by name.

    A dictionary of plain values rather than the spec itself: ``torch.compile`` traces this function and hands the
    fields to a function it treats as constant, which builds the spec (dynamo cannot pass a dataclass it builds).
    """
    if layout not in ("bhsd", "bshd"):
        raise fail(f"Expected layout to be 'bhsd' (B, H, S, D) or 'bshd' (B, S, H, D), but got {layout!r} instead.")
    doc = f"{'(B, H, S, D)' if layout == 'bhsd' else '(B, S, H, D)'} for layout={layout!r}"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, 4, doc)
    check_same(query, key, value)
    nested = bool(getattr(query, "is_nested", False))
    if nested:
        if layout != "bhsd":
            raise fail("Expected layout='bhsd' (B, H, j, D) for nested tensors, but got 'bshd' instead.")
        b, hq, d = query.size(0), query.size(1), query.size(-1)
        hk, hv, dk, dv = key.size(1), value.size(1), key.size(-1), value.size(-1)
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
        if hk == hv and sk != sv:
            raise fail(f"Expected key and value to have the same sequence length, but got {sk} and {sv} instead.")
    check_heads(hq, hk, hv, d, dk, dv)
    kind = causal_kind(causal)
    check_dropout(dropout_p)
    check_scale(scale)
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
        if nested:
            raise fail("Expected attn_mask=None with nested tensors (their raggedness is the mask), but got a mask.")
        full = (b, hq, sq, sk)
        ok = attn_mask.dim() <= 4 and all(
            m in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full), strict=False)
        )
        if not ok:
            raise fail(f"Expected attn_mask to broadcast to (B, Hq, Sq, Sk) = {full}, but got shape "
                       f"{tuple(attn_mask.shape)} instead.")
    extras = window is not None or softcap is not None or sinks is not None
    if extras and nested:
        raise fail("Expected no window, softcap or sinks with nested tensors, but got one; pass the packed values "
                   "to sdpa_flash.varlen.varlen_attention_packed instead.")
    win = check_window(window, kind, sq, sk)
    cap = check_softcap(softcap)
    has_sinks = check_sinks(sinks, hq, query.device)
    grad_on = torch.is_grad_enabled()
    mask_grad = grad_on and attn_mask is not None and attn_mask.requires_grad
    needs_grad = mask_grad or (grad_on and (query.requires_grad or key.requires_grad or value.requires_grad or (
        has_sinks and sinks.requires_grad)))
    return {"device_type": query.device.type, "dtype": query.dtype, "batch": b, "heads_q": hq, "heads_kv": hk,
            "seqlen_q": sq, "seqlen_k": sk, "head_dim": d, "head_dim_v": dv, "causal": kind, "mask": mask_kind,
            "dropout": dropout_p > 0, "needs_grad": needs_grad, "nested": nested, "mask_grad": mask_grad,
            "window": win, "softcap": cap, "sinks": has_sinks}
