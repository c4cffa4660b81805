"""Hugging Face transformers: ``attn_implementation="sdpa_flash"`` runs every attention layer through sdpa_flash.

    >>> from sdpa_flash.integrations.transformers import register
    >>> register()                                                     # doctest: +SKIP
    'sdpa_flash'
    >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_flash")  # doctest: +SKIP

:func:`register` adds three things to transformers (and imports it; importing this module does not):

1. an attention function in ``AttentionInterface``: every layer's ``(B, Hq, Sq, D)`` query and ``(B, Hkv, Sk, D)``
   key/value (GQA read in place, never repeated) go to :func:`sdpa_flash.attention` under the policy you chose;
2. a mask function in ``AttentionMaskInterface``: transformers builds, for every forward, exactly the boolean mask
   it builds for ``"sdpa"`` — and when that mask is plain causal or bidirectional attention plus key padding, the
   mask function also remembers the ``(B, Sk)`` key padding it came from. The attention function then computes the
   layer on the varlen path (``attention(..., key_padding_mask=...)``: packed, no padded FLOPs) instead of as a
   dense masked kernel. Without a mask function transformers passes *no mask at all* for an unknown name
   (``_preprocess_mask_arguments`` returns ``None`` for implementations missing from the mask interface), which
   silently ignores padding;
3. for a name containing ``"flash"`` (``"sdpa_flash"`` does), a loader for transformers' flash-attention imports:
   transformers treats any such name as a flash-attention kernel (``utils.generic.is_flash_attention_requested``
   is ``"flash" in name``). At model construction it then calls ``lazy_import_flash_attention(name)``, which
   looks for a Hub kernel called ``name`` and fails ("Could not find the currently requested flash attention
   implementation"). The loader answers that import for the names registered here with
   :mod:`sdpa_flash.compat`'s flash-attn-2-compatible functions, so the model builds, and the few model classes
   that switch to flash-attention-specific code for such names (vision towers that pass ``cu_seq_lens_q`` and no
   mask; GPT-Neo/Falcon/Bark's FA2 classes) also run on sdpa_flash. Other names are passed through untouched.

Which path each call takes (``route_counts()``, ``record()``, :func:`explain`):

=============  =========================================================================================
``no_mask``    transformers skipped the mask (no padding): ``attention(causal=...)`` exactly as ``"sdpa"``
               decides ``is_causal`` (top-left, queries > 1, the module's or the caller's ``is_causal``)
``varlen``     causal (bottom-right aligned: the queries are the last ``Sq`` positions) or bidirectional
               attention with key padding, recognised from our own mask function's arguments, or from the
               content of a 2-D or 4-D mask (boolean or additive float with only 0 / "minus infinity"
               entries): ``attention(..., key_padding_mask=...)``
``dense``      anything else (sliding windows, packed-sequence or chunked masks, static caches, biases, masks
               that differ per head, ``torch.compile``): ``attention(..., attn_mask=mask)``, exact
``packed``     flash-attention-style ``cu_seq_lens_q/k`` keyword arguments: ``varlen_attention_packed``
=============  =========================================================================================

Padded query rows differ from ``"sdpa"`` on the varlen path (they are zeros here, and a weighted average of
nothing in particular there); transformers never lets them influence a real token, and losses ignore them.

Sliding windows are never ignored: a layer called with ``sliding_window=W`` and more than ``W`` keys never takes
the varlen path; it uses the windowed mask transformers built, or, when the call has no mask, a causal window
mask built here (non-causal windows without a mask raise :class:`sdpa_flash.AttentionInputError`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..attention import attention
from ..attention import explain as _explain
from ..errors import AttentionInputError
from ..policy import PolicyLike
from ..spec import causal_mask_tensor

__all__ = [
    "MIN_TRANSFORMERS",
    "Route",
    "RouteStat",
    "attention_forward",
    "check",
    "explain",
    "make_attention_forward",
    "mask_function",
    "record",
    "register",
    "registered",
    "reset_route_counts",
    "restore_sdpa",
    "route_counts",
    "route_stats",
    "unregister",
]

MIN_TRANSFORMERS = "4.53"
"""The oldest transformers with ``AttentionInterface`` and ``AttentionMaskInterface`` (tested: 4.57, 5.17-5.25)."""

_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)
_registered: dict[str, Any] = {}  # name -> policy
_forwards: dict[str, Any] = {}  # name -> the attention function registered under it (kept: re-registering is a no-op)
_sdpa_originals: dict[str, tuple[Any, Any]] = {}  # "sdpa" -> transformers' own (attention, mask) functions
_lock = threading.Lock()
_counts: dict[tuple[str, str], int] = {}
_recording: contextvars.ContextVar[list[Route] | None] = contextvars.ContextVar("sdpa_flash_hf_record", default=None)
_warned: set[str] = set()


# ------------------------------------------------------------------------------------------------ routes
@dataclasses.dataclass(frozen=True)
class Route:
    """How one attention call of a transformers model was computed.

    Attributes:
        path: ``"no_mask"``, ``"varlen"``, ``"dense"`` or ``"packed"`` (see the module docstring).
        reason: why, in one line.
        causal: the causal kind passed to :func:`sdpa_flash.attention` (``None``, ``"top_left"``,
            ``"bottom_right"``).
        layer: the module's ``layer_idx`` when it has one.
        query_shape: ``(B, Hq, Sq, D)``.
        key_shape: ``(B, Hkv, Sk, D)``.
        plan: the plan :func:`sdpa_flash.explain` gives for the call (only from :func:`explain`, else ``None``).
    """

    path: str
    reason: str
    causal: str | None
    layer: int | None
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    plan: Any = None

    def __str__(self) -> str:
        where = f"layer {self.layer}: " if self.layer is not None else ""
        return f"{where}{self.path} (causal={self.causal}) q{self.query_shape} k{self.key_shape}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class RouteStat:
    """How many calls took ``path`` for ``reason``."""

    path: str
    reason: str
    count: int


def route_counts() -> dict[str, int]:
    """Calls per path (``"varlen"``, ``"dense"``, ...) since the start or :func:`reset_route_counts`.

    Only calls that reached sdpa_flash are counted: ``{}`` after a forward pass means the model's attention did not
    run here. :func:`check` says why (most often: another model was built from the same config object, which
    switched this one's ``attn_implementation``).
    """
    out: dict[str, int] = {}
    with _lock:
        for (path, _), n in _counts.items():
            out[path] = out.get(path, 0) + n
    return out


def route_stats() -> list[RouteStat]:
    """Calls per path and reason, most frequent first."""
    with _lock:
        items = list(_counts.items())
    return [RouteStat(p, r, n) for (p, r), n in sorted(items, key=lambda kv: -kv[1])]


def reset_route_counts() -> None:
    """Start counting afresh."""
    with _lock:
        _counts.clear()


@contextlib.contextmanager
def record() -> Iterator[list[Route]]:
    """Collect the :class:`Route` of every attention call made in this block (this thread / task only).

    Example:
        >>> with record() as routes:                      # doctest: +SKIP
        ...     model(input_ids, attention_mask=mask)
        >>> {r.path for r in routes}                      # doctest: +SKIP
        {'varlen'}
    """
    routes: list[Route] = []
    token = _recording.set(routes)
    try:
        yield routes
    finally:
        _recording.reset(token)


# --------------------------------------------------------------------------------- masks: what we built
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


def _classify(mask: torch.Tensor, b: int, sq: int, sk: int) -> tuple[str | None, torch.Tensor | None, str | None]:
    """Recognise a 4-D mask made by someone else: causal / bidirectional + key padding, or why not (cached)."""
    got = _lookup(_seen, mask)
    if got is not None:
        return got
    info = _classify_now(mask, b, sq, sk)
    _remember(_seen, mask, info)
    return info


def _classify_now(mask: torch.Tensor, b: int, sq: int, sk: int
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
    if allowed.shape[1] == 1:  # (B, 1, 1, Sk): key padding broadcast over the queries
        kpm = allowed[:, 0, :]
        if not bool((kpm.sum(-1) > 0).all()):
            return None, None, "a sequence with no key at all"
        return "bidirectional", (None if bool(kpm.all()) else kpm.contiguous()), None
    rows = torch.arange(sq, device=mask.device)[:, None] + (sk - sq)
    causal = torch.arange(sk, device=mask.device)[None, :] <= rows  # bottom-right aligned
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


# ----------------------------------------------------------------------------------------- the decision
@dataclasses.dataclass(frozen=True)
class _Decision:
    path: str
    reason: str
    causal: str | None = None
    kpm: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def _module_causal(module: Any, is_causal: bool | None) -> bool:
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def _window_mask(sq: int, sk: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal sliding window, bottom-right aligned: query i (position i + sk - sq) sees keys j in (pos - W, pos]."""
    pos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    return ((j <= pos) & (j > pos - window))[None, None]


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
            # windowed: sliding_window is not None
            return _Decision("dense", f"sliding_window={sliding_window} < {sk} keys and no mask: causal window mask "
                             "built here", mask=_window_mask(sq, sk, int(sliding_window), query.device))  # type: ignore[arg-type]
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
    if windowed or _compiling():
        dense = kpm[:, None, None, :]
        if causal:  # (windowed: sliding_window is not None)
            dense = dense & (_window_mask(sq, sk, int(sliding_window), query.device) if windowed  # type: ignore[arg-type]
                             else causal_mask_tensor("bottom_right", sq, sk, query.device)[None, None])
        why = f"sliding_window={sliding_window}" if windowed else "torch.compile is tracing"
        return _Decision("dense", f"2-D padding mask, dense because {why}", mask=dense)
    return _Decision("varlen", "2-D key padding mask", ck, kpm=kpm.contiguous())


# -------------------------------------------------------------------------------------- attention forward
def make_attention_forward(policy: PolicyLike | None = None) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function for transformers' ``AttentionInterface`` that runs under ``policy``.

    Args:
        policy: the sdpa_flash policy for every call (``None``: the policy in force at each call).

    Returns:
        ``forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs)
        -> (output, None)`` with query ``(B, Hq, Sq, D)``, key/value ``(B, Hkv, Sk, D)`` and output
        ``(B, Sq, Hq, D)``, as transformers' attention functions take and return them.
    """

    def forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        return _forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, policy, kwargs)

    forward.__doc__ = attention_forward.__doc__
    return forward


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by :func:`sdpa_flash.attention`.

    Args:
        module: the attention layer (its ``is_causal`` and ``layer_idx`` are read).
        query: ``(B, Hq, Sq, D)``.
        key, value: ``(B, Hkv, Sk, D)`` / ``(B, Hkv, Sk, Dv)``, ``Hq % Hkv == 0`` (GQA, read in place).
        attention_mask: ``None``, a ``(B, Sk)`` padding mask (1 = real token) or a 4-D mask broadcastable to
            ``(B, Hq, Sq, Sk)``, boolean (True = attend) or additive float.
        dropout: attention dropout (transformers passes 0 outside training).
        scaling: the softmax scale (``None``: ``1 / sqrt(D)``).
        is_causal: overrides ``module.is_causal`` for a call without a mask.
        **kwargs: ``sliding_window`` (never ignored), ``position_bias`` (added to the scores), flash-attention's
            ``cu_seq_lens_q/k`` and ``max_length_q/k`` (packed sequences, ``B = 1``); ``softcap`` and ``s_aux``
            raise :class:`sdpa_flash.AttentionInputError`; others are ignored, as transformers' ``"sdpa"`` does.

    Returns:
        ``(output, None)``: ``(B, Sq, Hq, Dv)``, contiguous, and no attention weights.
    """
    return _forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, None, kwargs)


