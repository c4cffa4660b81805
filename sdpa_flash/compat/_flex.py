"""The ``flex`` path: PyTorch's FlexAttention for what SDPA's kernels cannot express (windows, softcap, ALiBi).

Requirements (as data, read by :func:`not_supported_reasons`): torch >= 2.5 with
``torch.nn.attention.flex_attention``; a CUDA GPU of compute capability >= 8.0 with Triton; float16/bfloat16/float32;
head dims 16..256 (powers of two before torch 2.6); no dropout. Not the CPU: there FlexAttention compiles a C++
kernel per configuration, has no backward, returns no log-sum-exp, and on torch 2.13 gave wrong outputs for some
ragged shapes (Sq=24, Sk=40 among them; Sq, Sk multiples of 128 were right), so the masked and exact paths run.

Compilation: one ``torch.compile(flex_attention, dynamic=None, fullgraph=True)`` per *structure* of call (which
score and mask terms exist, GQA, whether the log-sum-exp is returned), each over its own code object so that their
dynamo caches (and recompile limits) are separate. Every value that varies between calls — the softcap, the ALiBi
slopes, the window sides, the query/key offset, per-row key ranges, document ids — is a captured tensor, so new
values never recompile; a second shape switches that entry to a dynamic-shape graph (dynamo's automatic dynamic
shapes) instead of compiling once per shape. Block masks of dense calls are cached per (Sq, Sk, window, causal,
device); varlen document masks are built per call. No torch global flag is changed.
"""

from __future__ import annotations

import functools
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..capability import Capabilities
from ..spec import dtype_name
from ._common import Features

__all__ = ["REQUIREMENTS", "flex_run", "not_supported_reasons"]

REQUIREMENTS: dict[str, Any] = {
    "min_cc": (8, 0),
    "dtypes": (torch.float16, torch.bfloat16, torch.float32),
    "min_head_dim": 16,
    "max_head_dim": 256,
}
_BLOCK_MASK_CACHE_SIZE = 64


@functools.cache
def environment_reasons(device_type: str, cc: tuple[int, int] | None) -> tuple[str, ...]:
    """What about this PyTorch and device rules FlexAttention out, whatever the call (probed once)."""
    reasons = []
    try:  # the feature itself, not a version number, decides
        from torch.nn.attention import flex_attention as _  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the build
        return (f"torch.nn.attention.flex_attention cannot be imported in torch {torch.__version__} "
                f"({type(exc).__name__}: {exc})",)
    if device_type == "cuda":
        if torch.version.hip:
            reasons.append("not validated on ROCm builds")
        if cc is not None and cc < REQUIREMENTS["min_cc"]:
            reasons.append(f"requires compute capability >= {REQUIREMENTS['min_cc']}, this GPU has {cc}")
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                reasons.append("needs Triton for torch.compile on CUDA, which is not available")
        except Exception as exc:  # pragma: no cover
            reasons.append(f"cannot check for Triton ({type(exc).__name__})")
    elif device_type == "cpu":
        reasons.append("not used on the CPU: its C++ kernel has no backward and no log-sum-exp, compiles per "
                       "configuration, and returned wrong outputs for some ragged shapes (e.g. Sq=24, Sk=40) on "
                       "torch 2.13; the masked and exact paths are exact there")
    else:
        reasons.append(f"not available on device type {device_type!r} (kernels for: cuda)")
    return tuple(reasons)


def not_supported_reasons(spec: Any, caps: Capabilities) -> list[str]:
    """Every reason the flex path cannot run ``spec`` (a :class:`~sdpa_flash.compat.CompatSpec`) on ``caps``."""
    reasons = list(environment_reasons(caps.device_type, caps.compute_capability))
    if reasons and reasons[0].startswith("torch.nn.attention.flex_attention cannot be imported"):
        return reasons
    if spec.dtype not in REQUIREMENTS["dtypes"]:
        names = ", ".join(dtype_name(d) for d in REQUIREMENTS["dtypes"])
        reasons.append(f"dtype={dtype_name(spec.dtype)} (supported: {names})")
    lo, hi = REQUIREMENTS["min_head_dim"], REQUIREMENTS["max_head_dim"]
    for name, d in (("head_dim", spec.head_dim), ("value head_dim", spec.head_dim_v)):
        if not lo <= d <= hi:
            reasons.append(f"{name}={d} (supported: {lo}..{hi})")
    if spec.dropout:
        reasons.append("dropout_p > 0 is not supported by FlexAttention")
    if spec.deterministic and caps.device_type == "cuda":
        reasons.append("deterministic=True: FlexAttention's backward is not documented to be deterministic")
    return reasons


