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
``packed``     flash-attention-style ``cu_seq_lens_q/k`` keyword arguments: ``varlen_attention_packed`` (softcap,
               ``s_aux`` sinks and ``sliding_window`` included, the window per sequence)
=============  =========================================================================================

Padded query rows differ from ``"sdpa"`` on the varlen path (they are zeros here, and a weighted average of
nothing in particular there); transformers never lets them influence a real token, and losses ignore them.

Sliding windows are never ignored: a layer called with ``sliding_window=W`` and more than ``W`` keys never takes
the varlen path; it uses the windowed mask transformers built, or, when the call has no mask, a causal window
mask built here (non-causal windows without a mask raise :class:`sdpa_flash.AttentionInputError`). On the
``packed`` path ``sliding_window=W`` is ``window=(W - 1, W - 1)`` for every sequence, as transformers' own
flash-attention path passes it (a causal layer's right side is capped by causal masking).
"""

from __future__ import annotations

from ._forward import attention_forward, explain, make_attention_forward
from ._masks import mask_function
from ._registration import MIN_TRANSFORMERS, check, register, registered, restore_sdpa, unregister
from ._routes import Route, RouteStat, record, reset_route_counts, route_counts, route_stats

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