def _forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
             dropout: float, scaling: float | None, is_causal: bool | None, policy: Any, kwargs: dict[str, Any]
             ) -> tuple[torch.Tensor, None]:
    d = _prepare(module, query, key, attention_mask, is_causal, kwargs)
    if d.path == "packed":
        out = _packed(module, query, key, value, dropout, scaling, is_causal, policy, kwargs)
    elif d.path == "varlen":
        out = attention(query, key, value, key_padding_mask=d.kpm, causal=d.causal or False, dropout_p=dropout,
                        scale=scaling, policy=policy)
    else:
        out = attention(query, key, value, attn_mask=d.mask, causal=d.causal or False, dropout_p=dropout,
                        scale=scaling, policy=policy)
    if not _compiling():
        _count(module, query, key, d)
    return out.transpose(1, 2).contiguous(), None


def _prepare(module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any, is_causal: bool | None,
             kwargs: dict[str, Any]) -> _Decision:
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise AttentionInputError(f"Expected {name}=None, but got {name}={kwargs[name]!r}: sdpa_flash's "
                                      "transformers integration does not compute it. Use attn_implementation='eager' "
                                      "(or a flash-attention kernel that supports it) for this model.")
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


def _packed(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
            scaling: float | None, is_causal: bool | None, policy: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    from ..varlen import varlen_attention_packed

    if query.shape[0] != 1:
        raise AttentionInputError(f"Expected batch size 1 with cu_seq_lens_q (packed sequences), but got query of "
                                  f"shape {tuple(query.shape)} instead.")
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
    lens_q = tuple(int(x) for x in (cu_q[1:] - cu_q[:-1]).tolist())
    lens_k = lens_q if cu_k is cu_q else tuple(int(x) for x in (cu_k[1:] - cu_k[:-1]).tolist())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    causal = "bottom_right" if _module_causal(module, is_causal) else False
    out = varlen_attention_packed(q, k, v, cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0),
                                  causal=causal, scale=scaling, dropout_p=dropout, policy=policy,
                                  seqlens_q=lens_q, seqlens_k=lens_k)
    return out.transpose(0, 1)[None]  # (1, H, T, Dv): transposed back by the caller


