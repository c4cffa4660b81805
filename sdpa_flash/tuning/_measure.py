"""Timing every backend on each class of calls, and the ranking rule each class's measurements give.

Dense classes are timed through the library itself, ``attention(q, k, v, causal=..., policy=[name])`` (forward,
under ``torch.no_grad``) or that and its backward (``torch.autograd.grad``), so what is measured is what ``auto``
then runs; packed classes through each backend's packed kernel (``BACKENDS[name].varlen()``), as the varlen engine
calls it. The loop is the benchmark's (:func:`sdpa_flash.bench._timing.interleave`): every backend warmed up, then
timed in rounds, each round in a fresh seeded order, several calls per sample (CUDA events on a GPU,
``perf_counter`` on a CPU). Where the two fastest come within :data:`CLOSE` of each other, those two are timed
again, on their own, for twice the rounds, and the class is ranked on all their samples: a near tie is where one
noisy round could flip the order. The first call of each backend on each class is timed on its own, before any of
that: it pays for compilation (FlashAttention-4's JIT, cuDNN's plan), and is recorded as ``first_call_s``, never in
a timing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection
from typing import Any

import torch

from .._rules import RankingRule
from ..attention import attention
from ..backends import BACKENDS, ranked
from ..bench._timing import Settings, Stats, Timed, cache_bytes, cleanup, interleave, is_oom, rotation_count
from ..capability import Capabilities
from ..errors import BackendUnavailableError, KernelFailedError
from ..planner import plan, ranking
from ..policy import resolve_policy
from ..spec import dtype_name
from ._grid import ShapeClass

__all__ = ["CLOSE", "measure"]

Row = dict[str, Any]

CLOSE = 0.03
"""Two fastest backends whose medians are this close (relative) are timed again before the class is ranked."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(c: ShapeClass, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Copies of ``(q, k, v[, grad])``, enough that a copy has left the cache before it is used again."""
    shapes: list[tuple[int, ...]]
    if c.entry == "packed":
        tq, tk = sum(c.lengths or ()), sum(c.lengths_k or ())
        shapes = [(tq, c.heads, c.d), (tk, c.kv_heads, c.d), (tk, c.kv_heads, c.dv)]
        grad: tuple[int, ...] = (tq, c.heads, c.dv)
    else:
        shapes = [(c.batch, c.heads, c.sq, c.d), (c.batch, c.kv_heads, c.sk, c.d), (c.batch, c.kv_heads, c.sk, c.dv)]
        grad = (c.batch, c.heads, c.sq, c.dv)
    if c.training:
        shapes.append(grad)
    numel = sum(torch.Size(s).numel() for s in shapes)
    copies = rotation_count(numel * torch.finfo(c.dtype).bits // 8, cache_bytes(device))
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(copies):
        ts = [torch.randn(s, generator=gen).to(device=device, dtype=c.dtype) for s in shapes]
        for t in ts[:3]:
            t.requires_grad_(c.training)
        out.append(tuple(ts))
    return out


def _call(c: ShapeClass, name: str, inputs: list[tuple[torch.Tensor, ...]], device: torch.device
          ) -> Callable[[int], object]:
    """``fn(i)``: one call of ``name`` on input copy ``i % copies``, forward, or forward and backward."""
    n = len(inputs)
    if c.entry == "packed":
        run = BACKENDS[name].varlen()

        def cu(lengths: tuple[int, ...] | None) -> torch.Tensor:
            return torch.tensor([0, *torch.tensor(lengths or ()).cumsum(0).tolist()], dtype=torch.int32,
                                device=device)

        cu_q, cu_k, causal = cu(c.lengths), cu(c.lengths_k), c.causal is not None

        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return run(q, k, v, cu_q, cu_k, c.sq, c.sk, 0.0, causal, None)
    else:
        pol = resolve_policy([name], shadow=0)

        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q, k, v, causal=c.causal or False, policy=pol)

    if not c.training:
        return lambda i: forward(*inputs[i % n][:3])

    def step(i: int) -> object:
        q, k, v, g = inputs[i % n]
        return torch.autograd.grad(forward(q, k, v), (q, k, v), g)

    return step


