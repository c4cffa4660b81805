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
) -> torch.Tensor:
    """PyTorch's math backend, optionally upcast (default float64), on the same arguments as ``attention()``.

    GQA inputs are expanded explicitly; ``causal="bottom_right"`` uses the bottom-right aligned mask.
    ``dtype=None`` runs it in the inputs' own dtype (PyTorch then computes float16/bfloat16 in float32).
    """
    from ..spec import causal_mask_tensor

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
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the private math op would add it as 0/1
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float("-inf"))
    out = torch._scaled_dot_product_attention_math(q, k, v, attn_mask, 0.0, False, scale=scale)[0]
    return out if layout == "bhsd" else out.transpose(1, 2)