def _count(module: Any, query: torch.Tensor, key: torch.Tensor, d: _Decision) -> None:
    k = (d.path, d.reason)
    with _lock:
        _counts[k] = _counts.get(k, 0) + 1
    routes = _recording.get()
    if routes is not None:
        routes.append(Route(d.path, d.reason, d.causal, getattr(module, "layer_idx", None), tuple(query.shape),
                            tuple(key.shape)))


def explain(
    module: torch.nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    policy: PolicyLike | None = None,
    **kwargs: Any,
) -> Route:
    """The :class:`Route` a call of the attention function would take, with the plan, without running it.

    ``route.plan`` is :func:`sdpa_flash.explain`'s answer for the call it would make: a
    :class:`sdpa_flash.varlen` plan (``VarlenPlan``) on the varlen path, a :class:`sdpa_flash.Plan` otherwise.
    """
    d = _prepare(module, query, key, attention_mask, is_causal, kwargs)
    if d.path == "packed":
        plan = None
    elif d.path == "varlen":
        plan = _explain(query, key, value, key_padding_mask=d.kpm, causal=d.causal or False, dropout_p=dropout,
                        scale=scaling, policy=policy)
    else:
        plan = _explain(query, key, value, attn_mask=d.mask, causal=d.causal or False, dropout_p=dropout,
                        scale=scaling, policy=policy)
    return Route(d.path, d.reason, d.causal, getattr(module, "layer_idx", None), tuple(query.shape),
                 tuple(key.shape), plan)