def _row(c: ShapeClass, name: str, status: str, reason: str | None = None, stats: Stats | None = None,
         first_call_s: float | None = None) -> Row:
    samples = list(stats.samples_ms) if stats is not None else None
    return {"class": c.describe(), "backend": name, "status": status, "reason": reason,
            "shape": [c.batch, c.heads, c.kv_heads, c.sq, c.sk, c.d, c.dv],
            "lengths": list(c.lengths) if c.lengths is not None else None, "dtype": dtype_name(c.dtype),
            "causal": c.causal is not None, "training": c.training, "entry": c.entry,
            "median_ms": stats.median_ms if stats is not None else None,
            "min_ms": min(samples) if samples else None, "max_ms": max(samples) if samples else None,
            "samples_ms": samples, "calls_per_sample": stats.calls_per_sample if stats is not None else None,
            "first_call_s": first_call_s}


def _problem(c: ShapeClass, name: str, exc: BaseException, first_call_s: float | None = None) -> Row:
    """A backend that did not give a timing: out of memory or too slow (refused: the shape, not the kernel), or
    an exception (failed: recorded as a reason the planner gives for not running it on this class)."""
    if isinstance(exc, KernelFailedError) and exc.__cause__ is not None:
        exc = exc.__cause__  # the kernel's own error (the single-backend policy of the timing re-raised it)
    if is_oom(exc):
        return _row(c, name, "refused", f"out of memory at {c.shape_text()}", first_call_s=first_call_s)
    if isinstance(exc, TimeoutError):
        return _row(c, name, "refused", f"not timed: {exc}", first_call_s=first_call_s)
    message = " ".join(str(exc).split())
    message = message if len(message) <= 300 else message[:297] + "..."
    return _row(c, name, "failed", f"{type(exc).__name__}: {message}" if message else type(exc).__name__,
                first_call_s=first_call_s)


def measure_class(c: ShapeClass, caps: Capabilities, device: torch.device, settings: Settings,
                  backends: Collection[str] | None = None) -> list[Row]:
    """One row per registered backend that is tuned (:attr:`~sdpa_flash.backends.Backend.TUNED`), or per one of
    ``backends``: measured, refused (the planner's reasons, or the shape did not fit) or failed (it raised)."""
    spec = c.spec(caps.device_type)
    rows: list[Row] = []
    runnable = []
    for name in [n for n, b in BACKENDS.items() if (b.TUNED if backends is None else n in backends)]:
        try:
            plan(spec, caps, resolve_policy([name], shadow=0), entry=c.entry)
        except BackendUnavailableError as exc:
            rows.append(_row(c, name, "refused", "; ".join(exc.reasons.get(name, ())) or str(exc)))
        else:
            runnable.append(name)
    if not runnable:
        return rows
    inputs = _inputs(c, device)
    items, first = [], {}
    for name in runnable:
        context = torch.enable_grad if c.training else torch.no_grad
        fn = _call(c, name, inputs, device)
        try:
            with context():
                _sync(device)
                start = time.perf_counter()
                fn(0)
                _sync(device)
            first[name] = time.perf_counter() - start
        except Exception as exc:  # recorded as this backend's reason on this class; the others go on
            rows.append(_problem(c, name, exc))
            cleanup(device)
            continue
        items.append(Timed(name, fn, context))
    results = interleave(items, device, settings, measure_peak=False)
    _refine_close(results, items, device, settings)
    for key, result in results.items():
        name = str(key)
        if isinstance(result, Stats):
            rows.append(_row(c, name, "measured", stats=result, first_call_s=first[name]))
        else:
            rows.append(_problem(c, name, result, first[name]))
    del inputs, items
    cleanup(device)
    return sorted(rows, key=lambda r: list(BACKENDS).index(r["backend"]))


