"""flash-attn 2.8's ``flash_attn.bert_padding``: padded ``(batch, seqlen, ...)`` <-> packed ``(total, ...)``.

The inverse pair :func:`unpad_input` / :func:`pad_input` (with the index helpers they are built on), with flash-attn
2.8's signatures and return arities. Example: an attention mask whose rows hold 2, 3 and 2 valid tokens gives
``cu_seqlens = [0, 2, 5, 7]`` (int32, leading zero) and ``max_seqlen_in_batch = 3``::

    x, indices, cu_seqlens, max_seqlen, used = unpad_input(hidden, mask)     # (7, ...) packed
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    padded = pad_input(out, indices, batch, seqlen)                            # zeros where mask == 0
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import AttentionInputError

__all__ = [
    "UnpadOutput",
    "index_first_axis",
    "index_first_axis_residual",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]


def _check(name: str, t: Any, min_dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise AttentionInputError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__} instead.")
    if t.dim() < min_dim:
        raise AttentionInputError(f"Expected {name} to have at least {min_dim} dimensions, but got shape "
                                  f"{tuple(t.shape)} instead.")
    return t


def _check_indices(indices: Any) -> torch.Tensor:
    t = _check("indices", indices, 1)
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise AttentionInputError(f"Expected indices to be a 1-D integer tensor, but got shape {tuple(t.shape)} "
                                  f"and dtype {t.dtype} instead.")
    return t


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis, with autograd (the backward scatters into zeros).

    Args:
        input: ``(N, ...)`` with at least 2 dimensions.
        indices: ``(M,)`` integer positions in ``[0, N)``.

    Returns:
        ``(M, ...)``.
    """
    _check("input", input, 2)
    return input[_check_indices(indices)]


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """The inverse of :func:`index_first_axis`: ``values`` ``(M, ...)`` placed at ``indices`` of zeros
    ``(first_axis_dim, ...)``, with autograd (the gradient of ``values`` is the output gradient at ``indices``)."""
    _check("values", values, 2)
    idx = _check_indices(indices)
    if idx.shape[0] != values.shape[0]:
        raise AttentionInputError(f"Expected one index per row of values ({values.shape[0]}), but got {idx.shape[0]} "
                                  "indices instead.")
    out = torch.zeros((first_axis_dim, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_put((idx,), values)


def index_first_axis_residual(input: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input[indices], input.detach())``, as flash-attn's residual variant (the gradient reaches ``input`` once)."""
    _check("input", input, 2)
    return input[_check_indices(indices)], input.detach()


class UnpadOutput(NamedTuple):
    """What :func:`unpad_input` returns (a 5-tuple, as flash-attn 2.8).

    Attributes:
        hidden_states: ``(total_nnz, ...)``: the tokens selected by ``attention_mask`` (+ ``unused_mask``).
        indices: ``(total_nnz,)`` int64: their positions in the flattened ``(batch * seqlen)`` input.
        cu_seqlens: ``(batch + 1,)`` int32: cumulative lengths with a leading 0.
        max_seqlen_in_batch: the longest row, a Python int.
        used_seqlens_in_batch: ``(batch,)`` int32: tokens selected by ``attention_mask`` alone per row.
    """

    hidden_states: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen_in_batch: int
    used_seqlens_in_batch: torch.Tensor


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                unused_mask: torch.Tensor | None = None) -> UnpadOutput:
    """Pack the valid tokens of a padded batch.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)`` bool or int, 1 = valid.
        unused_mask: ``(batch, seqlen)`` bool or int, 1 = allocated but unused (packed too, counted in
            ``cu_seqlens`` but not in ``used_seqlens_in_batch``).

    Returns:
        :class:`UnpadOutput` ``(hidden_states, indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch)``.

    Example:
        >>> mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
        >>> out = unpad_input(torch.randn(3, 3, 4), mask)
        >>> out.cu_seqlens.tolist(), out.max_seqlen_in_batch, out.hidden_states.shape
        ([0, 2, 5, 7], 3, torch.Size([7, 4]))
    """
    _check("hidden_states", hidden_states, 2)
    m = _check("attention_mask", attention_mask, 2)
    if m.dim() != 2 or tuple(m.shape) != tuple(hidden_states.shape[:2]):
        raise AttentionInputError(f"Expected attention_mask of shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}"
                                  f", but got {tuple(m.shape)} instead.")
    all_masks = m
    if unused_mask is not None:
        u = _check("unused_mask", unused_mask, 2)
        if u.shape != m.shape:
            raise AttentionInputError(f"Expected unused_mask of shape {tuple(m.shape)} like attention_mask, but got "
                                      f"{tuple(u.shape)} instead.")
        all_masks = m + u
    seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
    used = m.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:]) if hidden_states.dim() > 2 else \
        hidden_states.reshape(-1, 1)
    packed = index_first_axis(flat, indices)
    if hidden_states.dim() == 2:
        packed = packed.squeeze(-1)
    return UnpadOutput(packed, indices, cu_seqlens, max_seqlen, used)


def unpad_input_for_concatenated_sequences(
    hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pack rows that each hold several concatenated samples (flash-attn's helper of the same name).

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask_in_length: ``(batch, seqlen)`` int: row ``b`` lists the lengths of its samples, then zeros
            (``[[2, 3, 0, 0, 0, 0], [3, 2, 0, ...], [6, 0, ...]]``): each sample becomes its own sequence.

    Returns:
        ``(hidden_states (total_nnz, ...), indices (total_nnz,), cu_seqlens (num_samples + 1,) int32,
        max_seqlen_in_batch)``.
    """
    _check("hidden_states", hidden_states, 2)
    m = _check("attention_mask_in_length", attention_mask_in_length, 2)
    length = m.sum(dim=-1)
    seqlen = m.size(-1)
    mask_2d = torch.arange(seqlen, device=length.device, dtype=length.dtype).expand(len(length), seqlen) < \
        length.unsqueeze(1)
    real = torch.nonzero(m.flatten(), as_tuple=False).flatten()
    seqlens = m.flatten()[real]
    indices = torch.nonzero(mask_2d.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    packed = index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of :func:`unpad_input`: ``(total_nnz, ...)`` -> ``(batch, seqlen, ...)``, zeros elsewhere.

    Args:
        hidden_states: ``(total_nnz, ...)``.
        indices: ``(total_nnz,)``: positions in the flattened ``(batch * seqlen)`` batch (from :func:`unpad_input`).
        batch, seqlen: the padded shape.
    """
    _check("hidden_states", hidden_states, 1)
    if hidden_states.dim() == 1:
        return index_put_first_axis(hidden_states.unsqueeze(-1), indices, batch * seqlen).view(batch, seqlen)
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
