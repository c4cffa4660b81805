"""The presets, and :func:`run`: one preset (or a custom case list) on one device, into a result document."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ._cases import (
    MODES,
    Case,
    curves_cases,
    estimate_seconds,
    flex_cases,
    grid_cases,
    human_seconds,
    memory_cases,
    quick_cases,
    split_parts,
    sweep_cases,
)
from ._dense import Row, run_cases
from ._env import environment, matmul_ceiling
from ._overhead import measure_overhead
from ._paths import select_paths
from ._report import summarize
from ._timing import Settings
from ._varlen import run_varlen, varlen_cases, varlen_unavailable

__all__ = ["PRESETS", "SCHEMA", "Preset", "run"]

SCHEMA = "sdpa_flash.bench/1"
_CORE = ("sdpa", "sdpa[cudnn]", "sdpa[flash]", "sdpa[efficient]", "sdpa[math]", "attention(auto)")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named benchmark.

    Attributes:
        name: the CLI name.
        kind: ``"dense"``, ``"overhead"``, ``"varlen"`` or ``"results"`` (several sections).
        description: one line for ``--list`` and the results page.
        cases: the case list for a device type (dense presets).
        paths: default path selection (names or globs, see ``--paths``).
        modes: default modes.
        settings: measurement overrides for this preset.
    """

    name: str
    kind: str
    description: str
    cases: Callable[[str], list[Case]] | None = None
    paths: tuple[str, ...] = ("*",)
    modes: tuple[str, ...] = MODES
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("quick", "dense", "every path on three small shapes (one GQA); < 1 minute on a CPU, the CI smoke test",
           quick_cases, ("*",)),
    Preset("grid", "dense", "the BASELINE grid (B·S = 16,384 tokens, H·D = 2,048, bf16): every path, forward, "
                            "backward and forward+backward", grid_cases, ("*", "-attention(chunked)")),
    Preset("sweep", "dense", "80 configurations: S 128-65,536, D 16-128, bf16 and fp32, causal; SDPA's backends, "
                             "its default and attention(auto) (run in parts: --part 1/3)", sweep_cases, _CORE,
           ("fwd", "fwdbwd")),
    Preset("curves", "dense", "TFLOP/s against S for the plots: bf16, D 64 and 128, causal and not, S 512-32,768",
           curves_cases, _CORE, ("fwd", "fwdbwd")),
    Preset("memory", "dense", "peak memory to S = 131,072 (B=1, H=16, D=128, bf16, causal): O(N) kernels against "
                              "math's O(N²) until it no longer fits", memory_cases,
           ("sdpa[cudnn]", "sdpa[flash]", "sdpa[efficient]", "sdpa[math]", "attention(auto)", "attention(chunked)",
            "naive"), ("fwd", "fwdbwd"), {"rounds": 5, "budget_s": 0.5, "max_call_s": 3.0}),
    Preset("flex", "dense", "FlexAttention (compiled once per shape) beside SDPA on three grid shapes", flex_cases,
           ("flex", "sdpa", "sdpa[cudnn]", "sdpa[flash]", "attention(auto)"), ("fwd", "fwdbwd")),
    Preset("varlen", "varlen", "variable-length batches: sdpa_flash.varlen against per-sequence calls, padding + "
                               "mask, nested tensors and the flash varlen op (useful TFLOP/s)",
           modes=("fwd", "fwdbwd")),
    Preset("overhead", "overhead", "host microseconds per call at a tiny shape: raw SDPA, the aten op, "
                                   "sdpa_kernel + SDPA, attention()"),
    Preset("results", "results", "the results page: matmul ceiling, grid, overhead, curves, memory, flex, varlen "
                                 "(each section with a share of --time-cap), then JSON, CSV, plots and Markdown"),
)}

# (section preset, share of the time cap, path selection override) for the results preset
_RESULTS_SECTIONS: tuple[tuple[str, float, tuple[str, ...] | None], ...] = (
    ("grid", 0.38, ("*", "-attention(chunked)", "-flex")),
    ("overhead", 0.02, None),
    ("curves", 0.25, None),
    ("memory", 0.18, None),
    ("flex", 0.12, None),
    ("varlen", 0.05, None),
)
RESULTS_TIME_CAP = {"cuda": 450.0, "cpu": 240.0}


