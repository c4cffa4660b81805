"""``attention()`` and ``explain()``: the public dense call, plus the ``key_padding_mask`` route.

Without a key padding mask both go straight to :mod:`sdpa_flash._dense` (validate -> spec -> plan -> run, with
the per-call cache). With one, the batch is packed and computed by the varlen engine
(:mod:`sdpa_flash._varlen`), which runs its dense groups through :mod:`sdpa_flash._dense` too: this
module sits above both, and neither of them imports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from ._dense import _compiling, dense_attention, dense_explain
from ._validate import attention_spec
from .errors import AttentionInputError
from .policy import PolicyLike

__all__ = ["attention", "explain"]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str = "bhsd",
    policy: PolicyLike | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    **unknown: Any,
) -> torch.Tensor:
    """Scaled dot-product attention on the fastest kernel the policy allows, with autograd.

    Computes ``softmax(query @ key.T * scale + mask) @ value`` per batch and head, like
    ``torch.nn.functional.scaled_dot_product_attention``, but the backend is chosen by a policy
    (see :func:`sdpa_flash.explain` for what runs and why) without touching torch's global flags.

    Shapes (``layout="bhsd"``; with ``layout="bshd"`` swap H and S, as flash-attn does, at no copy):
        query ``(B, Hq, Sq, D)``, key ``(B, Hkv, Sk, D)``, value ``(B, Hkv, Sk, Dv)`` -> ``(B, Hq, Sq, Dv)``.
        B batch, H heads (``Hq % Hkv == 0``: GQA/MQA, read in place where the kernel can), S sequence, D head dim.

    Args:
        query, key, value: floating-point tensors on one device, one dtype.
        attn_mask: optional mask broadcastable to ``(B, Hq, Sq, Sk)``: boolean (True = attend) or additive
            float of the query's dtype.
        causal: ``False``; ``True`` or ``"top_left"`` for PyTorch's convention (query i sees keys j <= i);
            ``"bottom_right"`` for flash-attn's (query i sees keys j <= i + Sk - Sq). They differ only when
            ``Sq != Sk``.
        dropout_p: attention dropout probability in [0, 1); pass 0 at evaluation time.
        scale: the softmax scale; ``None`` means ``1 / sqrt(D)``.
        layout: ``"bhsd"`` or ``"bshd"``; the output has the same layout.
        policy: overrides the policy in force for this call (see :func:`sdpa_flash.use_policy`).
        key_padding_mask: optional ``(B, Sk)`` boolean, True = a real token (SDPA's and Hugging Face's
            convention; ``nn.MultiheadAttention``'s is the opposite). The batch is packed and computed on the
            varlen path (:mod:`sdpa_flash.varlen`), never as a dense masked kernel. With ``Sq == Sk`` the same
            mask marks the padded queries, whose output rows are zeros (and pass no gradient); with
            ``Sq != Sk`` every query is real. Not combinable with ``attn_mask``.
        window: a sliding window ``(left, right)``: query i sees key j iff ``-left <= j - (i + Sk - Sq) <= right``
            (inclusive, aligned bottom-right as in flash-attn and FA4; Mistral's and transformers'
            ``sliding_window=W`` is ``(W - 1, 0)`` with ``causal=True``); ``None`` or ``-1`` on a side is unbounded.
            Only on kernels that do windows themselves (FA4, chunked), or as a mask on math: a fused kernel is
            never given an O(Sq * Sk) window mask. With ``Sq != Sk`` pass ``causal=False`` or ``"bottom_right"``.
        softcap: ``c > 0`` caps the scaled scores at ``c * tanh(score / c)`` before the softmax (Gemma 2's logit
            softcapping, flash-attn's ``softcap``); ``None`` or 0 is off.
        sinks: ``(Hq,)`` floating-point logits, one per query head, each joining its head's softmax as one more
            column with no value (gpt-oss's ``s_aux``, FA4's ``learnable_sink``): a row's weights sum to
            ``1 - sigmoid(sink - logsumexp(scores))``. Differentiable (autograd gives their gradient).

    Returns:
        The attention output.

    Raises:
        AttentionInputError: the inputs are invalid (the message names the argument and the fix), or a keyword
            is not one of the above (``is_causal=`` names ``causal=``; other spellings of PyTorch, flash-attn and
            xformers name theirs here).
        BackendUnavailableError: no backend the policy allows can run these inputs here.
        ShadowMismatchError: only with shadow checking on and ``shadow_action="raise"`` (see
            :class:`sdpa_flash.Policy`): the backend's output disagreed with the math reference.

    Example:
        >>> q = k = v = torch.randn(2, 8, 128, 64)
        >>> attention(q, k, v, causal=True).shape
        torch.Size([2, 8, 128, 64])
    """
    if unknown:
        raise _unknown_keywords("attention", unknown)
    if key_padding_mask is not None:
        return _padded(query, key, value, key_padding_mask, attn_mask, causal, dropout_p, scale, layout, policy,
                       variants=_variants(window, softcap, sinks))
    if window is None and softcap is None and sinks is None:
        return dense_attention(query, key, value, attn_mask, causal, dropout_p, scale, layout, policy)  # fast
    return dense_attention(query, key, value, attn_mask, causal, dropout_p, scale, layout, policy, window, softcap,
                           sinks)


def explain(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    layout: str = "bhsd",
    policy: PolicyLike | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    **unknown: Any,
) -> Any:
    """The :class:`Plan` that :func:`attention` would follow for these arguments, without running anything.

    ``str(plan)`` is short: the backend and route on its first line (``"cudnn via direct aten op"``), then
    each other backend's first reason, one a line (``"  flash: ranked below cudnn for sm90 by the policy"``);
    ``plan.explain()`` is the full account. Raises what :func:`attention` would raise. With ``key_padding_mask``
    it is the varlen engine's plan (:class:`sdpa_flash.varlen.VarlenPlan`, or a :class:`Plan` for the dense
    fallback it notes).
    """
    if unknown:
        raise _unknown_keywords("explain", unknown)
    if key_padding_mask is not None:
        return _padded(query, key, value, key_padding_mask, attn_mask, causal, dropout_p, scale, layout, policy,
                       explain_only=True, variants=_variants(window, softcap, sinks))
    return dense_explain(query, key, value, attn_mask=attn_mask, causal=causal, dropout_p=dropout_p, scale=scale,
                         layout=layout, policy=policy, window=window, softcap=softcap, sinks=sinks)


def _variants(window: Any, softcap: Any, sinks: Any) -> dict[str, Any]:
    """The variant keywords given (``window``, ``softcap``, ``sinks``), for the key padding route."""
    return {name: v for name, v in (("window", window), ("softcap", softcap), ("sinks", sinks)) if v is not None}

# ------------------------------------------------------------------------------------ unknown keywords
_KEYWORDS = ("attn_mask", "causal", "dropout_p", "scale", "layout", "policy", "key_padding_mask", "window", "softcap",
             "sinks")
# Other libraries' spellings of attention()'s keywords: name -> (ours, how to port the value).
_SPELLINGS = {
    "is_causal": ("causal", "True or 'top_left' is F.scaled_dot_product_attention's is_causal=True; "
                            "'bottom_right' is flash-attn's convention"),
    "enable_gqa": (None, "GQA/MQA needs no flag: pass key and value with fewer heads than the query (Hq % Hkv == 0) "
                         "and drop enable_gqa="),
    "softmax_scale": ("scale", "None means 1/sqrt(D)"),
    "dropout": ("dropout_p", "the dropout probability"),
    "p": ("dropout_p", "the dropout probability"),
    "attn_bias": ("attn_mask", "a boolean mask, True = attend, or an additive float bias"),
    "mask": ("attn_mask", "a boolean mask, True = attend, or an additive float bias"),
    "padding_mask": ("key_padding_mask", "(B, Sk) boolean, True = a real token"),
    "window_size": ("window", "(left, right), -1 or None unbounded, aligned bottom-right as in flash-attn"),
    "sliding_window": ("window", "transformers' sliding_window=W is window=(W - 1, 0) with causal=True"),
    "logit_softcap": ("softcap", "c * tanh(score / c)"),
    "softcapping": ("softcap", "c * tanh(score / c)"),
    "learnable_sink": ("sinks", "one logit per query head, shape (Hq,)"),
    "s_aux": ("sinks", "one logit per query head, shape (Hq,)"),
}


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown_keywords(fn: str, unknown: dict[str, Any]) -> AttentionInputError:
    """The error for keywords ``fn`` does not take: each with ours (another library's spelling), the closest
    (a misspelling), or nothing more."""
    import difflib

    hints = []
    for name in unknown:
        ours, how = _SPELLINGS.get(name, (None, ""))
        if ours is not None:
            hints.append(f"sdpa_flash spells {name}= as {ours}= ({how}).")
        elif how:
            hints.append(f"{how}.")
        else:
            close = difflib.get_close_matches(name, _KEYWORDS, n=1)
            if close:
                hints.append(f"Did you mean {close[0]}= for {name}=?")
    got = ", ".join(f"{name}={_short(value)}" for name, value in unknown.items())
    return AttentionInputError(" ".join((
        f"Expected {fn}()'s keyword arguments to be among {', '.join(_KEYWORDS)}, but got {got} instead.", *hints)))


# ------------------------------------------------------------------------------------ key padding mask
class _MaskLayout(NamedTuple):
    """Where a (B, S) key padding mask's True entries are, in row-major order."""

    batch_index: torch.Tensor
    position_index: torch.Tensor
    lengths: tuple[int, ...]
    contiguous: bool  # every row's real tokens are one run (left, right or both-sided padding, no holes)


_mask_layouts: dict[int, tuple[Any, int, _MaskLayout]] = {}


def _mask_layout(mask: torch.Tensor) -> _MaskLayout:
    """The :class:`_MaskLayout` of a (B, S) mask.

    Cached per mask object (a weak reference plus its version counter), so the layers of a model that share
    one padding mask read its lengths on the host — a device sync — once, not once per layer.
    """
    import weakref

    got = _mask_layouts.get(id(mask))
    if got is not None and got[0]() is mask and got[1] == mask._version:
        return got[2]
    b_idx, s_idx = torch.nonzero(mask, as_tuple=True)
    s = mask.shape[1]
    pos = torch.arange(s, device=mask.device)
    counts = mask.sum(1)
    if s:  # span of each row's real tokens, first to last: its length when they are one run
        span = torch.where(mask, pos, -1).amax(1) - torch.where(mask, pos, s).amin(1) + 1
    else:
        span = counts
    lens, spans = torch.stack([counts, span]).tolist() if mask.shape[0] else ([], [])
    layout = _MaskLayout(b_idx, s_idx, tuple(int(n) for n in lens),
                         all(n == 0 or n == w for n, w in zip(lens, spans, strict=True)))
    if len(_mask_layouts) >= 64:
        _mask_layouts.clear()
    _mask_layouts[id(mask)] = (weakref.ref(mask), mask._version, layout)
    return layout


def _padded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kpm: torch.Tensor,
            attn_mask: torch.Tensor | None, causal: bool | str, dropout_p: float, scale: float | None, layout: str,
            policy: PolicyLike | None, *, explain_only: bool = False, variants: dict[str, Any] | None = None
            ) -> Any:  # a Plan with explain_only
    """attention() with a key padding mask: pack, run the varlen engine, scatter back (zeros at padding).

    Softcap and sinks (``variants``) go to the engine as they are: neither depends on where a token sits. A window
    does: here it is defined in padded coordinates, as for the same padding given as ``attn_mask``, while the engine
    aligns it per sequence; the two agree when ``Sq == Sk`` and each row's real tokens are one run (left or right
    padding: ``j - i`` is the same in both), and those calls take the packed route. Any other window call takes the
    dense route with the padding as a boolean mask.
    """
    variants = variants or {}
    from . import _varlen as _varlen_engine
    from .varlen import _check_mask, varlen_attention_packed

    if attn_mask is not None:
        raise AttentionInputError("Expected either attn_mask or key_padding_mask, but got both; fold the key "
                                  "padding into attn_mask (True = attend), or pass only key_padding_mask.")
    spec = attention_spec(query, key, value, None, causal, dropout_p, scale, layout, **variants)
    if spec.nested:
        raise AttentionInputError("Expected dense tensors with key_padding_mask, but got nested tensors (their "
                                  "raggedness is already the mask).")
    b, sq, sk = spec.batch, spec.seqlen_q, spec.seqlen_k
    _check_mask(kpm, (b, sk), query.device, "key_padding_mask")
    kind = spec.effective_causal
    q, k, v = (t.transpose(1, 2) for t in (query, key, value)) if layout == "bhsd" else (query, key, value)
    compiling = _compiling()
    padded_coordinates = sq != sk and (kind is not None or spec.window is not None)
    layout_k = None if compiling or padded_coordinates else _mask_layout(kpm)
    holes = spec.window is not None and layout_k is not None and not layout_k.contiguous
    if layout_k is None or holes:
        # Causal masking in padded coordinates with Sq != Sk (or tracing, where the lengths cannot be read, or a
        # window in padded coordinates that per-sequence alignment would move): the exact dense route, with the key
        # padding as a boolean mask.
        mask = kpm[:, None, None, :]
        if explain_only:
            p = explain(query, key, value, attn_mask=mask, causal=causal, dropout_p=dropout_p, scale=scale,
                        layout=layout, policy=policy, **variants)
            what = f"causal={kind}" if kind is not None else "the window"
            why = ("torch.compile is tracing" if compiling else
                   f"{what} with Sq={sq} != Sk={sk} is defined in padded coordinates" if padded_coordinates
                   else "the window is defined in padded coordinates, and with padding inside a row (not one run) "
                   "the packed route's per-sequence window would differ")
            return dataclasses.replace(p, notes=(*p.notes, f"key_padding_mask: dense masked route because {why}"))
        out = attention(query, key, value, attn_mask=mask, causal=causal, dropout_p=dropout_p, scale=scale,
                        layout=layout, policy=policy, **variants)
        if sq == sk:  # padded queries give zeros, as on the varlen path
            rows = kpm[:, None, :, None] if layout == "bhsd" else kpm[:, :, None, None]
            out = out * rows.to(out.dtype)
        return out
    kb, ks, lens_k = layout_k.batch_index, layout_k.position_index, layout_k.lengths
    qb: torch.Tensor | None
    qs: torch.Tensor | None
    if sq == sk:
        qb, qs, lens_q = kb, ks, lens_k
        qp = q[qb, qs]
    else:
        qb = qs = None
        lens_q = (sq,) * b
        qp = q.reshape(b * sq, *q.shape[2:])
    kp, vp = k[kb, ks], v[kb, ks]
    if explain_only:
        return _varlen_engine.explain(qp, kp, vp, lens_q, lens_k, causal=kind or False, dropout_p=dropout_p,
                                      policy=policy, **variants)
    # No cu_seqlens: the engine reads the lengths from seqlens_q/seqlens_k (no device sync)
    out = varlen_attention_packed(qp, kp, vp, None, None,  # type: ignore[arg-type]
                                  max(lens_q, default=0), max(lens_k, default=0),
                                  causal=kind or False, scale=scale, dropout_p=dropout_p, policy=policy,
                                  seqlens_q=lens_q, seqlens_k=lens_k, **variants)
    if qb is None:
        full = out.view(b, sq, *out.shape[1:])
    else:
        full = out.new_zeros(b, sq, *out.shape[1:]).index_put((qb, qs), out)
    return full.transpose(1, 2) if layout == "bhsd" else full

