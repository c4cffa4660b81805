"""``AttentionSpec``: the small, hashable summary of one attention call that the planner decides on."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["CAUSAL_KINDS", "FLOAT_DTYPES", "AttentionSpec", "CausalKind", "MaskKind", "Window", "causal_mask_tensor",
           "cudnn_release", "cudnn_version_tuple", "format_bytes", "format_cudnn_version", "window_mask_tensor"]

CausalKind = str | None
"""``None`` (no causal masking), ``"top_left"`` (PyTorch's ``is_causal``) or ``"bottom_right"`` (flash-attn)."""

MaskKind = str | None
"""``None``, ``"bool"`` (True = attend) or ``"float"`` (added to the scores)."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes attention takes."""

CAUSAL_KINDS: dict[object, CausalKind] = {
    False: None, None: None, True: "top_left", "top_left": "top_left", "bottom_right": "bottom_right"}
"""Every accepted ``causal=`` value and its kind (0/1 count as False/True: they are equal dictionary keys)."""


def causal_mask_tensor(kind: str, sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """The (Sq, Sk) boolean causal mask, True where attending is allowed.

    ``top_left``: query i sees keys j <= i. ``bottom_right``: query i sees keys j <= i + Sk - Sq.
    """
    offset = 0 if kind == "top_left" else sk - sq
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=offset)


Window = tuple[int | None, int | None]
"""A sliding window ``(left, right)``: query i sees key j iff ``-left <= j - (i + Sk - Sq) <= right`` (bottom-right
aligned, flash-attn's and FA4's convention); ``None`` on a side is unbounded."""


def window_mask_tensor(window: Window, sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """The (Sq, Sk) boolean mask of a sliding window, True where attending is allowed (see :data:`Window`)."""
    left, right = window
    rel = torch.arange(sk, device=device)[None, :] - (torch.arange(sq, device=device)[:, None] + (sk - sq))
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left is not None:
        keep &= rel >= -left
    if right is not None:
        keep &= rel <= right
    return keep


def cudnn_version_tuple(version: int) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of cuDNN's integer version, as ``torch.backends.cudnn.version()`` returns it.

    cuDNN 9 and later encode ``major * 10000 + minor * 100 + patch`` (``91900`` is 9.19.0, ``90100`` 9.1.0);
    cuDNN 8 and earlier ``major * 1000 + minor * 100 + patch`` (``8907`` is 8.9.7). The old scheme stops below
    10000 and the new one starts at 90000, so the integers of both still order as the versions do.
    """
    if version >= 10000:
        return version // 10000, version // 100 % 100, version % 100
    return version // 1000, version // 100 % 10, version % 100


def cudnn_release(v: int) -> str:
    """cuDNN's integer version as its release: ``91900`` -> ``"9.19.0"``, ``8907`` -> ``"8.9.7"``."""
    return ".".join(map(str, cudnn_version_tuple(v)))


def format_cudnn_version(v: int | None) -> str:
    """cuDNN's integer version as users read it, with the integer too: ``92400`` -> ``"9.24.0 (92400)"``,
    ``8907`` -> ``"8.9.7 (8907)"``, ``None`` -> ``"none"``."""
    return "none" if v is None else f"{cudnn_release(v)} ({v})"


def format_bytes(n: int) -> str:
    """``3221225472`` -> ``"3 GiB"`` (three significant digits)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Everything about a call that decides which backend may run it; shapes are in (B, H, S, D) terms.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        dtype: the dtype of query, key and value (they must agree).
        batch: B.
        heads_q: query heads, Hq.
        heads_kv: key/value heads, Hkv; ``Hq % Hkv == 0`` (GQA/MQA when ``Hkv < Hq``).
        seqlen_q: query length, Sq.
        seqlen_k: key/value length, Sk.
        head_dim: query/key head dimension, D.
        head_dim_v: value head dimension, Dv.
        causal: ``None``, ``"top_left"`` or ``"bottom_right"``; with ``Sq == Sk`` both are the same mask.
        mask: ``None``, ``"bool"`` or ``"float"`` (an explicit ``attn_mask``).
        dropout: whether ``dropout_p > 0``.
        needs_grad: whether autograd will need a backward through the call.
        nested: whether the inputs are nested (jagged) tensors.
        mask_grad: whether a float ``attn_mask`` requires grad (a learned bias: autograd needs its gradient too).
        window: a sliding window ``(left, right)`` (see :data:`Window`), ``None`` for none; a window that covers every
            key is ``None`` (a plain call).
        softcap: ``c`` where scores become ``c * tanh(score / c)`` (Gemma 2), ``None`` for none.
        sinks: whether a learnable sink logit per query head joins each row's softmax (gpt-oss).
    """

    device_type: str
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    causal: CausalKind = None
    mask: MaskKind = None
    dropout: bool = False
    needs_grad: bool = False
    nested: bool = False
    mask_grad: bool = False
    window: Window | None = None
    softcap: float | None = None
    sinks: bool = False

    @property
    def gqa(self) -> bool:
        """Whether key/value have fewer heads than the query."""
        return self.heads_kv != self.heads_q

    @property
    def effective_causal(self) -> CausalKind:
        """The causal kind with the square case folded: ``"top_left"`` whenever ``Sq == Sk``."""
        if self.causal is not None and self.seqlen_q == self.seqlen_k:
            return "top_left"
        return self.causal

    def describe(self, layout: str = "bhsd") -> str:
        """One line for error messages: ``query (2, 16, 4096, 128) bfloat16 on cuda, causal=top_left``.

        With ``layout="bshd"`` the shapes are given as the user passed them, ``(B, S, H, D)``, and the line says
        ``layout=bshd``.
        """
        b = self.batch

        def shape(h: int, s: int, d: int) -> tuple[int, int, int, int]:
            return (b, s, h, d) if layout == "bshd" else (b, h, s, d)

        parts = [
            f"query {shape(self.heads_q, self.seqlen_q, self.head_dim)}",
            f"key {shape(self.heads_kv, self.seqlen_k, self.head_dim)}",
            f"value {shape(self.heads_kv, self.seqlen_k, self.head_dim_v)}",
            f"{dtype_name(self.dtype)} on {self.device_type}",
        ]
        if layout == "bshd":
            parts.append("layout=bshd")
        if self.causal:
            parts.append(f"causal={self.causal}")
        if self.mask:
            parts.append(f"attn_mask={self.mask}" + (" (requires grad)" if self.mask_grad else ""))
        if self.dropout:
            parts.append("dropout")
        if self.needs_grad:
            parts.append("requires grad")
        if self.nested:
            parts.append("nested")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        return ", ".join(parts)
