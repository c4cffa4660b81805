"""Shadow checking: 1 in N calls of each backend also runs the math reference on a sample and compares.

Opt-in: ``Policy(shadow=N)``, ``use_policy(..., shadow=N)`` or ``SDPA_FLASH_SHADOW=N`` (with
``SDPA_FLASH_SHADOW_ACTION=warn|raise|record``). :func:`sdpa_flash.attention` then wraps the runner of each
cache entry (built once per kind of call) in :func:`wrap`; with shadowing off the runner is left as it is, so the
fast path pays nothing. The count is per backend, across shapes: a batch whose shapes change every step (ragged
batches on the varlen path make a new kind of call per group) is still checked 1 call in N, not on the first
call of every new shape.

What a check does, under ``torch.no_grad()`` on detached tensors (autograd never sees it):

* the sample: up to :data:`PAIRS` (batch, query head) pairs and :data:`ROWS` query rows, drawn afresh for every
  check, with every key/value row of the matching key/value head — so its cost is
  ``PAIRS * ROWS * Sk * (D + Dv)`` multiply-adds, about ``8 / (B * H * Sq)`` of the call's own, plus one host
  synchronisation to read the verdict;
* the reference: softmax over the keys each sampled row can see (causal corner, ``attn_mask``), in float32
  (float64 for float64 inputs), on the very tensors the backend read;
* the verdict, per element of the sampled output rows::

      |out - ref| <= (FLOOR_UNITS + K + 1) * (eps * M + eps_ref * sqrt(n) * Ms)

  with ``M = P|V|``, ``Ms = (P o (|S| + rowsum(P o |S|)))|V|`` (``|S|`` the scores evaluated with absolute values),
  ``n = max(Sk, D, Dv)``, ``eps`` the output dtype's machine epsilon and ``eps_ref`` the reference's. This is
  the floor of :mod:`sdpa_flash.testing` (``FLOOR_UNITS`` units of the algorithm's first-order error bound, which
  no correct kernel exceeds) widened instead of running two more references: ``K`` more units stand in for
  ``K`` times the same-dtype math error (which is the rounding of its float32 result, ``<= eps * |out| <= eps *
  M``), and one unit for the float32 reference's own rounding. It is loose by design — a shadow check is there
  to catch a kernel that is wrong (a stale or misread input, a mask or scale not applied), whose errors are of
  the size of ``|V|``, not to grade ulps; the test-suite keeps the exact rule.

Non-finite values: the reference gives every row what it can see and nothing else. A NaN/inf in the output
where the reference is finite is a mismatch when the sampled inputs are finite; when they are not, a kernel may
spread a NaN/inf to rows of the same (batch, head) that cannot see it (PyTorch's math backend does), which is
allowed. A finite output where the reference is not (a non-finite input masked away) is always a mismatch.
"""

from __future__ import annotations

import math
import random
import sys
import warnings
from collections.abc import Callable, Iterator

import torch

from . import _caches
from . import stats as _stats
from ._tolerance import FLOOR_UNITS, K
from .errors import ShadowMismatchError
from .spec import AttentionSpec

__all__ = ["PAIRS", "ROWS", "check", "tick", "wrap"]

PAIRS = 2
"""(batch, query head) pairs per check."""
ROWS = 4
"""Query rows per pair."""

_PACKAGE_DIR = __file__.rsplit("/", 1)[0].rsplit("\\", 1)[0]


def wrap(run: Callable[..., torch.Tensor], spec: AttentionSpec, backend: str, every: int,
         action: str) -> Callable[..., torch.Tensor]:
    """``run`` (a (B, H, S, D) runner) checked 1 call in ``every`` of this backend's (any shape), the first
    call included."""
    inputs = spec.describe()

    def run_shadowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                     dropout_p: float, scale: float | None) -> torch.Tensor:
        out = run(q, k, v, attn_mask, dropout_p, scale)
        seed = tick(backend, every)
        if seed is not None:
            check(q, k, v, attn_mask, scale, out, spec, backend, inputs, action, seed=seed)
        return out

    return run_shadowed


def tick(backend: str, every: int) -> int | None:
    """Count one call of ``backend``; the check's seed when this call is one to check (1 in ``every``, the first
    included, never while ``torch.compile`` traces), else ``None``. Shared by every shape and by the varlen
    engine's own kernel calls, so that each backend is checked 1 call in ``every`` overall."""
    key = (backend, every)
    counter = _counters.get(key)
    if counter is None:
        counter = _counters.setdefault(key, iter(range(sys.maxsize)))
    n = next(counter)
    return n // every if n % every == 0 and not _compiling() else None


