"""flash-attn 2.8's ``flash_attn_with_kvcache``: decode / prefill against a KV cache, appending in place."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from . import _common as c
from ._call import BSHD, Call, describe, execute
from ._plan import CompatSpec
from ._run import plan_for, run_dense, run_ranges

__all__ = ["apply_rotary", "flash_attn_with_kvcache"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the first ``rotary_dim = 2 * cos.shape[-1]`` features of ``x``; the rest pass through.

    Args:
        x: ``(B, S, H, D)``.
        cos, sin: ``(B, S, rotary_dim / 2)``: the rows for each token's position.
        interleaved: rotate pairs ``(0, 1), (2, 3), ...`` (GPT-J) if True, else ``(i, i + rotary_dim / 2)``
            (GPT-NeoX).

    Returns:
        ``x`` rotated, in its dtype (computed in float32, float64 for float64 inputs).
    """
    rd = 2 * cos.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = x[..., :rd].to(acc)
    co, si = cos.to(acc).unsqueeze(2), sin.to(acc).unsqueeze(2)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * co - x2 * si, x1 * si + x2 * co), -1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x1 * co - x2 * si, x1 * si + x2 * co), -1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), -1)


def _int_tensor(name: str, t: Any, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (batch,):
        raise c.fail(f"Expected {name} to be an int32 tensor of shape (batch_size,) = ({batch},), but got "
                     f"{describe(t)} instead.")
    if t.device != device:
        raise c.fail(f"Expected {name} on {device} like q, but got {t.device} instead.")
    return t


def _used_blocks(block_table: torch.Tensor, lens: torch.Tensor | None, keys: int | None, snew: int,
                 page: int) -> torch.Tensor:
    """The block table to gather with, int64: only the entries that hold keys are kept.

    With one length for every row (``keys`` = cache_seqlens + seqlen_new, or None for the whole capacity) that is
    the first ``ceil(keys / page)`` columns; with per-row lengths (``lens``, ``(B,)``) the entries past
    ``ceil((lens[b] + snew) / page)`` in row ``b`` are replaced by block 0. flash-attn never reads those entries
    either, so tables padded with -1 or stale block numbers are accepted. No host sync.
    """
    if lens is None:
        n = block_table.shape[1] if keys is None else min(block_table.shape[1], -(-keys // page))
        return block_table[:, :n].long()
    need = (lens.long() + (snew + page - 1)) // page
    used = torch.arange(block_table.shape[1], device=block_table.device) < need[:, None]
    return torch.where(used, block_table.long(), 0)


def _check_index_ranges(b: int, snew: int, capacity: int, lens: torch.Tensor | None, batch_idx: torch.Tensor | None,
                        cache_rows: int, block_table: torch.Tensor | None, table: torch.Tensor | None,
                        page: int) -> None:
    """Raise :class:`~sdpa_flash.AttentionInputError` for index tensors that would read or write outside the cache.

    ``lens`` (per-row cache_seqlens) must satisfy ``0 <= lens`` and ``lens + snew <= capacity``; ``batch_idx`` must
    lie in ``[0, cache_rows)``; the used entries of ``block_table`` (``table``) in ``[0, cache_rows)`` (the
    number of blocks). One small reduction per tensor (``aminmax``), gathered into one vector and read with one
    host sync; the slow, detailed message is built only when something is wrong.
    """
    checks: list[tuple[str, torch.Tensor]] = []
    if lens is not None and b:
        checks.append(("cache_seqlens", lens))
    if batch_idx is not None and b:
        checks.append(("cache_batch_idx", batch_idx))
    if table is not None and table.numel():
        checks.append(("block_table", table))
    if not checks:
        return
    bounds = torch.cat([torch.stack(torch.aminmax(t)).long() for _, t in checks]).tolist()  # the one host sync
    for i, (name, t) in enumerate(checks):
        lo, hi = bounds[2 * i], bounds[2 * i + 1]
        if name == "cache_seqlens" and (lo < 0 or hi + snew > capacity):
            raise c.fail(f"Expected 0 <= cache_seqlens and cache_seqlens + seqlen_new <= the cache capacity "
                         f"{capacity}, but got cache_seqlens={_values(t)} (min {lo}, max {hi}) with seqlen_new={snew} "
                         "instead.")
        if name == "cache_batch_idx" and (lo < 0 or hi >= cache_rows):
            raise c.fail(f"Expected cache_batch_idx in [0, {cache_rows}) (rows of k_cache), but got "
                         f"{_values(t)} (min {lo}, max {hi}) instead.")
        if name == "block_table" and (lo < 0 or hi >= cache_rows):
            assert block_table is not None
            bad = ((t < 0) | (t >= cache_rows)).nonzero()[0].tolist()
            raise c.fail(f"Expected the block_table entries that hold keys (the first ceil((cache_seqlens + "
                         f"seqlen_new) / page_block_size) of each row, page_block_size = {page}) to be block indices "
                         f"in [0, num_blocks) = [0, {cache_rows}), but got block_table[{bad[0]}, {bad[1]}] = "
                         f"{int(block_table[bad[0], bad[1]])} (min {lo}, max {hi}) instead.")


def _values(t: torch.Tensor) -> str:
    return str(t.tolist()) if t.numel() <= 16 else f"a tensor of {t.numel()} values"


def _prepare_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    cache_seqlens: Any = None,
    cache_batch_idx: Any = None,
    cache_leftpad: Any = None,
    block_table: Any = None,
    softmax_scale: Any = None,
    causal: Any = False,
    window_size: Any = (-1, -1),
    softcap: Any = 0.0,
    rotary_interleaved: Any = True,
    alibi_slopes: Any = None,
    num_splits: Any = 0,
    return_softmax_lse: Any = False,
) -> Call:
    c.check_tensor("q", q, 4, BSHD)
    paged = block_table is not None
    cdoc = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else "(batch_size_cache, seqlen_cache, " \
        "nheads_k, headdim)"
    c.check_tensor("k_cache", k_cache, 4, cdoc)
    c.check_tensor("v_cache", v_cache, 4, cdoc)
    c.check_same(q, k_cache, v_cache, "q, k_cache and v_cache")
    b, sq, hq, d = q.shape
    hk, dk, dv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise c.fail(f"Expected k_cache and v_cache to agree in every dimension but the head dim, but got "
                     f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)} instead.")
    c.check_heads(hq, hk, v_cache.shape[2], d, dk, dv)
    dev = q.device
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != b:
            raise c.fail(f"Expected block_table to be an int32 tensor (batch_size, max_num_blocks_per_seq) with "
                         f"batch_size = {b}, but got {describe(block_table)} instead.")
        if block_table.device != dev:
            raise c.fail(f"Expected block_table on {dev} like q, but got {block_table.device} instead.")
        if cache_batch_idx is not None:
            raise c.UnsupportedArgumentError("cache_batch_idx", "cache_batch_idx cannot be combined with block_table "
                                             "(a paged KV cache), as in flash-attn.")
        if cache_leftpad is not None:
            raise c.UnsupportedArgumentError("cache_leftpad", "cache_leftpad cannot be combined with block_table "
                                             "(a paged KV cache), as in flash-attn.")
        if k_cache.shape[0] == 0 and block_table.numel():
            raise c.fail("Expected k_cache to hold at least one block (num_blocks >= 1) when block_table is given, "
                         f"but got shape {tuple(k_cache.shape)} instead.")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] < b:
            raise c.fail(f"Expected k_cache to hold at least batch_size = {b} rows (or pass cache_batch_idx), but "
                         f"got {k_cache.shape[0]} instead.")
    if (k is None) != (v is None):
        raise c.fail("Expected k and v to be given together (the new keys and values to append), but got only "
                     f"{'k' if v is None else 'v'}.")
    snew = 0
    if k is not None:
        c.check_tensor("k", k, 4, "(batch_size, seqlen_new, nheads_k, headdim)")
        c.check_tensor("v", v, 4, "(batch_size, seqlen_new, nheads_k, headdim)")
        c.check_same(q, k, v, "q, k and v")
        if tuple(k.shape) != (b, k.shape[1], hk, d) or tuple(v.shape) != (b, k.shape[1], hk, dv):
            raise c.fail(f"Expected k of shape ({b}, seqlen_new, {hk}, {d}) and v of shape ({b}, seqlen_new, {hk}, "
                         f"{dv}), but got {tuple(k.shape)} and {tuple(v.shape)} instead.")
        snew = k.shape[1]
    uniform: int | None = None
    if cache_seqlens is None:
        if k is not None:
            raise c.fail("Expected cache_seqlens (where to append k and v in the cache) when k and v are given, but "
                         "got None instead.")
        uniform = capacity
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        uniform = int(cache_seqlens)
        if uniform < 0 or uniform + snew > capacity:
            raise c.fail(f"Expected 0 <= cache_seqlens and cache_seqlens + seqlen_new <= the cache capacity "
                         f"{capacity}, but got cache_seqlens={uniform} with seqlen_new={snew} instead.")
    else:
        _int_tensor("cache_seqlens", cache_seqlens, b, dev)
    if cache_batch_idx is not None:
        _int_tensor("cache_batch_idx", cache_batch_idx, b, dev)
    if cache_leftpad is not None:
        _int_tensor("cache_leftpad", cache_leftpad, b, dev)
        uniform = None
    table = None
    if paged:  # the entries that hold keys; the others (flash-attn never reads them) become block 0
        table = _used_blocks(block_table, cache_seqlens if uniform is None else None,
                             None if uniform is None else uniform + snew, snew, k_cache.shape[1])
    if c.index_values_readable(dev):
        _check_index_ranges(b, snew, capacity, cache_seqlens if uniform is None else None, cache_batch_idx,
                            k_cache.shape[0], block_table, table, k_cache.shape[1])
    if (rotary_cos is None) != (rotary_sin is None):
        raise c.fail("Expected rotary_cos and rotary_sin to be given together, but got only one of them.")
    interleaved = c.check_bool("rotary_interleaved", rotary_interleaved)
    if rotary_cos is not None:
        if k is None:
            raise c.fail("Expected k and v when rotary_cos/rotary_sin are given (rotary embedding applies to the "
                         "new keys), but got k=None.")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise c.fail(f"Expected {name} to be a floating-point tensor (seqlen_ro, rotary_dim / 2), but got "
                             f"{describe(t)} instead.")
            if t.device != dev:
                raise c.fail(f"Expected {name} on {dev} like q, but got {t.device} instead.")
        if rotary_cos.shape != rotary_sin.shape:
            raise c.fail(f"Expected rotary_cos and rotary_sin of one shape, but got {tuple(rotary_cos.shape)} and "
                         f"{tuple(rotary_sin.shape)} instead.")
        if not 0 < 2 * rotary_cos.shape[1] <= d:
            raise c.fail(f"Expected rotary_dim = 2 * rotary_cos.shape[1] in (0, headdim = {d}], but got "
                         f"{2 * rotary_cos.shape[1]} instead.")
        if rotary_cos.shape[0] < capacity:
            raise c.fail(f"Expected rotary_cos/rotary_sin to have at least as many rows as the cache capacity "
                         f"({capacity}), but got {rotary_cos.shape[0]} instead.")
    if not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool) or num_splits < 0:
        raise c.fail(f"Expected num_splits to be an int >= 0, but got {num_splits!r} instead.")
    want_lse = c.check_bool("return_softmax_lse", return_softmax_lse)
    scale = c.check_scale(softmax_scale, d)
    causal = c.check_bool("causal", causal)
    window = c.check_window(window_size)
    cap = c.check_softcap(softcap)
    alibi = c.check_alibi(alibi_slopes, b, hq, dev)
    feats = c.features(causal, window, cap, alibi, capacity)
    seqlen_k = capacity if uniform is None else uniform + snew
    spec = CompatSpec("kvcache", dev.type, q.dtype, b, hq, hk, sq, seqlen_k, d, dv, feats, False, False, False,
                      want_lse, False, uniform is None)
    plan = plan_for(spec, dev)
    slopes = c.slopes_2d(alibi_slopes, b)

    # One length for every row of a contiguous cache (an int cache_seqlens): rotary rows and the append are
    # slices, not gathers and index_put (a handful of small kernels fewer per decode step; same values).
    sliced = uniform is not None and cache_batch_idx is None and not paged and (
        rotary_cos is None or uniform + max(sq, snew) <= rotary_cos.shape[0])

    def rotary_rows(lens: torch.Tensor | None, first: int, n: int, spread: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (b or 1, n, rotary_dim / 2) at positions first + i (``spread``) or first, per row."""
        assert rotary_cos is not None and rotary_sin is not None
        if lens is None:  # sliced: one start for every row
            return tuple(t[None, first:first + n] if spread else t[None, first:first + 1].expand(1, n, t.shape[1])
                         for t in (rotary_cos, rotary_sin))
        pos = lens[:, None] + torch.arange(n, device=dev) if spread else lens[:, None].expand(b, n)
        return rotary_cos[pos], rotary_sin[pos]

    @torch.no_grad()
    def run() -> Any:
        if sliced:
            lens = None
        elif uniform is not None:
            lens = torch.full((b,), uniform, dtype=torch.long, device=dev)
        else:
            lens = cache_seqlens.long()
        first = uniform or 0
        qq, kn = q, k
        if rotary_cos is not None:
            kn = apply_rotary(k, *rotary_rows(lens, first, snew, True), interleaved)
            qq = apply_rotary(q, *rotary_rows(lens, first, sq, bool(feats.causal or feats.window)), interleaved)
        rows = None if cache_batch_idx is None else cache_batch_idx.long()
        if kn is not None and snew:
            if lens is None:
                k_cache[:b, first:first + snew] = kn
                v_cache[:b, first:first + snew] = v
            else:
                pos = lens[:, None] + torch.arange(snew, device=dev)
                if table is not None:
                    page = k_cache.shape[1]
                    blk = table.gather(1, pos // page)
                    index: tuple[torch.Tensor, ...] = (blk, pos % page)
                else:
                    r = torch.arange(b, device=dev) if rows is None else rows
                    index = (r[:, None].expand(b, snew), pos)
                k_cache.index_put_(index, kn)
                v_cache.index_put_(index, v)
        if table is not None:
            kk = k_cache[table].flatten(1, 2)
            vv = v_cache[table].flatten(1, 2)
        elif rows is not None:
            kk, vv = k_cache[rows], v_cache[rows]
        else:
            kk, vv = k_cache[:b], v_cache[:b]
        if uniform is not None:
            n = uniform + snew
            out, lse, _ = run_dense(plan, qq, kk[:, :n], vv[:, :n], feats, scale, softmax_scale, slopes, 0.0,
                                    want_lse, False)
        else:
            assert lens is not None  # uniform is None: lens is cache_seqlens (above)
            start = cache_leftpad.long() if cache_leftpad is not None else torch.zeros_like(lens)
            out, lse = run_ranges(plan, qq, kk, vv, start, lens + snew, feats, scale, softmax_scale, slopes,
                                  want_lse)
        return (out, lse) if want_lse else out

    return Call(plan, run)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> Any:
    """flash-attn's ``flash_attn_with_kvcache``: attention of new queries against a KV cache (no backward).

    If ``k``/``v`` are given they are written into ``k_cache``/``v_cache`` *in place* at positions
    ``cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1`` of cache row ``cache_batch_idx[b]`` (default ``b``),
    after rotary embedding if ``rotary_cos``/``rotary_sin`` are given; attention then runs over the updated cache,
    row ``b`` seeing keys ``cache_leftpad[b] <= j < cache_seqlens[b] + seqlen_new``.

    Shapes:
        q ``(B, Sq, Hq, D)``; k_cache/v_cache ``(B_cache, S_cache, Hkv, D/Dv)``, or with ``block_table``
        ``(B, max_num_blocks_per_seq)`` int32 a paged cache ``(num_blocks, page_block_size, Hkv, D)`` (any page
        size here); k/v ``(B, seqlen_new, Hkv, D/Dv)``; rotary_cos/sin ``(seqlen_ro >= cache capacity,
        rotary_dim / 2)``; cache_seqlens an int or ``(B,)`` int32; cache_batch_idx / cache_leftpad ``(B,)`` int32.

    Args:
        rotary_interleaved: pairs ``(0, 1), (2, 3), ...`` if True, else ``(i, i + rotary_dim / 2)``. The new keys
            are rotated at their cache positions; q at positions ``cache_seqlens + i`` when causal or windowed,
            else all at ``cache_seqlens``.
        causal, window_size, softcap, alibi_slopes, softmax_scale: as :func:`~sdpa_flash.compat.flash_attn_func`,
            with ``Sk = cache_seqlens + seqlen_new - cache_leftpad`` per row.
        num_splits: a performance knob of flash-attn's kernel; the result does not depend on it (ignored).
        return_softmax_lse: also return the log-sum-exp ``(B, Hq, Sq)`` float32 (``+inf`` where a row sees no key).

    Returns:
        ``out (B, Sq, Hq, Dv)``, or ``(out, softmax_lse)``.

    Index tensors are range-checked before anything runs, on every device: ``cache_seqlens`` (``>= 0``, and
    ``cache_seqlens + seqlen_new`` within the cache capacity), ``cache_batch_idx`` (rows of ``k_cache``) and the
    entries of ``block_table`` that hold keys (blocks of ``k_cache``); a bad value raises
    :class:`~sdpa_flash.AttentionInputError` naming the argument, instead of an out-of-bounds gather (a device-side
    assert on CUDA, which ends the process's use of the GPU). The check costs one small reduction per index tensor
    and one host sync per call (see ``docs/flash_attn_compat.md`` for the measured cost). It is skipped while
    ``torch.compile`` traces and while a CUDA graph is being captured (no host sync is possible there); such calls
    must be given valid indices, as flash-attn's are. ``block_table`` entries past a row's keys are never read
    (flash-attn's rule too), so a table padded with ``-1`` is accepted.
    """
    return execute(_prepare_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                     cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_size,
                                     softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse))

