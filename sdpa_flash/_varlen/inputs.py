"""The varlen engine's input checking: packed tensors and their lengths in, a :class:`VarlenSpec` out, and a typed
error for anything else before any plan is made."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from .._validate import (
    causal_kind,
    check_dropout,
    check_heads,
    check_packed_window,
    check_same,
    check_sinks,
    check_softcap,
    check_tensor,
)
from ..errors import AttentionInputError
from .planning import VarlenSpec

__all__: list[str] = []



def _spec_of(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seqlens_q: tuple[int, ...],
             seqlens_k: tuple[int, ...], causal: Any, dropout_p: float, window: Any = None, softcap: Any = None,
             sinks: Any = None) -> VarlenSpec:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, 3, "packed (T, H, D)")
    check_same(query, key, value)
    if key.shape[0] != value.shape[0]:
        raise AttentionInputError(f"Expected key and value to have the same tokens, but got {tuple(key.shape)} and "
                                  f"{tuple(value.shape)} instead.")
    hq, hk = query.shape[1], key.shape[1]
    check_heads(hq, hk, value.shape[1], query.shape[-1], key.shape[-1], value.shape[-1])
    if len(seqlens_q) != len(seqlens_k):
        raise AttentionInputError(f"Expected as many query sequences as key sequences, but got {len(seqlens_q)} and "
                                  f"{len(seqlens_k)} instead.")
    if sum(seqlens_q) != query.shape[0]:
        raise AttentionInputError(f"Expected the query lengths to sum to its {query.shape[0]} rows, but they sum to "
                                  f"{sum(seqlens_q)} instead.")
    if sum(seqlens_k) != key.shape[0]:
        raise AttentionInputError(f"Expected the key lengths to sum to its {key.shape[0]} rows, but they sum to "
                                  f"{sum(seqlens_k)} instead.")
    kind = causal_kind(causal)
    check_dropout(dropout_p)
    win = check_packed_window(window, kind, seqlens_q, seqlens_k)
    cap = check_softcap(softcap)
    has_sinks = check_sinks(sinks, hq, query.device)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad or (
        has_sinks and sinks.requires_grad))
    return VarlenSpec(query.device.type, query.dtype, hq, hk, query.shape[-1], value.shape[-1], seqlens_q, seqlens_k,
                      kind, dropout_p > 0, needs_grad, win, cap, has_sinks)


def _host_lengths(cu: Any, given: Sequence[int] | None, max_seqlen: int, what: str) -> tuple[int, ...]:
    if given is not None:
        lens = tuple(map(int, given))
    else:
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or \
                cu.numel() < 1:
            desc = f"{cu.dim()}-D dtype={cu.dtype}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise AttentionInputError(f"Expected {what} to be a 1-D int32 tensor with a leading 0, but got {desc} "
                                      "instead.")
        host = cu.tolist()
        if host[0] != 0:
            raise AttentionInputError(f"Expected {what} to start at 0, but it starts at {host[0]} instead.")
        lens = tuple(b - a for a, b in itertools.pairwise(host))
    if lens and min(lens) < 0:
        raise AttentionInputError(f"Expected {what} to be non-decreasing, but it has a negative length.")
    if lens and max_seqlen is not None and max(lens) > max_seqlen:
        raise AttentionInputError(f"Expected max_seqlen >= the longest sequence ({max(lens)}) for {what}, but got "
                                  f"{max_seqlen} instead.")
    return lens