class _Progress:
    def __init__(self, name: str, cases: Sequence[Case], paths: Sequence[str], modes: Sequence[str],
                 settings: Settings, device_type: str, enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self.cost = [estimate_seconds(c, paths, modes, rounds=settings.rounds, budget_s=settings.budget_s,
                                      device_type=device_type, max_call_s=settings.max_call_s) for c in cases]
        self.t0 = time.monotonic()
        self.started = 0.0

    def __call__(self, i: int, n: int, case: Case, now: float, rows: list[Row] | None) -> None:
        if not self.enabled:
            return
        if rows is None:
            self.started = now
            print(f"[{self.name} {i + 1}/{n}] {case.label} ...", file=sys.stderr, flush=True)
            return
        done = sum(self.cost[: i + 1])
        left = sum(self.cost[i + 1:])
        eta = (now - self.t0) / done * left if done > 0 else 0.0
        ok = sum(r["status"] == "ok" for r in rows)
        auto = next((r for r in rows if r["path"] == "attention(auto)" and r["status"] == "ok"
                     and r["mode"] in ("fwdbwd", "fwd")), None)
        msg = f"    {now - self.started:.1f} s, {ok}/{len(rows)} rows measured"
        if auto:
            msg += f"; attention(auto) {auto['mode']} {auto['tflops']:.3g} TFLOP/s ({auto['backend']})"
        msg += f"; elapsed {human_seconds(now - self.t0)}, ETA {human_seconds(eta)}"
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _dynamo_limits(enabled: bool) -> Iterator[None]:
    """FlexAttention compiles once per shape: lift dynamo's recompile limits for the run, restore them after."""
    if not enabled:
        yield
        return
    import torch._dynamo

    cfg = torch._dynamo.config
    names = [n for n in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit") if hasattr(cfg, n)]
    saved = {n: getattr(cfg, n) for n in names}
    try:
        for n in names:
            setattr(cfg, n, max(saved[n], 1024))
        yield
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)


def _filter(cases: list[Case], *, dtypes: Sequence[str] | None, causal: str | None, seqs: Sequence[int] | None,
            head_dims: Sequence[int] | None) -> list[Case]:
    out = [c for c in cases if (not dtypes or c.dtype in dtypes) and (not seqs or c.seqlen in seqs)
           and (not head_dims or c.head_dim in head_dims)]
    if causal in ("yes", "no"):
        out = [c for c in out if c.causal == (causal == "yes")]
    return out


def dense_plan(preset: Preset, device_type: str, *, cases: list[Case] | None = None,
               paths: str | Sequence[str] | None = None, modes: Sequence[str] | None = None,
               dtypes: Sequence[str] | None = None, causal: str | None = None, seqs: Sequence[int] | None = None,
               head_dims: Sequence[int] | None = None, part: tuple[int, int] | None = None,
               max_cases: int | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """What a dense preset will run: cases (filtered, this part only), paths, modes, and the estimate."""
    settings = settings or Settings.for_device(device_type, **preset.settings)
    if cases is None:
        if preset.cases is None:
            raise ValueError(f"Expected a dense preset, but got {preset.name!r} instead.")
        cases = _filter(preset.cases(device_type), dtypes=dtypes, causal=causal, seqs=seqs, head_dims=head_dims)
    selected, explicit = select_paths(paths, preset.paths)
    names = [p.name for p in selected]
    use_modes = list(modes or preset.modes)
    cost = {c: estimate_seconds(c, names, use_modes, rounds=settings.rounds, budget_s=settings.budget_s,
                                device_type=device_type, max_call_s=settings.max_call_s) for c in cases}
    all_cases = list(cases)
    if part is not None:
        cases = split_parts(cases, part[0], part[1], cost)
    if max_cases is not None:
        cases = cases[:max_cases]
    return {"cases": cases, "all_cases": all_cases, "paths": selected, "explicit": frozenset(explicit),
            "modes": use_modes, "settings": settings, "estimate_s": sum(cost[c] for c in cases),
            "estimate_by_case": {c.label: cost[c] for c in cases}}


def _dense_section(name: str, preset: Preset, device: torch.device, plan: dict[str, Any], deadline: float | None,
                   progress: bool, matmul: float | None) -> dict[str, Any]:
    t0 = time.monotonic()
    prog = _Progress(name, plan["cases"], [p.name for p in plan["paths"]], plan["modes"], plan["settings"],
                     device.type, progress)
    with _dynamo_limits(any(p.name == "flex" for p in plan["paths"])):
        rows, skipped = run_cases(plan["cases"], plan["paths"], plan["modes"], device, plan["settings"],
                                  explicit=plan["explicit"], deadline=deadline, progress=prog)
    return {"name": name, "kind": "dense", "description": preset.description, "rows": rows, "skipped": skipped,
            "paths": [p.name for p in plan["paths"]], "modes": plan["modes"],
            "settings": dataclasses.asdict(plan["settings"]), "elapsed_s": round(time.monotonic() - t0, 1),
            "estimate_s": round(plan["estimate_s"], 1), "summary": summarize(rows, matmul)}


def _overhead_section(device: torch.device, *, rounds: int | None, calls: int | None, causal: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    sec: dict[str, Any] = {"name": "overhead", "kind": "overhead",
                           "description": PRESETS["overhead"].description}
    try:
        sec.update(measure_overhead(device, rounds=rounds or 15, calls=calls or 2000, causal=causal))
    except Exception as exc:  # reported in the section, so the rest of a results run survives
        sec["error"] = f"{type(exc).__name__}: {exc}"
    sec["elapsed_s"] = round(time.monotonic() - t0, 1)
    return sec


def _varlen_section(device: torch.device, settings: Settings, modes: Sequence[str], causal: bool,
                    deadline: float | None, progress: bool) -> dict[str, Any]:
    t0 = time.monotonic()
    sec: dict[str, Any] = {"name": "varlen", "kind": "varlen", "description": PRESETS["varlen"].description}
    why = varlen_unavailable()
    if why:
        sec["unavailable"] = why
        if progress:
            print(f"[varlen] unavailable: {why}", file=sys.stderr, flush=True)
        return sec
    if progress:
        print("[varlen] running ...", file=sys.stderr, flush=True)
    sec["rows"] = run_varlen(varlen_cases(device.type, causal=causal), modes, device, settings, deadline=deadline)
    sec["elapsed_s"] = round(time.monotonic() - t0, 1)
    return sec


def run(
    preset: str | None = None,
    *,
    device: str | torch.device | None = None,
    cases: Sequence[Case] | None = None,
    paths: str | Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    causal: str | None = None,
    seqs: Sequence[int] | None = None,
    head_dims: Sequence[int] | None = None,
    part: tuple[int, int] | None = None,
    time_cap: float | None = None,
    max_cases: int | None = None,
    settings: dict[str, Any] | None = None,
    calls: int | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a preset (or ``cases``) and return the result document (what ``--json`` writes).

    Args:
        preset: a name in :data:`PRESETS`; ``None`` means ``"custom"`` when ``cases`` are given, else ``"grid"``
            on CUDA and ``"quick"`` on the CPU.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``; default: CUDA when available.
        cases: custom dense cases (then ``preset`` is ``"custom"``).
        paths: path names, globs or ``+name``/``-name`` edits of the preset's selection.
        modes: among ``"fwd"``, ``"bwd"``, ``"fwdbwd"``.
        dtypes, causal, seqs, head_dims: keep only the preset's cases that match (``causal``: ``"yes"``/``"no"``).
        part: ``(i, n)``: run the i-th of n parts of equal estimated cost (dense presets).
        time_cap: seconds; cases not started by then are listed as skipped (``results``: the whole run).
        max_cases: run only the first cases.
        settings: overrides of :class:`Settings` fields (``rounds``, ``sample_ms``, ...).
        calls: calls per sample in the overhead preset.
        threads: torch's intra-op threads during the run (restored after); default on the CPU: 1, because
            thread wake-ups and oversubscription on a shared machine make multi-threaded timings of small
            problems erratic (10x swings); on CUDA: unchanged.
        progress: print progress to stderr.

    Returns:
        ``{"schema", "preset", "meta" (environment, matmul ceiling), "sections": [...], "elapsed_s"}``; each dense
        section has ``rows`` (one per case, path and mode: ``status`` ``"ok"`` with timings or ``"n/a"`` with a
        ``reason``), ``skipped`` and ``summary``.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if preset is None:
        preset = "custom" if cases else ("grid" if dev.type == "cuda" else "quick")
    saved_threads = torch.get_num_threads()
    if threads or dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        return _run(preset, dev, cases=cases, paths=paths, modes=modes, dtypes=dtypes, causal=causal, seqs=seqs,
                    head_dims=head_dims, part=part, time_cap=time_cap, max_cases=max_cases, settings=settings,
                    calls=calls, progress=progress)
    finally:
        torch.set_num_threads(saved_threads)


def _run(preset: str, dev: torch.device, *, cases: Sequence[Case] | None, paths: str | Sequence[str] | None,
         modes: Sequence[str] | None, dtypes: Sequence[str] | None, causal: str | None, seqs: Sequence[int] | None,
         head_dims: Sequence[int] | None, part: tuple[int, int] | None, time_cap: float | None,
         max_cases: int | None, settings: dict[str, Any] | None, calls: int | None, progress: bool) -> dict[str, Any]:
    if preset != "custom" and preset not in PRESETS:
        raise ValueError(f"Expected a preset among {', '.join(PRESETS)}, but got {preset!r} instead.")
    overrides = dict(settings or {})
    t0 = time.monotonic()
    meta = environment(dev)
    doc: dict[str, Any] = {"schema": SCHEMA, "preset": preset, "meta": meta, "sections": []}
    causal_flag = causal == "yes"
    if preset == "custom" or PRESETS[preset].kind == "dense":
        pre = (Preset("custom", "dense", "custom shapes from the command line", paths=("*", "-attention(chunked)"))
               if preset == "custom" else PRESETS[preset])
        st = Settings.for_device(dev.type, **{**pre.settings, **overrides})
        plan = dense_plan(pre, dev.type, cases=list(cases) if cases else None, paths=paths, modes=modes,
                          dtypes=dtypes, causal=causal, seqs=seqs, head_dims=head_dims, part=part,
                          max_cases=max_cases, settings=st)
        if not plan["cases"]:
            raise ValueError(f"Expected at least one case, but the {preset!r} preset and the filters left none.")
        deadline = t0 + time_cap if time_cap else None
        meta["matmul"] = matmul_ceiling(dev, Settings.for_device(dev.type, budget_s=0.5))
        sec = _dense_section(preset, pre, dev, plan, deadline, progress, meta["matmul"].get("tflops"))
        if part:
            sec["part"] = f"{part[0]}/{part[1]}"
            sec["part_of"] = len(plan["all_cases"])
        doc["sections"].append(sec)
    elif preset == "overhead":
        doc["sections"].append(_overhead_section(dev, rounds=overrides.get("rounds"), calls=calls,
                                                 causal=causal_flag))
    elif preset == "varlen":
        st = Settings.for_device(dev.type, **overrides)
        deadline = t0 + time_cap if time_cap else None
        doc["sections"].append(_varlen_section(dev, st, modes or PRESETS["varlen"].modes, causal_flag, deadline,
                                               progress))
    else:  # results
        cap = time_cap if time_cap is not None else RESULTS_TIME_CAP.get(dev.type, 240.0)
        meta["time_cap_s"] = cap
        meta["matmul"] = matmul_ceiling(dev, Settings.for_device(dev.type, budget_s=0.5))
        carry = 0.0
        for name, share, path_sel in _RESULTS_SECTIONS:
            start = time.monotonic()
            budget = cap * share + carry
            deadline = start + budget
            pre = PRESETS[name]
            if pre.kind == "overhead":
                sec = _overhead_section(dev, rounds=None, calls=None if dev.type == "cuda" else 1000, causal=False)
            elif pre.kind == "varlen":
                sec = _varlen_section(dev, Settings.for_device(dev.type, **overrides), pre.modes, False, deadline,
                                      progress)
            else:
                st = Settings.for_device(dev.type, **{**pre.settings, **overrides})
                plan = dense_plan(pre, dev.type, paths=path_sel, modes=modes, settings=st)
                if progress:
                    print(f"[results] section {name}: {len(plan['cases'])} cases, budget {budget:.0f} s "
                          f"(estimate {plan['estimate_s']:.0f} s on an H200)", file=sys.stderr, flush=True)
                sec = _dense_section(name, pre, dev, plan, deadline, progress, meta["matmul"].get("tflops"))
            sec["budget_s"] = round(budget, 1)
            doc["sections"].append(sec)
            carry = max(0.0, deadline - time.monotonic())
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    return doc
