"""Masks: the mask function registered with transformers, and the recognition of 4-D masks made by others
(causal or bidirectional attention plus key padding, or why not), cached per mask tensor.

``transformers.masking_utils`` is imported here, once, on first use; ``_compiling`` says whether
torch.compile is tracing (no host reads then)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["mask_function"]

_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)
_MASKING_UTILS: Any = None


def _masking_utils() -> Any:
    """``transformers.masking_utils``, imported once outside any traced frame: under ``torch.compile`` an import
    through transformers' lazy top-level module is a graph break (seen with transformers 5.17, torch 2.11)."""
    global _MASKING_UTILS
    if _MASKING_UTILS is None:
        import transformers.masking_utils as mu

        _MASKING_UTILS = mu
    return _MASKING_UTILS


# id(mask) -> (weakref to it, its _version, (kind, key padding or None, reason it was not recognised or None))
_built: dict[int, tuple[Any, int, tuple[str | None, torch.Tensor | None, str | None]]] = {}
_seen: dict[int, tuple[Any, int, tuple[str | None, torch.Tensor | None, str | None]]] = {}


def _remember(store: dict[int, Any], mask: torch.Tensor, info: tuple[str | None, torch.Tensor | None, str | None]
              ) -> None:
    if len(store) >= 256:
        for key in [k for k, (ref, _, _) in store.items() if ref() is None]:
            del store[key]
        if len(store) >= 256:
            store.clear()
    store[id(mask)] = (weakref.ref(mask), mask._version, info)


def _lookup(store: dict[int, Any], mask: torch.Tensor) -> tuple[str | None, torch.Tensor | None, str | None] | None:
    got = store.get(id(mask))
    if got is not None and got[0]() is mask and got[1] == mask._version:
        return got[2]
    return None


