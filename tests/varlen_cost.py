"""Cost models that force the varlen engine down each of its routes (every route must be exact): shared by the
varlen tests (tests/ is on sys.path, as for fa4_fake)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from sdpa_flash import _varlen as engine

HUGE = 1e9


def models(device_type: str) -> dict[str, engine.CostModel]:
    """The engine's cost model for ``device_type``, and variants that force each way of grouping."""
    base = engine.COST_MODELS[device_type]
    return {
        "default": base,
        "per-sequence": dataclasses.replace(base, max_group_span=1),
        "one group, mask padding": dataclasses.replace(base, padding="mask", call_us=HUGE, call_us_bwd=HUGE),
        "one group, coordinate padding": dataclasses.replace(base, padding="coordinate", call_us=HUGE,
                                                             call_us_bwd=HUGE),
        "one group, equal lengths only": dataclasses.replace(base, padding="none", call_us=HUGE, call_us_bwd=HUGE),
    }


def force_packed(device_type: str, kernel: str) -> engine.CostModel:
    """A cost model under which every batch is one packed call by ``kernel``'s packed (cu_seqlens) kernel."""
    return dataclasses.replace(engine.COST_MODELS[device_type], call_us=HUGE, call_us_bwd=HUGE, varlen_call_us=0,
                               varlen_call_us_bwd=0, varlen_rate=HUGE, varlen_rate_bwd=HUGE,
                               varlen_kernels=((kernel, 0.0, 0.0, HUGE, HUGE),))


@contextlib.contextmanager
def cost_model(device_type: str, model: engine.CostModel) -> Iterator[None]:
    """``model`` in force for ``device_type`` inside the block (the engine's plans made afresh on both sides)."""
    saved = engine.COST_MODELS[device_type]
    engine.COST_MODELS[device_type] = model
    engine.clear_caches()
    try:
        yield
    finally:
        engine.COST_MODELS[device_type] = saved
        engine.clear_caches()