# ---------------------------------------------------------------------------------------- registration
_MASKING_UTILS: Any = None


def _masking_utils() -> Any:
    """``transformers.masking_utils``, imported once outside any traced frame: under ``torch.compile`` an import
    through transformers' lazy top-level module is a graph break (seen with transformers 5.17, torch 2.11)."""
    global _MASKING_UTILS
    if _MASKING_UTILS is None:
        import transformers.masking_utils as mu

        _MASKING_UTILS = mu
    return _MASKING_UTILS


def register(name: str = "sdpa_flash", *, policy: PolicyLike | None = None, replace_sdpa: bool = False) -> str:
    """Register sdpa_flash with transformers under ``name`` (idempotent); imports transformers.

    Afterwards ``AutoModel*.from_pretrained(..., attn_implementation=name)`` (or ``from_config``, or
    ``model.set_attn_implementation(name)``) runs every attention layer through :func:`sdpa_flash.attention`.
    Without it transformers raises its own ``ValueError: Specified `attn_implementation="sdpa_flash"` is not
    supported. The only possible arguments are ...`` (it validates the name itself; nothing of sdpa_flash runs
    there). Calling it again with the same arguments does nothing (sub-microsecond; the function transformers holds
    stays the same object).

    Args:
        name: the ``attn_implementation`` to register. A name containing ``"flash"`` (the default does) is
            treated by transformers as a flash-attention kernel; see the module docstring for what that changes
            and how it is handled.
        policy: the sdpa_flash policy for this name's calls (``None``: the policy in force at each call). Register
            the same function under several names to use several policies.
        replace_sdpa: also answer transformers' own ``"sdpa"`` with sdpa_flash (its attention and mask functions;
            :func:`restore_sdpa` undoes it). For tools that only know ``"sdpa"``, e.g. LLaMA-Factory's
            ``--flash_attn sdpa``. Masks stay exactly transformers' ``sdpa`` masks.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is not installed, or older than :data:`MIN_TRANSFORMERS`, or has no
            ``AttentionMaskInterface`` (before 4.53).
        AttentionInputError: ``name`` is empty or one of transformers' own implementations.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") or \
            name.startswith(("flash_attention_", "paged|")):
        raise AttentionInputError(f"Expected a new attn_implementation name, but got {name!r}, which is empty or "
                                  "one of transformers' own implementations.")
    if _registered.get(name, _NOTHING) == policy and not replace_sdpa and _still_registered(name):
        return name  # already in place: nothing to do (and the function object transformers holds stays the same)
    try:
        import transformers
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(f"sdpa_flash.integrations.transformers needs transformers>={MIN_TRANSFORMERS}: "
                          "pip install 'sdpa_flash[hf]'") from exc
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError(f"sdpa_flash needs transformers' AttentionMaskInterface (4.53+), but transformers "
                          f"{transformers.__version__} has none: pip install -U transformers") from exc
    _masking_utils()
    forward = make_attention_forward(policy)
    _forwards[name] = forward
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, mask_function)
    if _flash_named(name):
        _install_flash_loader(name)
    _registered[name] = policy
    if replace_sdpa:
        _sdpa_originals.setdefault("sdpa", (AttentionInterface._global_mapping["sdpa"],
                                            AttentionMaskInterface._global_mapping["sdpa"]))
        AttentionInterface.register("sdpa", forward)
        AttentionMaskInterface.register("sdpa", mask_function)
    return name


_NOTHING = object()


def _still_registered(name: str) -> bool:
    """Whether transformers' interfaces still map ``name`` to what :func:`register` put there (imports nothing)."""
    mu = _MASKING_UTILS
    attn = getattr(sys.modules.get("transformers.modeling_utils"), "AttentionInterface", None)
    if mu is None or attn is None:
        return False
    return (attn._global_mapping.get(name) is _forwards.get(name)
            and mu.AttentionMaskInterface._global_mapping.get(name) is mask_function)


