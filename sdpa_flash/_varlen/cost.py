"""The varlen engine's cost model: how long a path takes, as data per device type (:data:`COST_MODELS`)."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["COST_MODELS", "CostModel", "visible_pairs", "window_span"]


@dataclasses.dataclass(frozen=True)
class CostModel:
    """How long a path takes, roughly: data per device type, calibrated by ``benchmarks/varlen_probe.py``.

    Times are microseconds; rates TFLOP/s. A dense call of padded lengths ``(Lq, Lk)`` runs at
    ``rate * L / (L + half_len)`` with ``L = min(Lq, Lk)`` (and at most a window's span); forward+backward uses the
    ``*_bwd`` figures. Work is counted in visible (query, key) pairs (:func:`visible_pairs`): the kernels skip the
    blocks a causal mask or a sliding window hides.

    Attributes:
        call_us / call_us_bwd: fixed cost of one group (gather, kernel launch, select), fwd / fwd+bwd.
        rate / rate_bwd: the dense kernel's saturated rate.
        half_len / half_len_bwd: the length at which it reaches half of that rate.
        varlen_call_us / varlen_call_us_bwd: fixed cost of the flash varlen call.
        varlen_rate / varlen_rate_bwd: the flash varlen kernel's rate.
        varlen_kernels: the same four figures (call, call with backward, rate, rate with backward) for other
            backends' packed kernels, by backend name.
        causal_bwd_factor: the dense kernel's causal forward+backward rate as a share of ``rate_bwd`` when
            it runs one group per call (measured far below the dense causal rate).
        coordinate_penalty / coordinate_penalty_bwd: extra cost factor of the extra head-dim coordinate beyond
            its FLOPs (kernels are tuned for head dims 64/128/256: D + 8 leaves the fast path).
        padding: how a non-causal group with padding keys is made exact: ``"coordinate"`` or ``"mask"``.
        contiguous_groups: copy each group's inputs to contiguous (b, H, L, D) before the dense call (the
            grid's layout) instead of passing (b, L, H, D) strides.
        streams: side streams the groups are spread over (CUDA; 0 = the current stream only).
        max_group_span: the most sequences the dynamic programme considers for one group.
    """

    call_us: float
    call_us_bwd: float
    rate: float
    rate_bwd: float
    half_len: float
    half_len_bwd: float
    varlen_call_us: float = math.inf
    varlen_call_us_bwd: float = math.inf
    varlen_rate: float = 1.0
    varlen_rate_bwd: float = 1.0
    coordinate_penalty: float = 1.0
    coordinate_penalty_bwd: float = 1.0
    causal_bwd_factor: float = 1.0
    contiguous_groups: bool = False
    padding: str = "coordinate"
    streams: int = 0
    max_group_span: int = 64
    varlen_kernels: tuple[tuple[str, float, float, float, float], ...] = ()

    def dense_us(self, b: int, heads: int, lq: int, lk: int, d: int, dv: int, causal: bool, bwd: bool,
                 pairs: float, span: float = math.inf) -> float:
        """``b`` sequences padded to ``(lq, lk)`` in one call, ``pairs`` (query, key) pairs visible in each
        (:func:`visible_pairs`), ``span`` the most keys a window lets one query see (:func:`window_span`)."""
        flops = 2.0 * b * heads * pairs * (d + dv) * (3.5 if bwd else 1.0)
        length = min(lq, lk, span)
        rate, half = (self.rate_bwd, self.half_len_bwd) if bwd else (self.rate, self.half_len)
        if bwd and causal:
            rate *= self.causal_bwd_factor
        return (self.call_us_bwd if bwd else self.call_us) + flops / (rate * length / (length + half)) / 1e6

    def varlen_us(self, pairs: float, heads: int, d: int, dv: int, bwd: bool, backend: str = "flash") -> float:
        """``pairs`` = the visible (query, key) pairs summed over the sequences (:func:`visible_pairs`);
        ``backend``: whose packed kernel runs them."""
        flops = 2.0 * heads * pairs * (d + dv) * (3.5 if bwd else 1.0)
        call, call_bwd, rate, rate_bwd = self.varlen_call_us, self.varlen_call_us_bwd, self.varlen_rate, \
            self.varlen_rate_bwd
        for name, *figures in self.varlen_kernels:
            if name == backend:
                call, call_bwd, rate, rate_bwd = figures
        return (call_bwd if bwd else call) + flops / (rate_bwd if bwd else rate) / 1e6


def visible_pairs(lq: int, lk: int, causal: str | None, window: tuple[int | None, int | None] | None) -> int:
    """How many (query, key) pairs of one sequence are visible: ``lq * lk`` for plain attention, about half of it
    causal, about ``lq * (left + right + 1)`` with a sliding window. Query i's own position is key ``i + lk - lq``
    (bottom-right), or key i for ``causal="top_left"``; ``window`` is ``(left, right)`` around it, ``None`` per side
    unbounded (:data:`~sdpa_flash.spec.Window`), and causal caps the right side at 0."""
    left, right = window if window is not None else (None, None)
    if causal is not None:
        right = 0
    diag = 0 if causal == "top_left" else lk - lq
    # query i sees keys [i + diag - left, i + diag + right] clipped to [0, lk): the count of keys below the upper end
    # minus those below the lower one, each a clamped ramp over i
    below_hi = lq * lk if right is None else _clamped_ramp(diag + right + 1, lq, lk)
    below_lo = 0 if left is None else _clamped_ramp(diag - left, lq, lk)
    return below_hi - below_lo


def window_span(causal: str | None, window: tuple[int | None, int | None] | None) -> float:
    """The most keys a window lets one query see (``left + right + 1``; causal caps ``right`` at 0); ``inf``
    without a bound on both sides."""
    left, right = window if window is not None else (None, None)
    if causal is not None:
        right = 0
    return math.inf if left is None or right is None else left + right + 1


def _clamped_ramp(start: int, n: int, top: int) -> int:
    """``sum(min(max(start + i, 0), top) for i in range(n))`` in closed form."""
    end = start + n - 1
    lo, hi = max(start, 0), min(end, top)
    ramp = (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0
    return ramp + top * max(0, end - max(start, top + 1) + 1)


COST_MODELS: dict[str, CostModel] = {
    # H200, torch 2.11, cuDNN 9.19 (shared/BASELINE.md): dense cuDNN 510 / 609 / 615 TFLOP/s forward at
    # S = 512 / 4k / 16k and 372 / 526 / 558 forward+backward; flash varlen 340 forward, 298 forward+backward.
    # cuDNN at head dim 136 (the masking coordinate on 128) took 1.58x / 2.27x the time of 128 (fwd / fwd+bwd,
    # 4x16x4096, benchmarks/varlen_probe.py, 2026-12-03) for 1.06x the FLOPs. Side streams: no consistent gain
    # on the BASELINE batches (the same probe: 0.75x to 1.2x of one stream across batches and modes), so off.
    # Causal groups, forward+backward: 186-236 useful TFLOP/s against 253-274 for flash varlen.
    "cuda": CostModel(call_us=30.0, call_us_bwd=90.0, rate=620.0, rate_bwd=570.0, half_len=110.0,
                      half_len_bwd=270.0, varlen_call_us=40.0, varlen_call_us_bwd=120.0, varlen_rate=340.0,
                      varlen_rate_bwd=298.0, coordinate_penalty=1.5, coordinate_penalty_bwd=2.1,
                      causal_bwd_factor=0.55, padding="coordinate", streams=0,
                      # FA4's flash_attn_varlen_func on the BASELINE ragged batches: 589-598 / 538-548 useful
                      # TFLOP/s non-causal, 503-513 / 459-464 causal (fwd / fwd+bwd); ~75 / ~170 us per call of
                      # Python dispatch (flash-attention#2426).
                      varlen_kernels=(("fa4", 75.0, 170.0, 560.0, 500.0),)),
    # CPU: the flash kernel runs near its rate from small lengths; a call costs ~30 us of Python and dispatch.
    "cpu": CostModel(call_us=40.0, call_us_bwd=120.0, rate=0.05, rate_bwd=0.04, half_len=8.0, half_len_bwd=8.0,
                     padding="mask"),
}
"""Cost models by ``"device_type:arch"`` (``"cuda:sm90"``) or, for every other architecture, by device type. The
``"cuda"`` figures were measured on an H200 (sm90); other GPUs use them as an estimate until a model of their own
is added under their architecture (the plan's reasons name the model that decided)."""
_FALLBACK_MODEL = COST_MODELS["cpu"]


def cost_model(device_type: str, arch: str = "") -> tuple[str, CostModel]:
    """The cost model for a device and its key: ``"cuda:sm90"`` if there is one, else ``"cuda"``, else the CPU's."""
    for key in (f"{device_type}:{arch}", device_type):
        if key in COST_MODELS:
            return key, COST_MODELS[key]
    return "cpu", _FALLBACK_MODEL