def mask_function(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask function registered in transformers' ``AttentionMaskInterface``.

    Returns exactly what transformers' ``sdpa_mask`` returns for the same arguments — a ``(B, 1, Sq, Sk)``
    boolean mask (True = attend), or ``None`` where no mask is needed — so models that inspect or combine masks
    see what they see with ``"sdpa"``. When the pattern is plain causal (queries at the last ``Sq`` positions)
    or bidirectional attention plus a 2-D key padding mask, it also remembers the ``(B, Sk)`` key padding, which
    sends the layers that receive this very tensor to the varlen path. (transformers 4.x passes
    ``cache_position`` instead of ``q_length`` / ``q_offset``; both are accepted.)
    """
    mu = _masking_utils()
    mf = mask_function if mask_function is not None else mu.causal_mask_function
    cache_position = kwargs.get("cache_position")
    if q_length is None:  # transformers 4.x
        mask = mu.sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mf,
                            attention_mask=attention_mask, **kwargs)
        if mask is None or _compiling():
            return mask
        assert cache_position is not None  # transformers 4.x's sdpa_mask took it (it needs it)
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length else 0  # one host read, once per forward
    else:
        mask = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mf, attention_mask=attention_mask, **kwargs)
        if mask is None or _compiling():
            return mask
    assert kv_length is not None  # transformers passes it (its sdpa_mask requires it); None is a placeholder
    kind = "causal" if mf is mu.causal_mask_function else \
        "bidirectional" if mf is getattr(mu, "bidirectional_mask_function", None) else None
    why = None
    if kind is None:
        why = "transformers' mask is not plain causal or bidirectional (sliding window, packed sequences, chunks, " \
              "or a custom pattern)"
    elif kwargs.get("local_size") is not None and kv_length >= kwargs["local_size"]:
        why = f"local attention of size {kwargs['local_size']}"
    elif not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        why = "a static cache (tensor offsets)"
    elif kind == "causal" and q_offset + q_length != kv_offset + kv_length:
        why = (f"the queries (positions {q_offset}..{q_offset + q_length - 1}) do not end at the last key "
               f"({kv_offset + kv_length - 1}): a static cache")
    kpm = None
    if why is None and attention_mask is not None:
        padded = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        kpm = padded[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        if kpm.shape != (batch_size, kv_length):
            kpm = kpm.expand(batch_size, kv_length)
        kpm = kpm.contiguous()
        if bool(kpm.all()):
            kpm = None  # e.g. a cache extended beyond the 2-D mask on no padding
    _remember(_built, mask, (kind, kpm, why))
    return mask


_seen_windowed: dict[tuple[int, int], tuple[Any, int, tuple[str | None, torch.Tensor | None, str | None]]] = {}


def _classify(mask: torch.Tensor, b: int, sq: int, sk: int, window: int | None = None
              ) -> tuple[str | None, torch.Tensor | None, str | None]:
    """Recognise a 4-D mask made by someone else: causal / bidirectional + key padding, or why not (cached).
    With ``window=W``: whether it is causal attention under transformers' sliding window of ``W`` keys (a query at
    position p sees keys in ``(p - W, p]``) plus key padding — then ``"causal"`` means exactly that."""
    if window is None:
        got = _lookup(_seen, mask)
        if got is None:
            got = _classify_now(mask, b, sq, sk)
            _remember(_seen, mask, got)
        return got
    hit = _seen_windowed.get((id(mask), window))
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    info = _classify_now(mask, b, sq, sk, window)
    if len(_seen_windowed) >= 256:
        _seen_windowed.clear()
    _seen_windowed[(id(mask), window)] = (weakref.ref(mask), mask._version, info)
    return info


def _classify_now(mask: torch.Tensor, b: int, sq: int, sk: int, window: int | None = None
                  ) -> tuple[str | None, torch.Tensor | None, str | None]:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2] not in (1, sq) or mask.shape[-1] != sk or \
            mask.shape[0] not in (1, b):
        return None, None, f"a mask of shape {tuple(mask.shape)} (per head, or not (B, 1, Sq or 1, Sk))"
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    elif mask.is_floating_point():
        m = mask[:, 0]
        very_negative = m <= torch.finfo(m.dtype).min / 2
        if not bool(((m == 0) | very_negative).all()):
            return None, None, "an additive float mask with values other than 0 and -inf (a bias)"
        allowed = m == 0
    else:
        return None, None, f"a mask of dtype {mask.dtype}"
    allowed = allowed.expand(b, *allowed.shape[1:])
    if allowed.shape[1] == 1 and window is not None:
        return None, None, "a mask without rows cannot hold a sliding window"
    if allowed.shape[1] == 1:  # (B, 1, 1, Sk): key padding broadcast over the queries
        kpm = allowed[:, 0, :]
        if not bool((kpm.sum(-1) > 0).all()):
            return None, None, "a sequence with no key at all"
        return "bidirectional", (None if bool(kpm.all()) else kpm.contiguous()), None
    rows = torch.arange(sq, device=mask.device)[:, None] + (sk - sq)
    cols = torch.arange(sk, device=mask.device)[None, :]
    causal = cols <= rows  # bottom-right aligned
    if window is not None:
        causal = causal & (cols > rows - window)
        # the last query's window is all it sees: the padding outside it is read from the first query of each key
        seen = (allowed & causal[None]).any(1)
        kpm = seen | ~causal.any(0)[None, :]
        real_rows = kpm[:, sk - sq:] if sq <= sk else torch.ones(b, sq, dtype=torch.bool, device=mask.device)
        ignore = ~real_rows[:, :, None]
        if not bool(((allowed == (causal & kpm[:, None, :])) | ignore).all()):
            return None, None, f"a 4-D mask that is not causal attention with a sliding window of {window} plus key " \
                               "padding"
        if not bool((kpm.sum(-1) > 0).all()):
            return None, None, "a sequence with no key at all"
        return "causal", (None if bool(kpm.all()) else kpm.contiguous()), None
    kpm = allowed[:, -1, :]  # the last query sees every key that is not padding, under either pattern
    real_rows = kpm[:, sk - sq:] if sq <= sk else torch.ones(b, sq, dtype=torch.bool, device=mask.device)
    ignore = ~real_rows[:, :, None]  # padded queries: their rows are free (transformers ignores their output)
    if bool(((allowed == (causal & kpm[:, None, :])) | ignore).all()):
        kind = "causal"
    elif bool(((allowed == kpm[:, None, :].expand(b, sq, sk)) | ignore).all()):
        kind = "bidirectional"
    else:
        return None, None, "a 4-D mask that is not causal or bidirectional attention plus key padding"
    if not bool((kpm.sum(-1) > 0).all()):
        return None, None, "a sequence with no key at all"
    return kind, (None if bool(kpm.all()) else kpm.contiguous()), None
