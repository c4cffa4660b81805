"""flash-attn 2.8's attention functions, argument for argument, over sdpa_flash's paths.

Each public function is ``execute(_prepare_<name>(...))``: preparing validates every argument (typed errors naming
it), builds the :class:`~sdpa_flash.compat.CompatSpec` and plans the path; executing runs it.
:func:`explain_flash_attn` runs only the first half.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .. import _caches
from ..policy import get_policy
from . import _common as c
from ._call import BSHD, Call, describe, execute
from ._common import Features
from ._plan import CompatPlan, CompatSpec, forced_path
from ._run import plan_for, run_dense, run_varlen

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]



def _options(dropout_p: Any, softmax_scale: Any, causal: Any, window_size: Any, softcap: Any, deterministic: Any,
             return_attn_probs: Any, head_dim: int) -> tuple[float, float, bool, tuple[int, int], float, bool, bool]:
    return (c.check_dropout(dropout_p), c.check_scale(softmax_scale, head_dim), c.check_bool("causal", causal),
            c.check_window(window_size), c.check_softcap(softcap), c.check_bool("deterministic", deterministic),
            c.check_bool("return_attn_probs", return_attn_probs))


def _deterministic(flag: bool, grad: bool) -> bool:
    return flag and grad and not torch.are_deterministic_algorithms_enabled()


# ------------------------------------------------------------------------------------------------- dense
@dataclasses.dataclass(frozen=True)
class _Dense:
    """What a dense call's validation decided: reused for every call with the same key (see :func:`_dense_key`)."""

    plan: CompatPlan
    feats: Features
    scale: float
    dropout_p: float
    probs: bool


_dense_cache: dict[Any, _Dense] = {}
_caches.register("compat.dense", _dense_cache.clear)
_CACHE_LIMIT = 4096
_any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _dense_key(q: Any, k: Any, v: Any, dropout_p: Any, softmax_scale: Any, causal: Any, window_size: Any,
               softcap: Any, alibi_slopes: Any, deterministic: Any, return_attn_probs: Any) -> Any:
    """Everything a dense decision depends on, or ``None`` (not cacheable: autocast, unhashable arguments)."""
    try:
        if _any_autocast() or type(window_size) is not tuple or not all(type(w) is int for w in window_size):
            return None  # a window of tensors / NumPy integers: validated (and converted) on every call
        alibi = None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.dtype, alibi_slopes.device)
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi, deterministic, return_attn_probs,
               torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
               forced_path(), get_policy(), torch.are_deterministic_algorithms_enabled(),
               type(q), type(k), type(v))
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _decide_dense(q: Any, k: Any, v: Any, dropout_p: Any, softmax_scale: Any, causal: Any, window_size: Any,
                  softcap: Any, alibi_slopes: Any, deterministic: Any, return_attn_probs: Any
                  ) -> tuple[_Dense, tuple[torch.Tensor, ...]]:
    c.check_tensor("q", q, 4, BSHD)
    c.check_tensor("k", k, 4, "(batch_size, seqlen_k, nheads_k, headdim)")
    c.check_tensor("v", v, 4, "(batch_size, seqlen_k, nheads_k, headdim)")
    c.check_same(q, k, v)
    b, sq, hq, d = q.shape
    bk, sk, hk, dk = k.shape
    bv, sv, hv, dv = v.shape
    if not (b == bk == bv):
        raise c.fail(f"Expected q, k and v to have one batch size, but got {b}, {bk}, {bv} instead.")
    if sk != sv:
        raise c.fail(f"Expected k and v to have the same seqlen, but got {sk} and {sv} instead.")
    c.check_heads(hq, hk, hv, d, dk, dv)
    p, scale, causal, window, cap, det, probs = _options(dropout_p, softmax_scale, causal, window_size, softcap,
                                                         deterministic, return_attn_probs, d)
    alibi = c.check_alibi(alibi_slopes, b, hq, q.device)
    feats = c.features(causal, window, cap, alibi, sk)
    q, k, v = c.autocast_inputs(q, k, v)
    grad = c.needs_grad(q, k, v)
    spec = CompatSpec("dense", q.device.type, q.dtype, b, hq, hk, sq, sk, d, dv, feats, p > 0, grad,
                      _deterministic(det, grad), probs, probs and p > 0)
    return _Dense(plan_for(spec, q.device), feats, scale, p, probs), (q, k, v)