def check(model: Any) -> str:
    """The sdpa_flash name ``model``'s attention runs under; raises with the reason when it does not.

    transformers keeps a model's ``attn_implementation`` on its config object and reads it at every call. Models
    built from one config object (``from_config(config)``, ``Model(config)``) share it, so building a second model
    from the same config object with another ``attn_implementation=``, or ``set_attn_implementation`` on either
    one, switches both, silently: sdpa_flash is then simply not called (and :func:`route_counts` stays ``{}``).
    Build each model from its own copy (``copy.deepcopy(config)``), and call ``check(model)`` where it matters.

    Args:
        model: a transformers model (its ``config`` and every submodule's ``config`` are read).

    Returns:
        The registered name (``"sdpa_flash"``; ``"sdpa"`` after ``register(replace_sdpa=True)``).

    Raises:
        AttentionInputError: a config of the model names an implementation sdpa_flash did not register here, or
            nothing was registered (call :func:`register` first).
    """
    configs = {id(c): c for c in (getattr(model, "config", None),
                                  *(getattr(m, "config", None) for m in getattr(model, "modules", list)()))
               if c is not None and hasattr(c, "_attn_implementation")}
    ours = set(_registered) | ({"sdpa"} if "sdpa" in _sdpa_originals else set())
    found = list(dict.fromkeys(getattr(c, "_attn_implementation", None) for c in configs.values()))
    other = [impl for impl in found if impl not in ours]
    where = type(model).__name__
    if not _registered:
        raise AttentionInputError(
            f"Expected sdpa_flash to be registered with transformers, but nothing was registered in this process "
            f"instead ({where} runs {', '.join(map(repr, found)) or 'no attention'}): call "
            "sdpa_flash.integrations.transformers.register() before building the model.")
    if other or not found:
        raise AttentionInputError(
            f"Expected {where}'s attention to run through sdpa_flash ({', '.join(map(repr, sorted(ours)))}), but its "
            f"config says attn_implementation={other[0] if other else None!r} instead. transformers keeps the "
            "implementation on the config object, which every model built from it shares and reads at each call: "
            "building another model from the same config object with another attn_implementation (or "
            "set_attn_implementation on any of them) switches them all. Build each model from its own copy "
            f"(copy.deepcopy(config)); model.set_attn_implementation({sorted(_registered)[0]!r}) switches this one "
            "back.")
    return str(found[0])


