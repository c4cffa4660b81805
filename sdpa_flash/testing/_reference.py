"""The float64 reference: PyTorch's math backend on the same arguments as ``attention()``."""

from __future__ import annotations

import torch

__all__ = ["reference_attention"]


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool | str = False,
    scale: float | None = None,
    layout: str = "bhsd",
    dtype: torch.dtype | None = torch.float64,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch's math backend, optionally upcast (default float64), on the same arguments as ``attention()``.

    GQA inputs are expanded explicitly; ``causal="bottom_right"`` uses the bottom-right aligned mask.
    ``dtype=None`` runs it in the inputs' own dtype (PyTorch then computes float16/bfloat16 in float32).
    ``window``, ``softcap`` and ``sinks`` as :func:`sdpa_flash.attention` defines them; with softcap or sinks the
    softmax is written out (the math op has neither); ``sinks`` is cast to ``dtype`` too.
    """
    from ..backends._base import merge_mask
    from ..spec import causal_mask_tensor, window_mask_tensor

    q, k, v = (query, key, value) if layout == "bhsd" else (t.transpose(1, 2) for t in (query, key, value))
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(dtype)
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # a str causal is not a key: it falls through as the default
    kind = {True: "top_left", False: None, None: None}.get(causal, causal)  # type: ignore[arg-type]
    if kind is not None:
        cm = causal_mask_tensor(str(kind), q.shape[-2], k.shape[-2], q.device)
        if attn_mask is None:
            attn_mask = cm
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & cm
        else:
            attn_mask = attn_mask.masked_fill(~cm, float("-inf"))
    if window is not None:
        wm = window_mask_tensor(_unbounded(window), q.shape[-2], k.shape[-2], q.device)
        attn_mask = wm if attn_mask is None else merge_mask(attn_mask, wm)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the private math op would add it as 0/1
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float("-inf"))
    if softcap or sinks is not None:
        out = _scores_reference(q, k, v, attn_mask, scale, softcap or None, sinks)
    else:
        out = torch._scaled_dot_product_attention_math(q, k, v, attn_mask, 0.0, False, scale=scale)[0]
    return out if layout == "bhsd" else out.transpose(1, 2)


def _unbounded(window: tuple[int | None, int | None]) -> tuple[int | None, int | None]:
    return (None if window[0] is None or window[0] < 0 else window[0],
            None if window[1] is None or window[1] < 0 else window[1])


def _scores_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                      scale: float | None, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention written out: scaled scores, ``softcap * tanh(s / softcap)``, the additive mask, then the
    sinks as one more softmax column per head with no value. A row that sees nothing gives 0."""
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if sinks is not None:
        sink = sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, sink], -1)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v
