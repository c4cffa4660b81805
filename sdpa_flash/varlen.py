"""Variable-length batches: one :class:`VarlenBatch` type, every conversion, and exact varlen attention.

A ragged batch of ``n`` sequences of lengths ``L_0 ... L_{n-1}`` is stored *packed*: the tokens of every
sequence one after another in ``values`` of shape ``(T, H, D)`` with ``T = sum L_i``, and ``cu_seqlens`` (int32,
``n + 1`` entries, leading zero) marking where each sequence starts — flash-attn's and ``varlen_attn``'s format::

    lengths [2, 3, 2]  ->  cu_seqlens [0, 2, 5, 7],  max_seqlen 3,  values (7, H, D)

Every conversion has its inverse, keeps autograd, and runs as a fixed number of tensor operations whatever the
number of sequences (no Python loop over the batch):

============================  ==================================  ======================================
from                          to ``VarlenBatch``                  back
============================  ==================================  ======================================
list of ``(L_i, H, D)``       :func:`pack`                        :meth:`VarlenBatch.unpack`
padded ``(B, S, H, D)``       :func:`from_padded` (lengths or     :meth:`VarlenBatch.to_padded` (values
                              a ``(B, S)`` bool mask, True=keep)  and mask; original positions restored)
jagged nested ``(B, H, j, D)`` :func:`from_nested`                 :meth:`VarlenBatch.to_nested`
packed + ``cu_seqlens``       :func:`from_cu_seqlens`             ``batch.values``, ``batch.cu_seqlens``
packed + position ids         :func:`from_position_ids`           —
============================  ==================================  ======================================

The mask convention is SDPA's boolean ``attn_mask`` and Hugging Face's ``attention_mask``: **True (1) = a real
token**. (``nn.MultiheadAttention``'s ``key_padding_mask`` is the opposite: pass ``~mask`` from there.)

:func:`varlen_attention` computes attention within each sequence — never across sequences, never onto padding —
with the engine in :mod:`sdpa_flash._varlen` (see :func:`explain_varlen` for what it runs and why).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .errors import AttentionInputError

__all__ = [
    "Padded",
    "VarlenBatch",
    "cu_seqlens_from_lengths",
    "explain_varlen",
    "from_cu_seqlens",
    "from_nested",
    "from_padded",
    "from_position_ids",
    "pack",
    "varlen_attention",
    "varlen_attention_packed",
]


def _fail(msg: str) -> AttentionInputError:
    return AttentionInputError(msg)


class Padded(NamedTuple):
    """A padded batch: ``values`` ``(B, S, H, D)`` (zeros at padding) and ``mask`` ``(B, S)`` bool, True = real."""

    values: torch.Tensor
    mask: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class VarlenBatch:
    """A packed batch of variable-length sequences.

    Attributes:
        values: ``(T, H, D)``: every sequence's tokens, one sequence after another (T = total tokens).
        cu_seqlens: ``(n + 1,)`` int32 on ``values.device``: sequence ``i`` is ``values[cu[i]:cu[i+1]]``.
        max_seqlen: the longest sequence (a Python int, as flash-attn's kernels take it).
        seqlens: the lengths as Python ints (kept on the host so planning never waits for the GPU).
        source: where the tokens sit in the padded tensor they came from (``from_padded``): the flat indices
            into ``B * S`` and ``(B, S)``; ``to_padded()`` puts them back there. ``None`` otherwise.

    Build one with :func:`pack`, :func:`from_padded`, :func:`from_cu_seqlens`, :func:`from_position_ids` or
    :func:`from_nested`; constructing it directly skips validation.

    Example:
        >>> a, b = torch.randn(2, 4, 8), torch.randn(3, 4, 8)
        >>> batch = pack([a, b])
        >>> batch.cu_seqlens.tolist(), batch.max_seqlen, tuple(batch.values.shape)
        ([0, 2, 5], 3, (5, 4, 8))
        >>> [t.shape[0] for t in batch.unpack()]
        [2, 3]
    """

    values: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seqlens: tuple[int, ...]
    source: tuple[torch.Tensor, tuple[int, int]] | None = None

    @property
    def batch_size(self) -> int:
        """The number of sequences, n."""
        return len(self.seqlens)

    @property
    def total(self) -> int:
        """T, the number of tokens."""
        return int(self.values.shape[0])

    @property
    def heads(self) -> int:
        return int(self.values.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.values.shape[-1])

    def with_values(self, values: torch.Tensor) -> VarlenBatch:
        """The same layout (lengths, offsets, source) around other ``(T, H', D')`` values, e.g. an output."""
        if values.dim() != 3 or values.shape[0] != self.total:
            raise _fail(f"Expected values of shape ({self.total}, H, D), but got {tuple(values.shape)} instead.")
        return dataclasses.replace(self, values=values)

    def unpack(self) -> list[torch.Tensor]:
        """The sequences, each ``(L_i, H, D)`` (views of ``values``)."""
        return list(torch.split(self.values, list(self.seqlens), dim=0))

    def to_padded(self, max_seqlen: int | None = None) -> Padded:
        """``(B, S, H, D)`` values with zeros at padding and the ``(B, S)`` mask (True = real token).

        A batch made by :func:`from_padded` goes back to the exact positions it came from (left padding stays
        left padding); otherwise sequences are right-padded to ``max_seqlen`` (default: the longest).
        """
        v = self.values
        if self.source is not None and max_seqlen is None:
            flat_index, (b, s) = self.source
        else:
            s = self.max_seqlen if max_seqlen is None else max_seqlen
            if s < self.max_seqlen:
                raise _fail(f"Expected max_seqlen >= the longest sequence ({self.max_seqlen}), but got {s} instead.")
            b = self.batch_size
            flat_index = _padded_index(self.cu_seqlens, self.seqlens, s, v.device)
        out = v.new_zeros(b * s, *v.shape[1:]).index_copy(0, flat_index, v)
        mask = torch.zeros(b * s, dtype=torch.bool, device=v.device).index_fill_(0, flat_index, True)
        return Padded(out.view(b, s, *v.shape[1:]), mask.view(b, s))

    def to_nested(self) -> torch.Tensor:
        """A jagged nested tensor ``(B, H, j, D)`` (SDPA's layout) over the same storage."""
        return _jagged_view(self.values, self.cu_seqlens.long(), self.max_seqlen).transpose(1, 2)

    def __repr__(self) -> str:
        lens = list(self.seqlens[:8]) + (["..."] if len(self.seqlens) > 8 else [])
        return (f"VarlenBatch(values={tuple(self.values.shape)} {self.values.dtype} on {self.values.device}, "
                f"seqlens={lens}, max_seqlen={self.max_seqlen})")


def _jagged_view(values: torch.Tensor, offsets: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
    """``torch.nested.nested_tensor_from_jagged(values, offsets, max_seqlen=...)`` without its log line.

    The public function first asks ``torch.fx``'s ``is_fx_tracing()``, which logs a deprecation line
    (``W... is_fx_tracing will return true for both fx.symbolic_trace and torch.export ...``, torch 2.13) once per
    process; the view it then builds is made here the same way. Torch builds without that helper use the public
    function.
    """
    try:
        from torch.nested._internal.nested_tensor import nested_view_from_values_offsets_lengths as view
    except ImportError:  # pragma: no cover - a torch that moved it
        return torch.nested.nested_tensor_from_jagged(values, offsets=offsets, max_seqlen=max_seqlen)
    return view(values, offsets, None, ragged_idx=1, max_seqlen=max_seqlen)


# ------------------------------------------------------------------------------------------ constructors
def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor, device: torch.device | str | None = None
                            ) -> torch.Tensor:
    """``[2, 3, 2]`` -> ``tensor([0, 2, 5, 7], dtype=torch.int32)`` (on ``device``)."""
    lens = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    return torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)


def _lengths_tuple(lengths: Sequence[int] | torch.Tensor, what: str) -> tuple[int, ...]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dim() != 1:
            raise _fail(f"Expected {what} to be a 1-D integer tensor or a list of ints, but got "
                        f"{lengths.dim()}-D dtype={lengths.dtype} instead.")
        out = tuple(int(x) for x in lengths.tolist())
    else:
        try:
            out = tuple(int(x) for x in lengths)
        except (TypeError, ValueError):
            raise _fail(f"Expected {what} to be a list of ints, but got {lengths!r} instead.") from None
        if any(not isinstance(x, int) and not (isinstance(x, torch.Tensor) and x.dim() == 0) for x in lengths):
            raise _fail(f"Expected {what} to hold integers, but got {list(lengths)!r} instead.")
    if any(x < 0 for x in out):
        raise _fail(f"Expected non-negative {what}, but got {list(out)} instead.")
    return out


def _check_values(values: Any, what: str = "values") -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise _fail(f"Expected {what} to be a torch.Tensor, but got {type(values).__name__} instead.")
    if values.dim() != 3:
        raise _fail(f"Expected {what} to be 3-D (T, H, D), but got a {values.dim()}-D tensor of shape "
                    f"{tuple(values.shape)} instead.")
    return values


def _make(values: torch.Tensor, seqlens: tuple[int, ...], cu: torch.Tensor | None = None,
          source: tuple[torch.Tensor, tuple[int, int]] | None = None) -> VarlenBatch:
    if sum(seqlens) != values.shape[0]:
        raise _fail(f"Expected the lengths to sum to the {values.shape[0]} packed rows, but they sum to "
                    f"{sum(seqlens)} instead.")
    if cu is None:
        cu = cu_seqlens_from_lengths(seqlens, values.device)
    return VarlenBatch(values, cu, max(seqlens, default=0), seqlens, source)


def pack(sequences: Sequence[torch.Tensor]) -> VarlenBatch:
    """Concatenate ``n`` sequences, each ``(L_i, H, D)``, into a :class:`VarlenBatch` (autograd flows through).

    Example:
        >>> pack([torch.randn(2, 1, 4), torch.randn(3, 1, 4), torch.randn(2, 1, 4)]).cu_seqlens.tolist()
        [0, 2, 5, 7]
    """
    seqs = list(sequences)
    if not seqs:
        raise _fail("Expected at least one sequence to pack, but got an empty list.")
    for i, s in enumerate(seqs):
        _check_values(s, f"sequences[{i}]")
    first = seqs[0]
    for i, s in enumerate(seqs):
        if s.shape[1:] != first.shape[1:] or s.dtype != first.dtype or s.device != first.device:
            raise _fail(f"Expected every sequence to be (L, {first.shape[1]}, {first.shape[2]}) {first.dtype} on "
                        f"{first.device} like sequences[0], but sequences[{i}] is {tuple(s.shape)} {s.dtype} on "
                        f"{s.device}.")
    return _make(torch.cat(seqs, dim=0), tuple(int(s.shape[0]) for s in seqs))


def from_cu_seqlens(values: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int],
                    max_seqlen: int | None = None) -> VarlenBatch:
    """Wrap packed ``(T, H, D)`` values and their ``cu_seqlens`` (e.g. from a dataloader that concatenates
    documents). ``cu_seqlens`` must be integers, 1-D, start at 0, never decrease, and end at T. This reads
    ``cu_seqlens`` once on the host (one device sync if it lives on the GPU)."""
    values = _check_values(values)
    cu = torch.as_tensor(cu_seqlens)
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 1:
        raise _fail(f"Expected cu_seqlens to be a 1-D int32 or int64 tensor with a leading 0, but got "
                    f"{cu.dim()}-D dtype={cu.dtype} with {cu.numel()} entries instead.")
    host = cu.tolist()
    if host[0] != 0:
        raise _fail(f"Expected cu_seqlens to start at 0, but it starts at {host[0]} instead.")
    lens = tuple(b - a for a, b in itertools.pairwise(host))
    if any(x < 0 for x in lens):
        bad = next(i for i, x in enumerate(lens) if x < 0)
        raise _fail(f"Expected cu_seqlens to be non-decreasing, but cu_seqlens[{bad}]={host[bad]} > "
                    f"cu_seqlens[{bad + 1}]={host[bad + 1]}.")
    if host[-1] != values.shape[0]:
        raise _fail(f"Expected cu_seqlens to end at the {values.shape[0]} packed rows, but it ends at {host[-1]} "
                    "instead.")
    if max_seqlen is not None and max_seqlen != max(lens, default=0):
        raise _fail(f"Expected max_seqlen to be the longest sequence ({max(lens, default=0)}), but got {max_seqlen} "
                    "instead.")
    dev_cu = cu.to(device=values.device, dtype=torch.int32)
    return _make(values, lens, dev_cu)