def restore_sdpa() -> bool:
    """Give ``"sdpa"`` back to transformers' own functions after ``register(replace_sdpa=True)``; True if it did."""
    if "sdpa" not in _sdpa_originals:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    attn, mask = _sdpa_originals.pop("sdpa")
    AttentionInterface.register("sdpa", attn)
    AttentionMaskInterface.register("sdpa", mask)
    return True


def unregister(name: str = "sdpa_flash") -> None:
    """Remove ``name`` from transformers' attention and mask interfaces (models built with it stop working)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    loader = _flash_loader()
    if loader is not None:
        loader._sdpa_flash_names.discard(name)
    _registered.pop(name, None)
    _forwards.pop(name, None)


def registered() -> dict[str, Any]:
    """The names registered by this process, with their policies."""
    return dict(_registered)


def _flash_named(name: str) -> bool:
    """Whether transformers takes ``name`` for a flash-attention kernel (asked of transformers where it can say)."""
    try:
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:  # transformers 4.x recognises flash attention by the prefix "flash_attention" only
        return False
    return bool(is_flash_attention_requested(requested_attention_implementation=name))


def _flash_loader() -> Any:
    try:
        import transformers.modeling_flash_attention_utils as fau
    except ImportError:
        return None
    fn = getattr(fau, "_lazy_imports", None)
    return fn if getattr(fn, "_sdpa_flash_names", None) is not None else None


def _install_flash_loader(name: str) -> None:
    """Answer transformers' ``lazy_import_flash_attention(name)`` with sdpa_flash.compat (once per process).

    transformers calls it when a model is built with a "flash" name and would otherwise look for a Hub kernel
    called ``name``. Every other name still goes to transformers' own loader.
    """
    import transformers.modeling_flash_attention_utils as fau

    loader = _flash_loader()
    if loader is None:
        original = getattr(fau, "_lazy_imports", None)
        if original is None:
            warnings.warn(f"sdpa_flash: this transformers has no modeling_flash_attention_utils._lazy_imports; a model "
                          f"built with attn_implementation={name!r} may look for a flash-attention kernel of that "
                          "name. Register a name without 'flash' if it does.", UserWarning, stacklevel=3)
            return
        names: set[str] = set()

        def _lazy_imports(implementation: Any, *args: Any, **kwargs: Any) -> Any:
            if implementation in names:
                return _flash_functions(fau)
            return original(implementation, *args, **kwargs)

        _lazy_imports._sdpa_flash_names = names  # type: ignore[attr-defined]  # a function attribute
        _lazy_imports._sdpa_flash_original = original  # type: ignore[attr-defined]  # a function attribute
        fau._lazy_imports = _lazy_imports
        loader = _lazy_imports
    loader._sdpa_flash_names.add(name)


def _flash_functions(fau: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input, unpad_input)."""
    pad, unpad = getattr(fau, "_pad_input", None), getattr(fau, "_unpad_input", None)
    try:
        from ..compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError as exc:
        why = str(exc)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise ImportError(f"This model calls flash-attention functions directly for a 'flash' "
                              f"attn_implementation, and sdpa_flash.compat is not importable ({why}).")

        return missing, missing, None, pad, unpad
    return flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad, unpad