def _run_dense_call(dec: _Dense, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None,
                    alibi_slopes: torch.Tensor | None) -> Any:
    slopes = None if alibi_slopes is None else c.slopes_2d(alibi_slopes, q.shape[0])
    out, lse, pr = run_dense(dec.plan, q, k, v, dec.feats, dec.scale, softmax_scale, slopes, dec.dropout_p,
                             dec.probs, dec.probs)
    if not dec.probs:
        return out
    return out, lse, (pr if pr is not None else _empty_probs(q))


def _prepare_dense(q: Any, k: Any, v: Any, dropout_p: Any, softmax_scale: Any, causal: Any, window_size: Any,
                   softcap: Any, alibi_slopes: Any, deterministic: Any, return_attn_probs: Any) -> Call:
    dec, (q, k, v) = _decide_dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                   deterministic, return_attn_probs)
    return Call(dec.plan, lambda: _run_dense_call(dec, q, k, v, softmax_scale, alibi_slopes))


def _dense(q: Any, k: Any, v: Any, dropout_p: Any, softmax_scale: Any, causal: Any, window_size: Any,
           softcap: Any, alibi_slopes: Any, deterministic: Any, return_attn_probs: Any) -> Any:
    """The per-call path of the dense functions: a dictionary hit runs the stored decision; a miss validates."""
    args = (q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs)
    key = _dense_key(*args)
    dec = None if key is None else _dense_cache.get(key)
    if dec is None:
        dec, (q, k, v) = _decide_dense(*args)
        if key is not None:
            if len(_dense_cache) >= _CACHE_LIMIT:
                _dense_cache.clear()
            _dense_cache[key] = dec
    return _run_dense_call(dec, q, k, v, softmax_scale, alibi_slopes)


def _empty_probs(q: torch.Tensor) -> torch.Tensor:
    """flash-attn 2.8 returns an empty S_dmask when dropout_p == 0."""
    return torch.empty((0,), dtype=q.dtype, device=q.device)


def _split(name: str, packed: Any, ndim: int, n: int, doc: str) -> tuple[torch.Tensor, ...]:
    c.check_tensor(name, packed, ndim, doc)
    axis = ndim - 3
    if packed.shape[axis] != n:
        raise c.fail(f"Expected {name} to have size {n} in dimension {axis} {doc}, but got shape "
                     f"{tuple(packed.shape)} instead.")
    return packed.unbind(axis)


def _prepare_func(q: Any, k: Any, v: Any, dropout_p: Any = 0.0, softmax_scale: Any = None, causal: Any = False,
                  window_size: Any = (-1, -1), softcap: Any = 0.0, alibi_slopes: Any = None,
                  deterministic: Any = False, return_attn_probs: Any = False) -> Call:
    return _prepare_dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                          deterministic, return_attn_probs)


def _prepare_qkvpacked(qkv: Any, dropout_p: Any = 0.0, softmax_scale: Any = None, causal: Any = False,
                       window_size: Any = (-1, -1), softcap: Any = 0.0, alibi_slopes: Any = None,
                       deterministic: Any = False, return_attn_probs: Any = False) -> Call:
    q, k, v = _split("qkv", qkv, 5, 3, "(batch_size, seqlen, 3, nheads, headdim)")
    return _prepare_dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                          deterministic, return_attn_probs)