# ----------------------------------------------------------------------------------------------- compiling
_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}


_FLEX: Any = None  # torch.nn.attention.flex_attention.flex_attention, set on first use
_LSE_KW: dict[str, Any] = {}  # how this torch asks FlexAttention for the log-sum-exp


def _entry(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Any, block_mask: Any, scale: float | None,
           enable_gqa: bool, want_lse: bool) -> Any:
    kwargs = _LSE_KW if want_lse else {}
    return _FLEX(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, **kwargs)


def _load() -> None:
    global _FLEX
    from torch.nn.attention import flex_attention as fa

    if _FLEX is None:
        _LSE_KW.update({"return_aux": fa.AuxRequest(lse=True)} if hasattr(fa, "AuxRequest") else {"return_lse": True})
        _FLEX = fa.flex_attention


def compiled_for(key: tuple[Any, ...]) -> Callable[..., Any]:
    """The compiled FlexAttention for one call structure; a fresh code object per structure (own dynamo cache)."""
    fn = _compiled.get(key)
    if fn is None:
        _load()
        n = len(_compiled)
        code = _entry.__code__.replace(co_name=f"_flex_entry_{n}")
        fresh = types.FunctionType(code, _entry.__globals__, f"_flex_entry_{n}")
        fn = torch.compile(fresh, dynamic=None, fullgraph=True)
        _compiled[key] = fn
    return fn


def compiled_structures() -> tuple[tuple[Any, ...], ...]:
    """The structures compiled so far (for tests and diagnostics)."""
    return tuple(_compiled)


# ----------------------------------------------------------------------------------------------- mods
_scalars: dict[tuple[Any, ...], torch.Tensor] = {}


