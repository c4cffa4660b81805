"""``sdpa_flash.nn.Attention``: a self-attention layer (fused QKV projection, GQA, output projection) on sdpa_flash.

Example:
    >>> import torch
    >>> from sdpa_flash.nn import Attention
    >>> layer = Attention(64, num_heads=8, num_kv_heads=2, causal=True)
    >>> x = torch.randn(2, 10, 64)                                   # (B, S, E)
    >>> layer(x).shape
    torch.Size([2, 10, 64])
    >>> mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])  # (B, S), True = real token
    >>> layer(x, key_padding_mask=mask).shape                        # computed packed (varlen path)
    torch.Size([2, 10, 64])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, overload

import torch
from torch import nn

from .attention import attention
from .errors import AttentionInputError
from .policy import PolicyLike
from .varlen import VarlenBatch, varlen_attention_packed

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention with grouped key/value heads, computed by :func:`sdpa_flash.attention`.

    ``y = out_proj(attention(q, k, v))`` with ``q, k, v`` from one fused projection of ``x``. With
    ``num_kv_heads == num_heads`` this is ``torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)``
    for self-attention, with the same parameter layout (``qkv.weight`` is MHA's ``in_proj_weight``: query, key,
    value rows in that order), and the opposite key padding convention (True = a real token here).

    Args:
        embed_dim: E, the model width; must be divisible by ``num_heads``. The head dim is ``E // num_heads``.
        num_heads: query heads Hq.
        num_kv_heads: key/value heads Hkv (``Hq % Hkv == 0``; default ``num_heads``; 1 is multi-query
            attention). They are read in place by kernels that support GQA, never repeated in memory.
        causal: query i attends to keys j <= i.
        dropout: attention dropout probability in [0, 1), applied only in training mode.
        bias: add biases to the input and output projections.
        policy: the sdpa_flash policy for this layer's calls (``None``: the policy in force at each call);
            the attribute ``policy`` may be changed later.
        device, dtype: of the parameters.

    Shapes:
        forward(x ``(B, S, E)``) -> ``(B, S, E)``; forward(x :class:`~sdpa_flash.varlen.VarlenBatch` with values
        ``(T, E)`` or ``(T, 1, E)``) -> a ``VarlenBatch`` of the same layout. B batch, S sequence, T packed tokens.

    Raises:
        AttentionInputError: invalid sizes or dropout.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        policy: PolicyLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kv = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", kv)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AttentionInputError(f"Expected {name} to be a positive int, but got {value!r} instead.")
        if embed_dim % num_heads:
            raise AttentionInputError(f"Expected embed_dim to be divisible by num_heads, but got embed_dim={embed_dim} "
                                      f"and num_heads={num_heads} instead.")
        if num_heads % kv:
            raise AttentionInputError(f"Expected num_heads to be a multiple of num_kv_heads (GQA), but got "
                                      f"num_heads={num_heads} and num_kv_heads={kv} instead.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise AttentionInputError(f"Expected dropout to be a float in [0, 1), but got {dropout!r} instead.")
        if not isinstance(causal, bool):
            raise AttentionInputError(f"Expected causal to be a bool, but got {causal!r} instead.")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = kv
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.dropout = float(dropout)
        self.policy = policy
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * kv) * self.head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MultiheadAttention's initialisation: Xavier-uniform input projection, zero biases."""
        nn.init.xavier_uniform_(self.qkv.weight)
        self.out_proj.reset_parameters()
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, dropout={self.dropout}, policy={self.policy!r}")

    @overload
    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = ...,
                attn_mask: torch.Tensor | None = ...) -> torch.Tensor: ...

    @overload
    def forward(self, x: VarlenBatch, *, key_padding_mask: None = ..., attn_mask: None = ...) -> VarlenBatch: ...

    def forward(self, x: torch.Tensor | VarlenBatch, *, key_padding_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor | VarlenBatch:
        """Self-attention over ``x``.

        Args:
            x: ``(B, S, E)``, or a :class:`~sdpa_flash.varlen.VarlenBatch` of packed tokens (values ``(T, E)``
                or ``(T, 1, E)``, e.g. ``varlen.pack([s[:, None] for s in seqs])``): attention within each
                sequence.
            key_padding_mask: ``(B, S)`` bool, **True = a real token** (``nn.MultiheadAttention``'s is the
                opposite: pass ``~its_mask``). Computed packed, on the varlen path; rows at padding positions of
                the result are ``out_proj(0)`` (its bias).
            attn_mask: boolean (True = attend) or additive float, broadcastable to ``(B, Hq, S, S)``; combined
                with ``causal`` and ``key_padding_mask`` when given.

        Returns:
            ``(B, S, E)``, or a ``VarlenBatch`` with the input's lengths and layout.
        """
        if isinstance(x, VarlenBatch):
            if key_padding_mask is not None or attn_mask is not None:
                raise AttentionInputError("Expected no key_padding_mask or attn_mask with a VarlenBatch input (its "
                                          "lengths are the mask), but got one.")
            return self._forward_varlen(x)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AttentionInputError(f"Expected x of shape (B, S, {self.embed_dim}) or a VarlenBatch, but got {shape} "
                                      "instead.")
        b, s, _ = x.shape
        q, k, v = self._project(x.reshape(b * s, self.embed_dim))
        q, k, v = (t.view(b, s, *t.shape[1:]) for t in (q, k, v))  # (B, S, H, D): flash-attn's layout
        p = self.dropout if self.training else 0.0
        if key_padding_mask is not None and attn_mask is not None:
            attn_mask = _fold(attn_mask, key_padding_mask, q.dtype)
            key_padding_mask = None
        out = attention(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=self.causal,
                        dropout_p=p, layout="bshd", policy=self.policy)
        return self.out_proj(out.reshape(b, s, self.embed_dim))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, E)`` -> q ``(N, Hq, D)``, k and v ``(N, Hkv, D)`` (views of one fused projection)."""
        qkv = self.qkv(x).view(x.shape[0], self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        return qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)

    def _forward_varlen(self, x: VarlenBatch) -> VarlenBatch:
        values = x.values
        if values.shape[0] != x.total or math.prod(values.shape[1:]) != self.embed_dim or values.dim() not in (2, 3):
            raise AttentionInputError(f"Expected VarlenBatch values of shape (T, {self.embed_dim}) or "
                                      f"(T, 1, {self.embed_dim}), but got {tuple(values.shape)} instead.")
        q, k, v = self._project(values.reshape(values.shape[0], self.embed_dim))
        p = self.dropout if self.training else 0.0
        out = varlen_attention_packed(q, k, v, x.cu_seqlens, x.cu_seqlens, x.max_seqlen, x.max_seqlen,
                                      causal=self.causal, dropout_p=p, policy=self.policy, seqlens_q=x.seqlens,
                                      seqlens_k=x.seqlens)
        y = self.out_proj(out.reshape(values.shape[0], self.embed_dim))
        return dataclasses.replace(x, values=y.view(values.shape))


def _fold(attn_mask: torch.Tensor, key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One mask from both: key padding (True = real) applied to ``attn_mask`` (bool, or additive float)."""
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise AttentionInputError(f"Expected key_padding_mask to be a (B, S) bool tensor, but got "
                                  f"{key_padding_mask.dim()}-D dtype={key_padding_mask.dtype} instead.")
    keep = key_padding_mask[:, None, None, :]
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.to(dtype).masked_fill(~keep, float("-inf"))