def _refine_close(results: dict[Any, Stats | BaseException], items: list[Timed], device: torch.device,
                  settings: Settings) -> None:
    """Where the two fastest medians are within :data:`CLOSE`, time those two again (twice the rounds, interleaved,
    on their own) and give each all of its samples, in place. A backend that fails the second time keeps its first
    samples."""
    stats = {k: r for k, r in results.items() if isinstance(r, Stats)}
    top = sorted(stats, key=lambda k: stats[k].median_ms)[:2]
    if len(top) < 2 or stats[top[1]].median_ms > stats[top[0]].median_ms * (1 + CLOSE):
        return
    again = interleave([i for i in items if i.key in top], device,
                       dataclasses.replace(settings, rounds=2 * settings.rounds, min_rounds=2 * settings.min_rounds),
                       measure_peak=False)
    for key, result in again.items():
        if isinstance(result, Stats):
            results[key] = Stats(stats[key].samples_ms + result.samples_ms, stats[key].calls_per_sample)


def derive_rule(c: ShapeClass, rows: list[Row], caps: Capabilities, date: str
                ) -> tuple[RankingRule, dict[str, str]] | None:
    """The class's rule: the measured backends by median time, fastest first, fused kernels before the others
    (``auto`` promises an O(N)-memory kernel wherever one runs); then the rest in the built-in order. ``None`` when
    no backend was measured."""
    measured = sorted((r for r in rows if r["status"] == "measured"), key=lambda r: r["median_ms"])
    if not measured:
        return None
    by_speed = [r["backend"] for r in measured]
    first = [n for n in by_speed if BACKENDS[n].fused] + [n for n in by_speed if not BACKENDS[n].fused]
    builtin = ranked(ranking(caps, c.spec(caps.device_type), entry=c.entry).order, caps.device_type)
    # (a backend tune leaves out keeps its own place: the planner puts it there in every order, this one too)
    order = tuple(first + [n for n in builtin if n not in first and BACKENDS[n].TUNED])
    failed = {r["backend"]: r["reason"] for r in rows if r["status"] == "failed"}
    refused = {r["backend"]: r["reason"] for r in rows if r["status"] != "measured"}
    evidence = f"tuned {date}: " + ", ".join(f"{r['backend']} {r['median_ms']:.3g} ms" for r in measured)
    evidence += f" at {c.shape_text()}"
    if len(measured) > 1 and measured[1]["median_ms"] <= measured[0]["median_ms"] * (1 + CLOSE):
        a, b = measured[0], measured[1]
        evidence += (f"; {a['backend']} and {b['backend']} within {100 * (b['median_ms'] / a['median_ms'] - 1):.1f}%"
                     f" over {len(a['samples_ms'])} and {len(b['samples_ms'])} rounds")
    if first != by_speed:
        evidence += "; fused kernels ranked before the others"
    if failed:
        evidence += "; failed: " + ", ".join(f"{n} ({why.split(':')[0]})" for n, why in failed.items())
    return c.rule(caps, order, evidence, failed), refused


def summary(c: ShapeClass, rows: list[Row]) -> str:
    """Progress for one class: each measured backend's median time (and its first call), then the backends not
    measured, grouped by reason."""
    timed = sorted((r for r in rows if r["status"] == "measured"), key=lambda r: r["median_ms"])
    line = f"{c.describe()} at {c.shape_text()}: "
    line += ", ".join(f"{r['backend']} {r['median_ms']:.3g} ms (first call {r['first_call_s']:.2f} s)"
                      for r in timed) or "skipped, no backend can run it here"
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] != "measured":
            by_reason.setdefault(f"{r['status']}: {r['reason']}", []).append(r["backend"])
    return "\n".join([line, *(f"    {', '.join(names)} {why}" for why, names in by_reason.items())])


def measure(classes: list[ShapeClass], caps: Capabilities, device: torch.device, *, rounds: int, date: str,
            progress: Callable[[str], None] | None = None
            ) -> tuple[list[RankingRule], list[dict[str, str]], list[Row]]:
    """Measure every class (with no tuned table in force); the rules, their refused backends and every row."""
    from ._table import suspended

    settings = Settings.for_device(device.type, rounds=rounds, min_rounds=rounds)
    rules, refused, rows = [], [], []
    with suspended():
        for i, c in enumerate(classes, 1):
            got = measure_class(c, caps, device, settings)
            rows += got
            derived = derive_rule(c, got, caps, date)
            if derived is not None:
                rules.append(derived[0])
                refused.append(derived[1])
            if progress is not None:
                progress(f"[{i}/{len(classes)}] {summary(c, got)}")
    return rules, refused, rows