def _scalar(x: float | int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor captured by the score/mask functions (cached: no host-to-device copy per call)."""
    key = (x, str(device), dtype)
    t = _scalars.get(key)
    if t is None:
        if len(_scalars) > 1024:
            _scalars.clear()
        t = _scalars[key] = torch.tensor(x, device=device, dtype=dtype)
    return t


def _window_ok(d: Any, feats: Features, left_t: torch.Tensor, right_t: torch.Tensor) -> Any:
    ok = None
    if feats.right >= 0:
        ok = d >= -right_t
    if feats.left >= 0:
        ok = (d <= left_t) if ok is None else ok & (d <= left_t)
    return ok


def _needs_window_mask(feats: Features) -> bool:
    return feats.left >= 0 or feats.right >= 0


def _dense_mods(feats: Features, off_t: torch.Tensor, left_t: torch.Tensor, right_t: torch.Tensor,
                cap_t: torch.Tensor | None, slopes: torch.Tensor | None) -> tuple[Any, Any]:
    per_batch = slopes is not None and slopes.shape[0] > 1
    sl = None if slopes is None else (slopes if per_batch else slopes[0])

    def score_mod(s: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if cap_t is not None:
            s = cap_t * torch.tanh(s / cap_t)
        if sl is not None:
            slope = sl[b, h] if per_batch else sl[h]
            s = s - slope * (i + off_t - j).abs()
        return s

    def mask_mod(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _window_ok(i + off_t - j, feats, left_t, right_t)

    return (score_mod if (cap_t is not None or sl is not None) else None), (
        mask_mod if _needs_window_mask(feats) else None)


def _ranges_mods(feats: Features, q_eff: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
                 left_t: torch.Tensor, right_t: torch.Tensor, cap_t: torch.Tensor | None,
                 slopes: torch.Tensor | None) -> Any:
    per_batch = slopes is not None and slopes.shape[0] > 1
    sl = None if slopes is None else (slopes if per_batch else slopes[0])
    neg_inf = float("-inf")

    def score_mod(s: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if cap_t is not None:
            s = cap_t * torch.tanh(s / cap_t)
        d = q_eff[b, i] - k_pos[b, j]
        if sl is not None:
            slope = sl[b, h] if per_batch else sl[h]
            s = s - slope * d.abs()
        ok = k_valid[b, j]
        w = _window_ok(d, feats, left_t, right_t)
        if w is not None:
            ok = ok & w
        return torch.where(ok, s, neg_inf)

    return score_mod


def _docs_mods(feats: Features, q_doc: torch.Tensor, q_eff: torch.Tensor, k_doc: torch.Tensor,
               k_pos: torch.Tensor, left_t: torch.Tensor, right_t: torch.Tensor, cap_t: torch.Tensor | None,
               slopes: torch.Tensor | None) -> tuple[Any, Any]:
    def score_mod(s: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if cap_t is not None:
            s = cap_t * torch.tanh(s / cap_t)
        if slopes is not None:
            s = s - slopes[q_doc[i], h] * (q_eff[i] - k_pos[j]).abs()
        return s

    def mask_mod(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        ok = q_doc[i] == k_doc[j]
        w = _window_ok(q_eff[i] - k_pos[j], feats, left_t, right_t)
        return ok if w is None else ok & w

    return (score_mod if (cap_t is not None or slopes is not None) else None), mask_mod


_block_masks: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def _dense_block_mask(mask_mod: Any, sq: int, sk: int, feats: Features, device: torch.device) -> Any:
    key = (sq, sk, feats.left, feats.right, str(device))
    bm = _block_masks.get(key)
    if bm is None:
        from torch.nn.attention.flex_attention import create_block_mask

        bm = create_block_mask(mask_mod, None, None, sq, sk, device=device)
        _block_masks[key] = bm
        while len(_block_masks) > _BLOCK_MASK_CACHE_SIZE:
            _block_masks.popitem(last=False)
    else:
        _block_masks.move_to_end(key)
    return bm


# ----------------------------------------------------------------------------------------------- running
def flex_run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feats: Features,
    scale: float,
    slopes: torch.Tensor | None,
    *,
    want_lse: bool,
    ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    docs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run FlexAttention on ``(B, H, S, D)`` inputs with flash-attn's score terms and masks.

    Args:
        q, k, v: ``(B, Hq, Sq, D)``, ``(B, Hkv, Sk, D)``, ``(B, Hkv, Sk, Dv)``.
        feats: the call's features (window sides already normalised; causal folded into ``right = 0``).
        scale: the softmax scale.
        slopes: ALiBi slopes ``(1, Hq)`` / ``(B, Hq)`` float32 (``(ndocs, Hq)`` with ``docs``), or ``None``.
        want_lse: return the log-sum-exp ``(B, Hq, Sq)`` (``+inf`` where a row sees no key).
        ranges: ``(q_eff (B, Sq), k_pos (B, Sk), k_valid (B, Sk))`` for per-row key ranges (kvcache); masked
            in the score function, so no block mask is built per call.
        docs: ``(q_doc (Tq,), q_eff (Tq,), k_doc (Tk,), k_pos (Tk,))`` for packed varlen sequences (B = 1): a
            document block mask built for this call.

    Returns:
        ``(out (B, Hq, Sq, Dv), lse or None)``.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    dev = q.device
    sq, sk = q.shape[-2], k.shape[-2]
    hq, hk = q.shape[1], k.shape[1]
    group = hq // hk
    if group > 1 and group & (group - 1) and sq < 128:
        # FlexAttention's decoding kernel (Sq < 128) needs a power-of-two GQA group: repeat K/V (exact).
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    gqa = k.shape[1] != hq
    left_t = _scalar(max(feats.left, 0), dev, torch.int32)
    right_t = _scalar(max(feats.right, 0), dev, torch.int32)
    cap_t = _scalar(feats.softcap, dev, torch.float32) if feats.softcap > 0 else None
    sl = None if slopes is None else slopes.to(device=dev, dtype=torch.float32).contiguous()
    block_mask = None
    if ranges is not None:
        q_eff, k_pos, k_valid = ranges
        score_mod = _ranges_mods(feats, q_eff.to(torch.int32).contiguous(), k_pos.to(torch.int32).contiguous(),
                                 k_valid.contiguous(), left_t, right_t, cap_t, sl)
        mode = "ranges"
    elif docs is not None:
        q_doc, q_eff, k_doc, k_pos = (t.to(torch.int32).contiguous() for t in docs)
        score_mod, mask_mod = _docs_mods(feats, q_doc, q_eff, k_doc, k_pos, left_t, right_t, cap_t, sl)
        block_mask = create_block_mask(mask_mod, None, None, sq, sk, device=dev)
        mode = "docs"
    else:
        off_t = _scalar(sk - sq, dev, torch.int32)
        score_mod, mask_mod = _dense_mods(feats, off_t, left_t, right_t, cap_t, sl)
        if mask_mod is not None:
            block_mask = _dense_block_mask(mask_mod, sq, sk, feats, dev)
        mode = "dense"
    key = (mode, dev.type, cap_t is not None, None if sl is None else sl.shape[0] > 1, feats.left >= 0,
           feats.right >= 0, gqa, want_lse)
    fn = compiled_for(key)
    res = fn(q, k, v, score_mod, block_mask, scale, gqa, want_lse)
    if not want_lse:
        return res, None
    out, aux = res
    lse = aux.lse if hasattr(aux, "lse") else aux
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))
