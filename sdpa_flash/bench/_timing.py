"""Timing: synchronised clocks, input rotation, and the interleaved measurement loop.

Every number the benchmark reports comes from :func:`interleave`: the things compared are warmed up, then timed
in rounds, each in a fresh (seeded) random order, so drift on a shared machine (clocks, neighbours, thermals)
hits them alike and no thing always follows the same neighbour: a fixed rotation (A B C, B C A, ...) keeps each
thing's predecessor fixed, and a fast kernel that always runs right after a slow, power-hungry one inherits its
clocks. Short things also get a few untimed calls just before each sample. One *sample* is a block of
back-to-back calls timed with CUDA events (CPU: ``perf_counter`` after the work is done), long enough to dwarf
the timer's resolution; the calls cycle through copies of the inputs so that short runs are not flattered by a
warm L2 cache. Each thing's result is the median over its samples, with the interquartile range as its spread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["Settings", "Stats", "Timed", "cache_bytes", "cleanup", "interleave", "is_oom", "rotation_count"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """How hard to measure.

    Attributes:
        rounds: interleaved rounds (samples per thing), at most.
        min_rounds: rounds kept even when one call is slower than ``budget_s`` allows.
        sample_ms: a sample repeats the call until it lasts about this long.
        budget_s: time allowed for one thing's samples; slow calls get fewer rounds (not fewer than
            ``min_rounds``).
        warmup_ms: warm-up time per thing (at least two calls).
        max_call_s: a call slower than this is not timed (recorded as n/a: too slow). Calls are already warm
            when this is judged: the correctness check made the first ones.
        settle_ms: untimed calls of the same thing, about this long, just before each of its samples, for things
            much shorter than a sample (so that a fast kernel is not timed at the clocks a slow, power-hungry one
            left behind).
    """

    rounds: int = 15
    min_rounds: int = 3
    sample_ms: float = 2.0
    budget_s: float = 1.5
    warmup_ms: float = 30.0
    max_call_s: float = 15.0
    settle_ms: float = 0.5

    @classmethod
    def for_device(cls, device_type: str, **overrides: Any) -> Settings:
        """Defaults for ``"cuda"`` or the CPU, with ``overrides`` (``None`` values ignored) applied."""
        base = cls() if device_type == "cuda" else cls(rounds=5, sample_ms=3.0, budget_s=0.3, warmup_ms=5.0)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class Stats:
    """The samples of one thing (milliseconds per call) and their summary."""

    samples_ms: tuple[float, ...]
    calls_per_sample: int
    peak_bytes: int | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def q1_ms(self) -> float:
        return _quantile(self.samples_ms, 0.25)

    @property
    def q3_ms(self) -> float:
        return _quantile(self.samples_ms, 0.75)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: ``0.04`` means the middle half of the samples lie within 4%."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclasses.dataclass
class Timed:
    """One thing to time.

    Attributes:
        key: its name in the result.
        fn: ``fn(i)`` makes one call on input copy ``i`` (the caller picks ``i % copies``).
        context: entered around warm-up, the peak-memory call and every sample (e.g. ``sdpa_kernel``,
            ``torch.no_grad``).
    """

    key: Hashable
    fn: Callable[[int], object]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def block_ms(self, fn: Callable[[int], object], first: int, n: int) -> float:
        """Milliseconds per call over ``n`` back-to-back calls ``fn(first) … fn(first + n - 1)``."""
        self.sync()
        if self.cuda:
            self.start.record()
            for i in range(first, first + n):
                fn(i)
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / n
        t = time.perf_counter()
        for i in range(first, first + n):
            fn(i)
        return (time.perf_counter() - t) * 1e3 / n

    def run(self, fn: Callable[[int], object], first: int, n: int) -> None:
        """``n`` untimed calls, waited for."""
        for i in range(first, first + n):
            fn(i)
        self.sync()


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA's, or the CPU allocator's)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and (
        "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower()))


def cleanup(device: torch.device) -> None:
    """Free what can be freed between configurations (and after an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_bytes(fn: Callable[[int], object], i: int, device: torch.device) -> int | None:
    """Peak bytes allocated during one call beyond what was allocated before it (CUDA only; ``None`` elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(i)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return max(0, int(peak))


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that rotation must defeat: the GPU's L2, or the CPU's largest cache (default 32 MiB)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            with contextlib.suppress(OSError, ValueError), open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
                best = max(best, int(text.rstrip("KMG")) * mult)
    return best or 32 * 2**20


def rotation_count(set_bytes: int, cache: int, *, limit_bytes: int = 2**30, most: int = 32) -> int:
    """How many copies of the inputs to cycle through so that a copy has left the cache before its next use:
    enough copies to cover twice the cache, at most ``most`` copies and ``limit_bytes`` in all (at least one)."""
    if set_bytes <= 0:
        return 1
    n = math.ceil(2 * cache / set_bytes) + 1 if set_bytes < 2 * cache else 1
    return max(1, min(n, most, max(1, limit_bytes // set_bytes)))


def interleave(
    items: Sequence[Timed],
    device: torch.device,
    settings: Settings,
    *,
    deadline: float | None = None,
    measure_peak: bool = True,
) -> dict[Hashable, Stats | BaseException]:
    """Warm up, measure each item's peak memory once, then time all items in interleaved rounds.

    Returns:
        For each item's key, its :class:`Stats`, or the exception that stopped it (an error during warm-up or
        timing, or a ``TimeoutError`` when one call exceeds ``settings.max_call_s``).
    """
    clock = _Clock(device)
    out: dict[Hashable, Stats | BaseException] = {}
    plan: list[tuple[Timed, int, int, int]] = []  # item, calls per sample, rounds, untimed calls before a sample
    peaks: dict[Hashable, int | None] = {}
    counter: dict[Hashable, int] = {}
    for item in items:
        try:
            with item.context():
                est = _warm_up(item.fn, clock, settings)
                if est > settings.max_call_s * 1e3:
                    raise TimeoutError(f"one call took {est / 1e3:.1f} s (limit {settings.max_call_s:.0f} s)")
                peak = peak_bytes(item.fn, 0, device) if measure_peak else None
        except Exception as exc:  # recorded as this item's n/a reason; the other items go on
            out[item.key] = exc
            if is_oom(exc):
                cleanup(device)
            continue
        n = max(1, min(10000, math.ceil(settings.sample_ms / max(est, 1e-4))))
        rounds = max(settings.min_rounds, min(settings.rounds, int(settings.budget_s * 1e3 / max(est * n, 1e-6))))
        settle = math.ceil(settings.settle_ms / max(est, 1e-4)) if est * 4 <= settings.sample_ms else 0
        plan.append((item, n, rounds, min(settle, n)))
        peaks[item.key] = peak
        counter[item.key] = 1
    samples: dict[Hashable, list[float]] = {p[0].key: [] for p in plan}
    live = list(plan)
    shuffle = random.Random(0)
    for r in range(max((p[2] for p in plan), default=0)):
        if deadline is not None and r >= settings.min_rounds and time.monotonic() > deadline:
            break
        order = list(live)
        shuffle.shuffle(order)
        for item, n, rounds, settle in order:
            if r >= rounds or item.key in out:
                continue
            try:
                with item.context():
                    if settle:  # untimed: the GPU leaves the state the previous (perhaps much heavier) item left
                        clock.run(item.fn, counter[item.key], settle)
                        counter[item.key] += settle
                    samples[item.key].append(clock.block_ms(item.fn, counter[item.key], n))
                counter[item.key] += n
            except Exception as exc:
                out[item.key] = exc
                if is_oom(exc):
                    cleanup(device)
    for item, n, _, _ in plan:
        if item.key not in out:
            out[item.key] = Stats(tuple(samples[item.key]), n, peaks[item.key])
    return out


def _warm_up(fn: Callable[[int], object], clock: _Clock, settings: Settings) -> float:
    """Call ``fn`` at least twice and for at least ``warmup_ms``; return the fastest call seen (ms)."""
    best = math.inf
    spent = 0.0
    i = 0
    while i < 2 or spent < settings.warmup_ms:
        ms = clock.block_ms(fn, i, 1)
        spent += ms
        best = min(best, ms) if i > 0 else best  # the first call pays for compilation, plans, allocations
        if i == 0 and ms > settings.max_call_s * 1e3:  # the correctness check already paid for compilation
            return ms
        i += 1
        if i >= 1000:
            break
    return best if math.isfinite(best) else spent


@contextlib.contextmanager
def stacked(*factories: Callable[[], contextlib.AbstractContextManager[Any]]) -> Iterator[None]:
    """Enter several context managers, in order."""
    with contextlib.ExitStack() as stack:
        for f in factories:
            stack.enter_context(f())
        yield
