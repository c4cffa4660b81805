"""The attention function transformers calls: decide, count, run :func:`sdpa_flash.attention`; and
:func:`explain`, the same decision without running it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...attention import attention
from ...attention import explain as _explain
from ...errors import AttentionInputError
from ...policy import PolicyLike
from ._decision import _module_causal, _prepare, packed_window, variants
from ._masks import _compiling
from ._routes import Route, _count

__all__ = ["attention_forward", "explain", "make_attention_forward"]


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
        **kwargs: ``sliding_window`` (never ignored), ``position_bias`` (added to the scores), ``softcap`` (Gemma 2)
            and ``s_aux`` (gpt-oss's sinks) as :func:`sdpa_flash.attention`'s ``softcap=`` and ``sinks=``,
            flash-attention's ``cu_seq_lens_q/k`` and ``max_length_q/k`` (packed sequences, ``B = 1``: with
            softcap, sinks and ``sliding_window``, which is then ``window=(W - 1, W - 1)`` per sequence, as
            transformers' flash-attention path passes it); others are ignored, as transformers' ``"sdpa"`` does.

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
                        scale=scaling, policy=policy, window=d.window, **variants(kwargs))
    else:
        out = attention(query, key, value, attn_mask=d.mask, causal=d.causal or False, dropout_p=dropout,
                        scale=scaling, policy=policy, window=d.window, **variants(kwargs))
    if not _compiling():
        _count(module, query, key, d)
    return out.transpose(1, 2).contiguous(), None


def _packed_args(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool | None,
                 kwargs: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """The packed ``(T, H, D)`` query, key and value and the engine's keywords for a ``cu_seq_lens`` call (causal
    bottom-right per sequence, as flash-attention's varlen call aligns it; the variants passed through)."""
    if query.shape[0] != 1:
        raise AttentionInputError(f"Expected batch size 1 with cu_seq_lens_q (packed sequences), but got query of "
                                  f"shape {tuple(query.shape)} instead.")
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
    lens_q = tuple(int(x) for x in (cu_q[1:] - cu_q[:-1]).tolist())
    lens_k = lens_q if cu_k is cu_q else tuple(int(x) for x in (cu_k[1:] - cu_k[:-1]).tolist())
    packed = tuple(t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    causal = "bottom_right" if _module_causal(module, is_causal) else False
    return packed, {"cu_q": cu_q, "cu_k": cu_k, "lens_q": lens_q, "lens_k": lens_k, "causal": causal,
                    **variants(kwargs), **packed_window(kwargs)}


def _packed(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
            scaling: float | None, is_causal: bool | None, policy: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    from ...varlen import varlen_attention_packed

    (q, k, v), a = _packed_args(module, query, key, value, is_causal, kwargs)
    lens_q, lens_k = a.pop("lens_q"), a.pop("lens_k")
    out = varlen_attention_packed(q, k, v, a.pop("cu_q"), a.pop("cu_k"), max(lens_q, default=0),
                                  max(lens_k, default=0), scale=scaling, dropout_p=dropout, policy=policy,
                                  seqlens_q=lens_q, seqlens_k=lens_k, **a)
    return out.transpose(0, 1)[None]  # (1, H, T, Dv): transposed back by the caller


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
    :class:`sdpa_flash.varlen` plan (``VarlenPlan``) on the varlen and packed paths, a :class:`sdpa_flash.Plan`
    otherwise.
    """
    d = _prepare(module, query, key, attention_mask, is_causal, kwargs)
    if d.path == "packed":
        from ... import _varlen

        (q, k, v), a = _packed_args(module, query, key, value, is_causal, kwargs)
        del a["cu_q"], a["cu_k"]
        plan = _varlen.explain(q, k, v, a.pop("lens_q"), a.pop("lens_k"), dropout_p=dropout, policy=policy, **a)
    elif d.path == "varlen":
        plan = _explain(query, key, value, key_padding_mask=d.kpm, causal=d.causal or False, dropout_p=dropout,
                        scale=scaling, policy=policy, **variants(kwargs))
    else:
        plan = _explain(query, key, value, attn_mask=d.mask, causal=d.causal or False, dropout_p=dropout,
                        scale=scaling, policy=policy, **variants(kwargs))
    return Route(d.path, d.reason, d.causal, getattr(module, "layer_idx", None), tuple(query.shape),
                 tuple(key.shape), plan)