def from_position_ids(values: torch.Tensor, position_ids: torch.Tensor) -> VarlenBatch:
    """Packed ``(T, H, D)`` values whose sequences restart their position ids at 0 (``(T,)`` or ``(1, T)``),
    as packing collators write them: ``[0, 1, 0, 1, 2, 0, 1]`` -> lengths ``[2, 3, 2]``."""
    values = _check_values(values)
    pos = position_ids.reshape(-1) if position_ids.dim() == 2 and position_ids.shape[0] == 1 else position_ids
    if pos.dim() != 1 or pos.shape[0] != values.shape[0] or pos.dtype.is_floating_point:
        raise _fail(f"Expected integer position_ids of shape ({values.shape[0]},) or (1, {values.shape[0]}), but got "
                    f"{tuple(position_ids.shape)} dtype={position_ids.dtype} instead.")
    if pos.numel() and int(pos[0]) != 0:
        raise _fail(f"Expected position_ids to start at 0, but got {int(pos[0])} instead.")
    starts = torch.nonzero(pos == 0).flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([pos.numel()])])
    lens = (ends - starts).tolist()
    return _make(values, tuple(int(x) for x in lens))


def from_padded(x: torch.Tensor, *, lengths: Sequence[int] | torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> VarlenBatch:
    """Pack a padded ``(B, S, H, D)`` batch, given per-sequence ``lengths`` (right padding) or a ``(B, S)``
    boolean ``key_padding_mask`` (True = real token; any padding pattern, left or right).

    :meth:`VarlenBatch.to_padded` is the inverse: the tokens go back to the positions they came from.
    A mask on the GPU costs one device sync (its lengths are read on the host).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise _fail(f"Expected x to be a 4-D (B, S, H, D) tensor, but got {shape} instead.")
    b, s = int(x.shape[0]), int(x.shape[1])
    if (lengths is None) == (key_padding_mask is None):
        raise _fail("Expected exactly one of lengths= or key_padding_mask=, but got "
                    f"{'both' if lengths is not None else 'neither'}.")
    if lengths is not None:
        lens = _lengths_tuple(lengths, "lengths")
        if len(lens) != b:
            raise _fail(f"Expected {b} lengths (one per batch row), but got {len(lens)} instead.")
        if any(n > s for n in lens):
            raise _fail(f"Expected lengths <= the padded length S={s}, but got {max(lens)} instead.")
        mask = torch.arange(s, device=x.device)[None, :] < torch.tensor(lens, device=x.device)[:, None]
    else:
        assert key_padding_mask is not None  # exactly one of the two (checked above)
        mask = key_padding_mask
        _check_mask(mask, (b, s), x.device, "key_padding_mask")
        lens = tuple(int(n) for n in mask.sum(1).tolist())
    flat_index = torch.nonzero(mask.reshape(-1)).flatten()
    values = x.reshape(b * s, *x.shape[2:]).index_select(0, flat_index)
    return _make(values, lens, source=(flat_index, (b, s)))


def from_nested(nt: torch.Tensor) -> VarlenBatch:
    """A jagged nested tensor ``(B, H, j, D)`` (SDPA's layout; ``(B, j, H, D)`` is transposed first by you)."""
    if not getattr(nt, "is_nested", False) or nt.dim() != 4:
        raise _fail(f"Expected a 4-D jagged nested tensor (B, H, j, D), but got {type(nt).__name__} "
                    f"{'nested' if getattr(nt, 'is_nested', False) else 'dense'} of dim {nt.dim()} instead.")
    if getattr(nt, "layout", None) != torch.jagged:
        raise _fail("Expected a nested tensor with layout=torch.jagged, but got a strided nested tensor; build it "
                    "with torch.nested.nested_tensor(..., layout=torch.jagged).")
    inner = nt.transpose(1, 2)  # (B, j, H, D): the ragged dim next to the batch
    values, offsets = inner.values(), inner.offsets()  # type: ignore[attr-defined]  # NestedTensor's, not in stubs
    return from_cu_seqlens(values, offsets)


def _check_mask(mask: Any, shape: tuple[int, int], device: torch.device, what: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise _fail(f"Expected {what} to be a torch.Tensor, but got {type(mask).__name__} instead.")
    if mask.dtype != torch.bool:
        raise _fail(f"Expected {what} to be boolean (True = real token), but got dtype={mask.dtype} instead; "
                    "use mask.bool() for a 0/1 attention_mask.")
    if tuple(mask.shape) != shape:
        raise _fail(f"Expected {what} of shape (B, S) = {shape}, but got {tuple(mask.shape)} instead.")
    if mask.device != device:
        raise _fail(f"Expected {what} on {device} like the inputs, but got {mask.device} instead.")


def _padded_index(cu: torch.Tensor, seqlens: tuple[int, ...], s: int, device: torch.device) -> torch.Tensor:
    """Flat index into ``(n * s)`` of each packed token, right-padded: token t of sequence i -> i * s + t."""
    lens = torch.tensor(seqlens, device=device, dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(len(seqlens), device=device), lens)
    pos = torch.arange(int(lens.sum()), device=device) - cu.to(device=device, dtype=torch.long)[:-1][seq]
    return seq * s + pos


# --------------------------------------------------------------------------------------------- attention
def varlen_attention(
    query: VarlenBatch | torch.Tensor,
    key: VarlenBatch | torch.Tensor,
    value: VarlenBatch | torch.Tensor,
    *,
    causal: bool | str = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    policy: Any = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> Any:
    """Attention within each sequence of a ragged batch; the output has the input's kind.

    Args:
        query: a :class:`VarlenBatch` of ``n`` sequences ``(T_q, Hq, D)``, or a jagged nested tensor
            ``(n, Hq, j, D)``.
        key, value: the same kind, ``n`` sequences each, ``(T_k, Hkv, D)`` / ``(T_k, Hkv, Dv)``
            (``Hq % Hkv == 0``: GQA). Key and value share their lengths; query lengths may differ per sequence
            (cross-attention, a KV cache longer than the queries).
        causal: ``False``; ``True`` / ``"top_left"`` (query i of a sequence sees its keys j <= i); or
            ``"bottom_right"`` (query i sees keys j <= i + L_k - L_q, flash-attn's convention: the last query
            sees every key). The two agree for sequences whose query and key lengths are equal.
        scale: softmax scale, default ``1 / sqrt(D)``.
        dropout_p: attention dropout (training only).
        policy: the backend policy, as for :func:`sdpa_flash.attention`.
        window: a sliding window ``(left, right)``, aligned per sequence and bottom-right like ``causal=
            "bottom_right"`` (flash-attn's varlen convention): query i of a sequence sees its key j iff
            ``-left <= j - (i + L_k - L_q) <= right``, bounds inclusive; ``None`` or ``-1`` on a side is unbounded.
            Transformers' ``sliding_window=W`` is ``(W - 1, 0)`` with ``causal=True``. With ``causal=True`` every
            sequence must have ``L_q == L_k`` (else pass ``"bottom_right"``). As :func:`sdpa_flash.attention`'s.
        softcap: ``c > 0`` caps the scaled scores at ``c * tanh(score / c)`` before the softmax (Gemma 2);
            ``None`` or 0 is off.
        sinks: ``(Hq,)`` logits, one per query head (float32 or the inputs' dtype), each one more softmax column
            with no value in every row of every sequence (gpt-oss's ``s_aux``, FA4's ``learnable_sink``).
            Differentiable: autograd gives their gradient.

    Returns:
        A :class:`VarlenBatch` ``(T_q, Hq, Dv)`` with the query's layout, or a nested tensor ``(n, Hq, j, Dv)``.
        A query that sees no key (``L_k = 0``, or none visible under causal masking or the window) gets zeros.

    Example:
        >>> q = pack([torch.randn(5, 2, 8), torch.randn(3, 2, 8)])
        >>> varlen_attention(q, q, q, causal=True).values.shape
        torch.Size([8, 2, 8])
    """
    kinds = [getattr(t, "is_nested", False) for t in (query, key, value)]
    if any(kinds):
        if not all(kinds):
            raise _fail("Expected query, key and value all nested tensors or all VarlenBatch, but got a mix.")
        qb, kb, vb = (from_nested(t) for t in (query, key, value))  # type: ignore[arg-type]  # nested: tensors
    else:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, VarlenBatch):
                raise _fail(f"Expected {name} to be a VarlenBatch or a jagged nested tensor, but got "
                            f"{type(t).__name__} instead (sdpa_flash.attention takes dense tensors).")
        qb, kb, vb = query, key, value  # type: ignore[assignment]  # each a VarlenBatch (checked above)
    if kb.seqlens != vb.seqlens:
        raise _fail(f"Expected key and value to have the same sequence lengths, but got {list(kb.seqlens)[:8]} and "
                    f"{list(vb.seqlens)[:8]} instead.")
    if qb.batch_size != kb.batch_size:
        raise _fail(f"Expected query and key batches with the same number of sequences, but got {qb.batch_size} "
                    f"and {kb.batch_size} instead.")
    out = varlen_attention_packed(qb.values, kb.values, vb.values, qb.cu_seqlens, kb.cu_seqlens, qb.max_seqlen,
                                  kb.max_seqlen, causal=causal, scale=scale, dropout_p=dropout_p, policy=policy,
                                  seqlens_q=qb.seqlens, seqlens_k=kb.seqlens, window=window, softcap=softcap,
                                  sinks=sinks)
    result = qb.with_values(out)
    return result.to_nested() if any(kinds) else result


def varlen_attention_packed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool | str = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    policy: Any = None,
    seqlens_q: Sequence[int] | None = None,
    seqlens_k: Sequence[int] | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`varlen_attention` on raw packed tensors, flash-attn's ``flash_attn_varlen_func`` layout.

    Args:
        query: ``(T_q, Hq, D)``; key ``(T_k, Hkv, D)``; value ``(T_k, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: ``(n + 1,)`` int32/int64 offsets with a leading 0.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        causal, scale, dropout_p, policy: as :func:`varlen_attention`.
        seqlens_q, seqlens_k: the lengths as Python ints, if known (saves a device sync per call).
        window, softcap, sinks: as :func:`varlen_attention` (the window aligned bottom-right per sequence, like
            ``window_size`` of flash-attn's ``flash_attn_varlen_func``; sinks ``(Hq,)``).

    Returns:
        ``(T_q, Hq, Dv)``.
    """
    from . import _varlen

    return _varlen.run(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       causal=causal, scale=scale, dropout_p=dropout_p, policy=policy,
                       seqlens_q=seqlens_q, seqlens_k=seqlens_k, window=window, softcap=softcap, sinks=sinks)


def explain_varlen(
    query: VarlenBatch,
    key: VarlenBatch,
    value: VarlenBatch,
    *,
    causal: bool | str = False,
    dropout_p: float = 0.0,
    policy: Any = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> Any:
    """The :class:`~sdpa_flash._varlen.VarlenPlan` :func:`varlen_attention` would follow: which path
    (grouped dense calls, the flash varlen kernel, or a hybrid), the groups, the estimated cost of each
    candidate path, and why the others were not chosen (a packed kernel that takes no window, softcap or sinks
    says so). Takes :func:`varlen_attention`'s arguments (the same checks and errors); runs nothing."""
    from . import _varlen

    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, VarlenBatch):
            raise _fail(f"Expected {name} to be a VarlenBatch, but got {type(t).__name__} instead.")
    return _varlen.explain(query.values, key.values, value.values, query.seqlens, key.seqlens,
                           causal=causal, dropout_p=dropout_p, policy=policy, window=window, softcap=softcap,
                           sinks=sinks)
