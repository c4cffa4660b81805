"""The decision: which path (``no_mask``, ``varlen``, ``dense``, ``packed``) one attention call takes, and why."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ...errors import AttentionInputError
from ...spec import causal_mask_tensor
from ._masks import _built, _classify, _compiling, _lookup

_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class _Decision:
    path: str
    reason: str
    causal: str | None = None
    kpm: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    window: tuple[int, int] | None = None  # a causal sliding window, passed to attention() as it is (no mask)


def _module_causal(module: Any, is_causal: bool | None) -> bool:
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def _window(sliding_window: int) -> tuple[int, int]:
    """transformers' causal ``sliding_window=W`` (query at position p sees keys in ``(p - W, p]``) as
    :func:`sdpa_flash.attention`'s ``window=(W - 1, 0)`` (bottom-right aligned, inclusive)."""
    return (int(sliding_window) - 1, 0)


def _decide(module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any, is_causal: bool | None,
            sliding_window: int | None) -> _Decision:
    sq, sk = query.shape[2], key.shape[2]
    windowed = sliding_window is not None and sk > sliding_window
    if attention_mask is None:
        causal = sq > 1 and _module_causal(module, is_causal)  # transformers' sdpa rule, top-left
        if windowed:
            if not causal:
                raise AttentionInputError(
                    f"Expected an attention mask for a non-causal layer with sliding_window={sliding_window} and "
                    f"{sk} keys, but got attention_mask=None; sdpa_flash will not ignore the window. Pass the mask "
                    "transformers builds for the window, or use attn_implementation='eager'.")
            return _Decision("no_mask", f"sliding_window={sliding_window} < {sk} keys and no mask: the window "
                             "passed to the kernel", "bottom_right", window=_window(sliding_window))  # type: ignore[arg-type]  # windowed: not None
        return _Decision("no_mask", "transformers passed no mask (no padding)", "top_left" if causal else None)
    if not isinstance(attention_mask, torch.Tensor):
        raise AttentionInputError(f"Expected attention_mask to be a torch.Tensor or None, but got "
                                  f"{type(attention_mask).__name__} instead (a flex BlockMask needs "
                                  "attn_implementation='flex_attention').")
    if attention_mask.dim() == 2:
        return _decide_2d(module, query, key, attention_mask, is_causal, windowed, sliding_window)
    mask = attention_mask
    if mask.is_floating_point() and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    if mask.dim() == 4 and mask.shape[-1] > sk:
        mask = mask[..., :sk]  # as transformers' eager/sdpa paths do for a mask longer than the keys
    if _compiling():
        return _Decision("dense", "torch.compile is tracing (the varlen path reads lengths on the host)", mask=mask)
    info = _lookup(_built, attention_mask) if attention_mask.shape[-2:] == (sq, sk) else None
    if windowed and (info is None or info[0] is None):
        # transformers' sliding-window mask: causal, the window, and key padding (or why not); the window then
        # goes to the kernel as an argument, and only the padding (if any) as a mask
        kind, kpm, _ = _classify(mask, query.shape[0], sq, sk, int(sliding_window))  # type: ignore[arg-type]  # windowed: not None
        if kind == "causal":
            reason = f"the mask is causal attention with sliding_window={sliding_window}"
            if kpm is None:
                return _Decision("no_mask", f"{reason}, no padding: the window passed to the kernel", "bottom_right",
                                 window=_window(sliding_window))  # type: ignore[arg-type]  # windowed: not None
            return _Decision("varlen", f"{reason}, with key padding: the window passed to the kernel", "bottom_right",
                             kpm=kpm, window=_window(sliding_window))  # type: ignore[arg-type]  # windowed: not None
        info = None  # not the window's: a plain mask is refused below, another pattern runs as it is
    if info is None:
        info = _classify(mask, query.shape[0], sq, sk)
    kind, kpm, why = info
    if kind is None:
        return _Decision("dense", why or "unrecognised mask", mask=mask)
    if windowed:
        raise AttentionInputError(
            f"Expected the mask of a layer with sliding_window={sliding_window} and {sk} keys to be windowed, but "
            f"transformers passed a plain {kind} mask; sdpa_flash will not ignore the window. This is a model whose "
            "mask and sliding_window disagree: use attn_implementation='eager' to get transformers' own behaviour.")
    ck = "bottom_right" if kind == "causal" and sq > 1 else None
    if kpm is None:
        return _Decision("no_mask", f"the mask is {kind} attention without padding", ck)
    return _Decision("varlen", f"{kind} attention with key padding", ck, kpm=kpm)