def _prepare_kvpacked(q: Any, kv: Any, dropout_p: Any = 0.0, softmax_scale: Any = None, causal: Any = False,
                      window_size: Any = (-1, -1), softcap: Any = 0.0, alibi_slopes: Any = None,
                      deterministic: Any = False, return_attn_probs: Any = False) -> Call:
    k, v = _split("kv", kv, 5, 2, "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    return _prepare_dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                          deterministic, return_attn_probs)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Any:
    """flash-attn's ``flash_attn_func``: attention over ``(B, S, H, D)`` tensors, MQA/GQA included.

    Shapes: q ``(B, Sq, Hq, D)``, k ``(B, Sk, Hkv, D)``, v ``(B, Sk, Hkv, Dv)`` with ``Hq % Hkv == 0``
    (query head ``h`` reads key/value head ``h // (Hq / Hkv)``) -> out ``(B, Sq, Hq, Dv)``.

    Args:
        q, k, v: float16/bfloat16 (float32 and float64 too, here), one device. ``Dv != D`` is accepted.
        dropout_p: dropout on the attention probabilities; pass 0.0 at evaluation time.
        softmax_scale: the scale of ``q k^T``; ``None`` means ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask: query ``i`` sees keys ``j <= i + Sk - Sq``. A query row that
            sees no key gives 0 (and a log-sum-exp of ``+inf``).
        window_size: ``(left, right)``; query ``i`` sees keys ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``;
            -1 means unbounded on that side.
        softcap: when > 0, scores become ``softcap * tanh(scores / softcap)`` (after the scale).
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)`` float32; ``-slope * |i + Sk - Sq - j|`` is added to the score.
        deterministic: a deterministic backward (on CUDA the exact path runs when a backward is needed, unless
            ``torch.use_deterministic_algorithms(True)`` is on).
        return_attn_probs: also return ``softmax_lse`` and ``S_dmask`` (testing only, as in flash-attn).

    Returns:
        ``out``, or ``(out, softmax_lse, S_dmask)`` with ``return_attn_probs``: ``softmax_lse`` ``(B, Hq, Sq)``
        float32 (float64 for float64 inputs), the log-sum-exp of each row of the final scores, ``+inf`` where a
        row sees no key; ``S_dmask`` is an empty tensor when ``dropout_p == 0`` (as in flash-attn 2.8), else
        ``(B, Hq, Sq, Sk)``: the probabilities, negated where dropped (computed by the exact path).

    Raises:
        AttentionInputError: an argument is invalid (the message names it).
        BackendUnavailableError: a forced path (:func:`~sdpa_flash.compat.use_path`) or the policy cannot run it.

    Example:
        >>> q = k = v = torch.randn(2, 128, 8, 64)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 128, 8, 64])
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Any:
    """flash-attn's ``flash_attn_qkvpacked_func``: ``qkv (B, S, 3, H, D)`` -> ``out (B, S, H, D)``.

    The arguments and returns are those of :func:`flash_attn_func` (self-attention, ``Sq == Sk``).
    """
    q, k, v = _split("qkv", qkv, 5, 3, "(batch_size, seqlen, 3, nheads, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Any:
    """flash-attn's ``flash_attn_kvpacked_func``: q ``(B, Sq, Hq, D)``, ``kv (B, Sk, 2, Hkv, D)`` -> ``(B, Sq, Hq, D)``.

    The arguments and returns are those of :func:`flash_attn_func`.
    """
    k, v = _split("kv", kv, 5, 2, "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


# ------------------------------------------------------------------------------------------------- varlen
def _check_block_table(k: torch.Tensor, block_table: Any, lk: list[int], nseq: int) -> torch.Tensor:
    """Validate a varlen call's ``block_table`` and return the table to gather with (int64; entries past each
    sequence's keys, which flash-attn never reads, replaced by block 0). The used entries are range-checked against
    the number of blocks (one reduction, one host sync) unless the values cannot be read now
    (:func:`~sdpa_flash.compat._common.index_values_readable`)."""
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise c.fail("Expected block_table to be an int32 tensor (batch_size, max_num_blocks_per_seq), but got "
                     f"{describe(block_table)} instead.")
    if block_table.shape[0] != nseq or block_table.device != k.device:
        raise c.fail(f"Expected block_table of shape ({nseq}, max_num_blocks_per_seq) on {k.device}, but got shape "
                     f"{tuple(block_table.shape)} on {block_table.device} instead.")
    page, blocks = k.shape[1], k.shape[0]
    capacity = block_table.shape[1] * page
    need = []
    for b in range(nseq):
        n = lk[b + 1] - lk[b]
        if n > capacity:
            raise c.fail(f"Expected sequence {b} to fit its block_table row ({capacity} keys), but cu_seqlens_k "
                         f"gives it {n} keys instead.")
        need.append(-(-n // page))
    used = torch.arange(block_table.shape[1], device=k.device) < torch.tensor(need, device=k.device)[:, None]
    table = torch.where(used, block_table.long(), 0)
    if table.numel() and any(need) and c.index_values_readable(k.device):
        lo, hi = torch.stack(torch.aminmax(table)).tolist() if blocks else (0, 0)  # no blocks: every entry is bad
        if lo < 0 or hi >= blocks:
            row, col = ((table < 0) | (table >= blocks)).nonzero()[0].tolist()
            raise c.fail(f"Expected the block_table entries that hold keys (the first ceil(seqlen_k / "
                         f"page_block_size) of each row, page_block_size = {page}) to be block indices in "
                         f"[0, num_blocks) = [0, {blocks}), but got block_table[{row}, {col}] = "
                         f"{int(block_table[row, col])} (min {lo}, max {hi}) instead.")
    return table


def _paged_keys(k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lk: list[int], nseq: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather paged keys ``(num_blocks, page, Hkv, D)`` into packed ``(total_k, Hkv, D)`` (exact, a copy)."""
    page = k.shape[1]
    index = []
    for b in range(nseq):
        pos = torch.arange(lk[b + 1] - lk[b], device=k.device)
        index.append(table[b][pos // page] * page + pos % page)
    flat = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=k.device)
    return k.flatten(0, 1)[flat], v.flatten(0, 1)[flat]


def _prepare_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any,
                    max_seqlen_k: Any, dropout_p: Any = 0.0, softmax_scale: Any = None, causal: Any = False,
                    window_size: Any = (-1, -1), softcap: Any = 0.0, alibi_slopes: Any = None,
                    deterministic: Any = False, return_attn_probs: Any = False, block_table: Any = None,
                    names: tuple[str, str, str] = ("q", "k", "v")) -> Call:
    c.check_tensor(names[0], q, 3, "(total_q, nheads, headdim)")
    paged = block_table is not None
    kdoc = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else "(total_k, nheads_k, headdim)"
    c.check_tensor(names[1], k, 4 if paged else 3, kdoc)
    c.check_tensor(names[2], v, 4 if paged else 3, kdoc)
    c.check_same(q, k, v, ", ".join(names[:2]) + " and " + names[2])
    tq, hq, d = q.shape
    hk, dk, hv, dv = k.shape[-2], k.shape[-1], v.shape[-2], v.shape[-1]
    if k.shape[:-1] != v.shape[:-1]:
        raise c.fail(f"Expected {names[1]} and {names[2]} to agree in every dimension but the head dim, but got "
                     f"{tuple(k.shape)} and {tuple(v.shape)} instead.")
    c.check_heads(hq, hk, hv, d, dk, dv)
    cu_q = c.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    cu_k = c.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_q.numel() != cu_k.numel():
        raise c.fail(f"Expected cu_seqlens_q and cu_seqlens_k to have the same length (batch_size + 1), but got "
                     f"{cu_q.numel()} and {cu_k.numel()} instead.")
    p, scale, causal, window, cap, det, probs = _options(dropout_p, softmax_scale, causal, window_size, softcap,
                                                         deterministic, return_attn_probs, d)
    nseq = cu_q.numel() - 1
    alibi = c.check_alibi(alibi_slopes, nseq, hq, q.device)
    lq, lk = cu_q.tolist(), cu_k.tolist()  # one host sync for both
    max_q = c.check_lengths("cu_seqlens_q", lq, tq, max_seqlen_q, "max_seqlen_q")
    tk = k.shape[0] * k.shape[1] if paged else k.shape[0]
    max_k = c.check_lengths("cu_seqlens_k", lk, 2**62 if paged else tk, max_seqlen_k, "max_seqlen_k")
    table = _check_block_table(k, block_table, lk, nseq) if paged else None
    feats = c.features(causal, window, cap, alibi, max_k)
    q, k, v = c.autocast_inputs(q, k, v)
    grad = c.needs_grad(q, k, v)
    spec = CompatSpec("varlen", q.device.type, q.dtype, nseq, hq, hk, max_q, max_k, d, dv, feats, p > 0, grad,
                      _deterministic(det, grad), probs, probs and p > 0)
    plan = plan_for(spec, q.device)
    slopes = c.slopes_2d(alibi_slopes, nseq)

    def run() -> Any:
        kk, vv = (_paged_keys(k, v, table, lk, nseq) if table is not None else (k, v))
        out, lse, pr = run_varlen(plan, q, kk, vv, cu_q, cu_k, lq, lk, max_q, max_k, feats, scale, softmax_scale,
                                  slopes, p, probs, probs)
        if not probs:
            return out
        return out, lse, (pr if pr is not None else _empty_probs(q))

    return Call(plan, run)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> Any:
    """flash-attn's ``flash_attn_varlen_func``: packed variable-length sequences, each attended on its own.

    Shapes: q ``(total_q, Hq, D)``, k/v ``(total_k, Hkv, D)`` (or, with ``block_table``, paged
    ``(num_blocks, page_block_size, Hkv, D)``) -> out ``(total_q, Hq, Dv)``. ``cu_seqlens_q/k``: int32
    ``(batch_size + 1,)``, leading 0 — lengths ``[2, 3, 2]`` give ``[0, 2, 5, 7]``. Causal masks, windows and
    ALiBi distances use each sequence's own ``Sq``/``Sk`` (bottom-right aligned); window sides
    ``>= max_seqlen_k`` are unbounded, as in flash-attn. ``max_seqlen_q/k`` must cover the longest sequence
    (flash-attn would silently skip rows past them; here it is an error). Rows of q past ``cu_seqlens_q[-1]``
    give 0. ALiBi slopes ``(B, Hq)`` are per sequence.

    Returns:
        ``out``, or ``(out, softmax_lse, S_dmask)`` with ``return_attn_probs``: ``softmax_lse`` is
        ``(Hq, total_q)`` float32 (``+inf`` where a row sees no key); ``S_dmask`` empty when ``dropout_p == 0``,
        else ``(batch_size, Hq, max_seqlen_q, max_seqlen_k)`` (zero past each sequence's lengths).
    """
    return execute(_prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                    softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                    return_attn_probs, block_table))


