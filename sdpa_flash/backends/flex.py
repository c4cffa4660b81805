"""``flex``: PyTorch's FlexAttention (``torch.nn.attention.flex_attention``), compiled with Triton: the kernel for
what SDPA's fused kernels cannot express — a logit softcap, a window where torch's flash kernel cannot run it (float32,
head dims it lacks), and, in :mod:`sdpa_flash.compat`, ALiBi, per-row key ranges and packed documents.

What it runs, as data (:class:`FlexBackend`'s :class:`~sdpa_flash.backends.Requirements`): a CUDA GPU of compute
capability >= 8.0 with Triton; float16/bfloat16/float32; head dims 16..256; GQA read in place; causal aligned to the
bottom-right corner, windows (bottom-right) and softcap in the kernel; no dropout, no ``attn_mask``, no sinks; a
backward not documented to be deterministic. Not the CPU: there FlexAttention has no backward, compiles a C++
kernel per configuration and gave wrong outputs for some ragged shapes (Sq=24, Sk=40 among them, torch 2.13).
In ``auto`` it stands just before the math reference in every ranking (after every fused SDPA kernel and
FlashAttention-4): on an H200 it ran plain causal at 0.68-0.71x of cuDNN, but windows at 4-6x and softcap far
above the paths that materialise scores (``shared/BASELINE.md``, ``probe/h200_flex.py``), and ``tune`` does not
time it (each class would compile it afresh).

Compilation (eager calls): one ``torch.compile(flex_attention, dynamic=None, fullgraph=True)`` per *structure* of
call (which score and mask terms exist, GQA, whether the log-sum-exp is returned), each over its own code object
so that their dynamo caches (and recompile limits) are separate. Every value that varies between calls — the
softcap, the ALiBi slopes, the window sides, the query/key offset, per-row key ranges, document ids — is a captured
tensor, so new values never recompile; a second shape switches that entry to a dynamic-shape graph (dynamo's
automatic dynamic shapes) instead of compiling once per shape. Block masks of dense calls are cached per (Sq, Sk,
window, causal, device); varlen document masks are built per call. Inside a user's ``torch.compile`` the call is
traced as it is (block mask and all) into their graph. No torch global flag is changed; nothing here imports
FlexAttention until a call needs it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch

from ..spec import AttentionSpec, dtype_name
from ._base import Backend, Device, KernelCall, KernelFn, Requirements

__all__ = ["REQUIREMENTS", "FlexBackend", "Terms", "flex_run", "not_supported_reasons"]

REQUIREMENTS: dict[str, Any] = {
    "min_cc": (8, 0),
    "dtypes": (torch.float16, torch.bfloat16, torch.float32),
    "min_head_dim": 16,
    "max_head_dim": 256,
}
_BLOCK_MASK_CACHE_SIZE = 64


class Terms(Protocol):
    """The score terms and window of one call, as :func:`flex_run` reads them (``sdpa_flash.compat``'s
    ``Features`` is one): window sides ``left`` / ``right`` around the bottom-right diagonal, ``-1`` when unbounded
    (causal folded into ``right = 0``), and ``softcap`` (``0.0`` when off)."""

    @property
    def left(self) -> int: ...
    @property
    def right(self) -> int: ...
    @property
    def softcap(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class _Terms:
    left: int = -1
    right: int = -1
    softcap: float = 0.0


class FlexBackend(Backend):
    name = "flex"
    DIRECT_LABEL = "torch.nn.attention.flex_attention"
    ROUTE_REASON = ("FlexAttention is called directly, compiled once per call structure (window, softcap, GQA), "
                    "with the window as a block mask: no O(Sq*Sk) tensor, no global flags change")
    TUNED = False  # chosen for what the fused SDPA kernels cannot run; timing it per class would compile it afresh
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {
        "cuda": Requirements(
            dtypes=frozenset(REQUIREMENTS["dtypes"]),
            min_cc=REQUIREMENTS["min_cc"],
            max_head_dim=REQUIREMENTS["max_head_dim"],
            mask=False,
            dropout=False,
            native_gqa=True,
            kernel_causal="bottom_right",
            window=True,
            softcap=True,
            deterministic_backward=False,  # not documented as deterministic, and not established here
        ),
    }

    def missing_reason(self, device: torch.device) -> str | None:
        why = super().missing_reason(device)
        if why is None and device.type == "cuda":
            cc = torch.cuda.get_device_capability(device)
            found = environment_reasons("cuda", cc)
            why = found[0] if found else None
        return why

    def extra_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        lo = REQUIREMENTS["min_head_dim"]
        small = min(spec.head_dim, spec.head_dim_v)
        return [f"head_dim={small} (supported: >= {lo})"] if small < lo else []

    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        return _traced_call if traced else _eager_call


def _terms(c: KernelCall) -> _Terms:
    left, right = c.window if c.window is not None else (None, None)
    if c.causal:  # the kernel's own corner (bottom-right), the same diagonal as the window's
        right = 0 if right is None else min(right, 0)
    return _Terms(-1 if left is None else left, -1 if right is None else right, c.softcap or 0.0)


def _eager_call(c: KernelCall) -> torch.Tensor:
    return flex_run(c.q, c.k, c.v, _terms(c), c.scale, None, want_lse=False)[0]


def _traced_call(c: KernelCall) -> torch.Tensor:
    """Inside a user's ``torch.compile``: FlexAttention and its block mask traced into their graph (plain Python
    numbers, no caches: the graph holds them)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = _terms(c)
    sq, sk = c.q.shape[-2], c.k.shape[-2]
    # the eager path's score and mask functions, over Python numbers instead of cached device scalars
    score_mod, mask_mod = _dense_mods(t, sk - sq, max(t.left, 0), max(t.right, 0), t.softcap or None, None)
    k, v = _decode_gqa(c.q, c.k, c.v)
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, sq, sk, device=c.q.device)
    out = flex_attention(c.q, k, v, score_mod=score_mod, block_mask=block_mask, scale=c.scale,
                         enable_gqa=k.shape[1] != c.q.shape[1])
    return out


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


def not_supported_reasons(spec: Any, caps: Device) -> list[str]:
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


def _window_ok(d: Any, feats: Terms, left_t: torch.Tensor | int, right_t: torch.Tensor | int) -> Any:
    ok = None
    if feats.right >= 0:
        ok = d >= -right_t
    if feats.left >= 0:
        ok = (d <= left_t) if ok is None else ok & (d <= left_t)
    return ok


def _needs_window_mask(feats: Terms) -> bool:
    return feats.left >= 0 or feats.right >= 0


def _dense_mods(feats: Terms, off_t: torch.Tensor | int, left_t: torch.Tensor | int, right_t: torch.Tensor | int,
                cap_t: torch.Tensor | float | None, slopes: torch.Tensor | None) -> tuple[Any, Any]:
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


def _ranges_mods(feats: Terms, q_eff: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
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


def _docs_mods(feats: Terms, q_doc: torch.Tensor, q_eff: torch.Tensor, k_doc: torch.Tensor,
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


def _dense_block_mask(mask_mod: Any, sq: int, sk: int, feats: Terms, device: torch.device) -> Any:
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
def _decode_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as FlexAttention can read them: its decoding kernel (Sq < 128) needs a power-of-two GQA group, so
    other groups are repeated there (exact)."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and group & (group - 1) and q.shape[-2] < 128:
        return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return k, v


def flex_run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feats: Terms,
    scale: float | None,
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
    k, v = _decode_gqa(q, k, v)
    gqa = k.shape[1] != q.shape[1]
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