_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)
_counters: dict[tuple[str, int], Iterator[int]] = {}  # (backend, N) -> calls so far (next() is atomic)
_caches.register("shadow.counters", _counters.clear)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None,
          out: torch.Tensor, spec: AttentionSpec, backend: str, inputs: str, action: str, *, seed: int = 0) -> bool:
    """Compare ``out`` with the reference on a sample (see the module docstring); record, and warn or raise.

    Returns:
        ``True`` when the sample is within tolerance.
    """
    with torch.no_grad():
        error, bound, where = _compare(q.detach(), k.detach(), v.detach(), attn_mask, scale, out.detach(), spec, seed)
    first = _stats.record_shadow(backend, inputs, error, bound, where)
    if not error > bound:
        return True
    message = (f"sdpa_flash shadow check: the {backend} backend's output differs from the float32 math reference "
               f"by {error:.3g} (tolerance {bound:.3g}) at (b, h, row, col) = {where} for {inputs}. "
               "sdpa_flash.stats().shadow has every mismatch; policy=\"math\" avoids the backend.")
    if action == "raise":
        raise ShadowMismatchError(message, backend=backend, inputs=inputs, error=error, bound=bound)
    if action == "warn" and first:
        frame, level = sys._getframe(1), 2
        while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, UserWarning, stacklevel=level)
    return False


def _compare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None,
             out: torch.Tensor, spec: AttentionSpec, seed: int) -> tuple[float, float, tuple[int, ...]]:
    """(largest error, its bound, where) over the sample drawn from ``seed``."""
    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if not (b and hq and sq and sk):
        return 0.0, 0.0, ()
    rnd = random.Random(seed)
    flat = rnd.sample(range(b * hq), min(PAIRS, b * hq))
    rows_l = sorted(rnd.sample(range(sq), min(ROWS, sq)))
    dev = q.device
    bi = torch.tensor([f // hq for f in flat], device=dev)
    hi = torch.tensor([f % hq for f in flat], device=dev)
    rows = torch.tensor(rows_l, device=dev)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qs = q[bi[:, None], hi[:, None], rows[None, :]].to(acc)  # (P, R, D)
    kv_head = hi // (hq // hk)
    ks, vs = k[bi, kv_head].to(acc), v[bi, kv_head].to(acc)  # (P, Sk, D), (P, Sk, Dv)
    cand = out[bi[:, None], hi[:, None], rows[None, :]].to(acc)  # (P, R, Dv)
    s_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    scores = (qs @ ks.transpose(-1, -2)) * s_scale
    bad_v = torch.isfinite(vs).logical_not()
    finite_in = torch.isfinite(scores).all() & bad_v.any().logical_not()
    s_abs = (qs.abs() @ ks.abs().transpose(-1, -2)) * abs(s_scale)
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=dev)
    if attn_mask is not None:
        m = attn_mask.detach().expand(b, hq, sq, sk)[bi[:, None], hi[:, None], rows[None, :]]
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            m = m.to(acc)
            allowed = allowed & (m != float("-inf"))
            finite_bias = m.masked_fill(~allowed, 0.0)
            scores, s_abs = scores + finite_bias, s_abs + finite_bias.abs()
    kind = spec.effective_causal
    if kind is not None:
        offset = 0 if kind == "top_left" else sk - sq
        allowed = allowed & (torch.arange(sk, device=dev)[None, :] <= rows[:, None] + offset)
    hidden = allowed.logical_not()
    seen = allowed.any(-1, keepdim=True)
    # Rows that see no key give 0; a hidden key's score is -inf whatever it computed to (NaN included).
    p = torch.softmax(scores.masked_fill(hidden, float("-inf")).masked_fill(~seen, 0.0), dim=-1)
    p = p.masked_fill(hidden, 0.0)
    # P @ V over the visible keys only, so that a hidden key's NaN/inf value does not reach the row (0 * inf is
    # NaN); a visible non-finite value makes the element non-finite (NaN stands for NaN and +-inf alike).
    ref = p @ vs.masked_fill(bad_v, 0.0)
    ref = ref.masked_fill((allowed.to(acc) @ bad_v.to(acc)) > 0, float("nan"))
    p_abs = p.nan_to_num(0.0)
    s_abs = s_abs.masked_fill(hidden, 0.0).nan_to_num(0.0, posinf=0.0)
    vabs = vs.abs().masked_fill(bad_v, 0.0)
    mag = p_abs @ vabs
    smag = (p_abs * (s_abs + (p_abs * s_abs).sum(-1, keepdim=True))) @ vabs
    eps, eps_ref = torch.finfo(out.dtype).eps, torch.finfo(acc).eps
    bound = (FLOOR_UNITS + K + 1) * (eps * mag + eps_ref * math.sqrt(max(sk, d, dv)) * smag)
    c_fin, r_fin = torch.isfinite(cand), torch.isfinite(ref)
    err = torch.where(c_fin & r_fin, (cand - ref).abs(), 0.0)
    err = err.masked_fill(r_fin.logical_not() & c_fin, float("inf"))  # a non-finite input masked away
    err = err.masked_fill(c_fin.logical_not() & r_fin & finite_in, float("inf"))  # NaN/inf out of finite inputs
    use = torch.where(err == 0, 0.0, err / bound).reshape(-1)
    worst_t = use.argmax()
    error, bound_at, flat_worst = torch.stack(  # the one host synchronisation of a check
        [err.reshape(-1)[worst_t], bound.reshape(-1)[worst_t], worst_t.to(acc)]).tolist()
    pair, rest = divmod(int(flat_worst), len(rows_l) * dv)
    row, col = divmod(rest, dv)
    return float(error), float(bound_at), (flat[pair] // hq, flat[pair] % hq, rows_l[row], col)