def _decide_2d(module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, is_causal: bool | None,
               windowed: bool, sliding_window: int | None) -> _Decision:
    """A ``(B, S)`` padding mask (1/True = real token), as flash-attention paths pass it."""
    b, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    if mask.shape[0] != b or mask.shape[1] < sk:
        raise AttentionInputError(f"Expected a 2-D attention_mask of shape (B, >= Sk) = ({b}, >= {sk}), but got "
                                  f"{tuple(mask.shape)} instead.")
    mask = mask[:, -sk:]  # the last Sk positions, as transformers' flash path slices it
    if mask.is_floating_point() and not _compiling() and not bool(((mask == 0) | (mask == 1)).all()):
        raise AttentionInputError("Expected a 2-D attention_mask of 0/1 (1 = real token), but got other values; "
                                  "pass a 4-D additive mask for a bias.")
    kpm = mask != 0
    causal = sq > 1 and _module_causal(module, is_causal)
    ck = "bottom_right" if causal else None
    window = _window(sliding_window) if windowed else None  # type: ignore[arg-type]  # windowed: not None
    if windowed and not causal:
        raise AttentionInputError(
            f"Expected a causal layer with sliding_window={sliding_window} and a 2-D padding mask, but the layer is "
            "not causal; sdpa_flash will not guess where its window lies. Pass the 4-D mask transformers builds, or "
            "use attn_implementation='eager'.")
    if _compiling():
        dense = kpm[:, None, None, :]
        if causal:
            dense = dense & causal_mask_tensor("bottom_right", sq, sk, query.device)[None, None]
        return _Decision("dense", "2-D padding mask, dense because torch.compile is tracing", mask=dense,
                         causal=None, window=window)
    why = f", sliding_window={sliding_window} passed to the kernel" if windowed else ""
    return _Decision("varlen", f"2-D key padding mask{why}", ck, kpm=kpm.contiguous(), window=window)


def variants(kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' ``softcap`` (Gemma 2) and ``s_aux`` (gpt-oss's sinks) as :func:`sdpa_flash.attention`'s
    ``softcap=`` and ``sinks=`` (only those given)."""
    out = {}
    if kwargs.get("softcap") is not None:
        out["softcap"] = kwargs["softcap"]
    if kwargs.get("s_aux") is not None:
        out["sinks"] = kwargs["s_aux"]
    return out


def packed_window(kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' ``sliding_window=W`` on the packed (``cu_seq_lens``) route as flash-attention's varlen call
    takes it: ``window=(W - 1, W - 1)``, per sequence (causal masking caps the right side of a causal layer)."""
    w = kwargs.get("sliding_window")
    return {} if w is None else {"window": (int(w) - 1, int(w) - 1)}


def _prepare(module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any, is_causal: bool | None,
             kwargs: dict[str, Any]) -> _Decision:
    if kwargs.get("output_attentions") and "output_attentions" not in _warned:
        _warned.add("output_attentions")
        warnings.warn("sdpa_flash does not return attention weights (output_attentions=True); use "
                      "attn_implementation='eager' for them.", UserWarning, stacklevel=4)
    if kwargs.get("cu_seq_lens_q") is not None:
        return _Decision("packed", "flash-attention-style cu_seq_lens_q/k (packed sequences)",
                         "bottom_right" if _module_causal(module, is_causal) else None)
    d = _decide(module, query, key, attention_mask, is_causal, kwargs.get("sliding_window"))
    bias = kwargs.get("position_bias")
    if bias is not None:
        d = _with_bias(d, bias, query, key)
    return d


def _with_bias(d: _Decision, bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> _Decision:
    """A position bias (T5-style) is added to the scores: one additive float mask, as transformers' sdpa does."""
    sq, sk = query.shape[2], key.shape[2]
    bias = bias.to(query.dtype)
    allowed = d.mask
    if d.path == "varlen":
        allowed = d.kpm[:, None, None, :]  # type: ignore[index]  # the varlen path always has a kpm
    if d.causal is not None:
        causal = causal_mask_tensor(d.causal, sq, sk, query.device)[None, None]
        allowed = causal if allowed is None else allowed & causal
    if allowed is None:
        mask = bias
    elif allowed.dtype == torch.bool:
        mask = torch.where(allowed, bias, torch.finfo(query.dtype).min)
    else:
        mask = allowed + bias
    return _Decision("dense", f"{d.reason}; plus a position bias (one additive float mask)", mask=mask)