def _prepare_varlen_qkvpacked(qkv: Any, cu_seqlens: Any, max_seqlen: Any, dropout_p: Any = 0.0,
                              softmax_scale: Any = None, causal: Any = False, window_size: Any = (-1, -1),
                              softcap: Any = 0.0, alibi_slopes: Any = None, deterministic: Any = False,
                              return_attn_probs: Any = False) -> Call:
    q, k, v = _split("qkv", qkv, 4, 3, "(total, 3, nheads, headdim)")
    return _prepare_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None,
                           ("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"))


def _prepare_varlen_kvpacked(q: Any, kv: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any,
                             max_seqlen_k: Any, dropout_p: Any = 0.0, softmax_scale: Any = None, causal: Any = False,
                             window_size: Any = (-1, -1), softcap: Any = 0.0, alibi_slopes: Any = None,
                             deterministic: Any = False, return_attn_probs: Any = False) -> Call:
    k, v = _split("kv", kv, 4, 2, "(total_k, 2, nheads_k, headdim)")
    return _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                           softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs, None, ("q", "kv[:, 0]", "kv[:, 1]"))


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Any:
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: ``qkv (total, 3, H, D)`` -> ``out (total, H, D)``.

    As :func:`flash_attn_varlen_func` with ``cu_seqlens_q = cu_seqlens_k = cu_seqlens``.
    """
    return execute(_prepare_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                              window_size, softcap, alibi_slopes, deterministic, return_attn_probs))


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Any:
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q ``(total_q, Hq, D)``, ``kv (total_k, 2, Hkv, D)``.

    As :func:`flash_attn_varlen_func`.
    """
    return execute(_prepare_varlen_kvpacked(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                             deterministic, return_attn_probs))
