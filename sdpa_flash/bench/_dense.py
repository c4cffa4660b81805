"""Dense attention, one case at a time: inputs, the reference check, then every path timed side by side."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._cases import Case
from ._check import make_reference
from ._paths import Built, PathDef, Unavailable, build, first_line
from ._timing import Settings, Stats, Timed, cache_bytes, cleanup, interleave, is_oom, rotation_count, stacked

__all__ = ["run_case", "run_cases"]

Row = dict[str, Any]
_QUADRATIC = ("math", "naive")  # backends whose retained forward graph holds (B, H, S, S) tensors


def _inputs(case: Case, device: torch.device, copies: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    qs, kvs = (case.batch, case.heads, case.seqlen, case.head_dim), (case.batch, case.hkv, case.seqlen, case.head_dim)
    sets: list[tuple[torch.Tensor, ...]] = []
    for _ in range(copies):
        q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dt).requires_grad_() for s in (qs, kvs, kvs))
        do = torch.randn(qs, generator=gen, device=device, dtype=dt)
        sets.append((q, k, v, do))
    return sets


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _reason(exc: BaseException, built: Built | None, what: str) -> str:
    if is_oom(exc):
        return f"out of memory ({what}): {first_line(exc, 200)}"
    if isinstance(exc, TimeoutError):
        return f"too slow: {exc}"
    return built.explain_failure(exc) if built is not None else first_line(exc)


def run_case(case: Case, paths: Sequence[PathDef], modes: Sequence[str], device: torch.device,
             settings: Settings, *, explicit: frozenset[str] = frozenset(), deadline: float | None = None,
             seed: int = 0) -> list[Row]:
    """Every path in ``paths`` on ``case``, each mode in ``modes``: one row per (path, mode), ``status`` ``"ok"``
    with the timings or ``"n/a"`` with the reason."""
    na: dict[tuple[str, str], str] = {}
    notes: dict[str, dict[str, Any]] = {p.name: {"warnings": [], "check": {}} for p in paths}
    built: dict[str, Built] = {}
    stats: dict[tuple[str, str], Stats] = {}
    copies = rotation_count(case.input_bytes(), cache_bytes(device))
    try:
        sets = _inputs(case, device, copies, seed)
        ref = make_reference(case, *sets[0], grads=any(m != "fwd" for m in modes))
    except Exception as exc:
        if not is_oom(exc):
            raise
        cleanup(device)
        why = f"out of memory allocating the inputs: {first_line(exc, 200)}"
        return [_row(case, p, m, None, None, why, {}) for p in paths for m in modes]
    q, k, v, do = sets[0]
    host = _host_available() if device.type == "cpu" else None
    b: Built | None  # a built path; at the end, possibly none (built.get)
    for p in paths:
        try:
            b = build(p, case, q, k, v, explicit=p.name in explicit)
        except Unavailable as exc:
            na.update({(p.name, m): str(exc) for m in modes})
            continue
        except Exception as exc:
            na.update({(p.name, m): _reason(exc, None, "building the path") for m in modes})
            if is_oom(exc):
                cleanup(device)
            continue
        built[p.name] = b
        na.update({(p.name, m): r for m, r in b.unavailable_modes.items() if m in modes})
        if host is not None and b.backend(True).split()[0] in _QUADRATIC and 3 * case.score_bytes() > host // 2:
            why = (f"would materialise ~{3 * case.score_bytes() / 2**30:.1f} GiB of (B, H, S, S) scores; "
                   f"{host / 2**30:.1f} GiB of host memory is available")
            na.update({(p.name, m): why for m in modes})
            continue
        _check(p, b, case, modes, (q, k, v, do), ref, na, notes[p.name], device)
    for mode in modes:
        ready = [p for p in paths if p.name in built and (p.name, mode) not in na]
        if mode == "bwd":
            groups = [[p for p in ready if built[p.name].backend(True).split()[0] not in _QUADRATIC]]
            groups += [[p] for p in ready if p not in groups[0]]
        else:
            groups = [ready]
        for group in groups:
            items, graphs = [], {}
            for p in group:
                b = built[p.name]
                if mode == "bwd":
                    try:
                        with b.context():
                            graphs[p.name] = [b.call(*s[:3]) for s in sets]
                    except Exception as exc:
                        na[(p.name, mode)] = _reason(exc, b, "building the forward graphs for the backward")
                        graphs.pop(p.name, None)
                        if is_oom(exc):
                            cleanup(device)
                        continue
                items.append(Timed(p.name, _caller(b, mode, sets, graphs.get(p.name)), _context(b, mode)))
            if not items:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = interleave(items, device, settings, deadline=deadline)
            for name, r in res.items():
                if isinstance(r, Stats):
                    stats[(str(name), mode)] = r
                else:
                    na[(str(name), mode)] = _reason(r, built[str(name)], f"timing {mode}")
            del graphs, items
    rows = []
    for p in paths:
        b = built.get(p.name)
        for m in modes:
            rows.append(_row(case, p, m, b, stats.get((p.name, m)), na.get((p.name, m), ""), notes[p.name],
                             copies=copies))
    del sets, q, k, v, do, ref
    cleanup(device)
    return rows


def _check(p: PathDef, b: Built, case: Case, modes: Sequence[str], inputs: tuple[torch.Tensor, ...], ref: Any,
           na: dict[tuple[str, str], str], note: dict[str, Any], device: torch.device) -> None:
    """Run the path once without and once with autograd; a wrong or failing result makes its modes n/a."""
    q, k, v, do = inputs
    phases = [("fwd", [m for m in modes if m == "fwd"]), ("grad", [m for m in modes if m != "fwd"])]
    for phase, phase_modes in phases:
        pending = [m for m in phase_modes if (p.name, m) not in na]
        if not pending:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with b.context():
                    if phase == "fwd":
                        with torch.no_grad():
                            out = b.call(q, k, v)
                        ratios, fail = ref.check(out)
                    else:
                        out = b.call(q, k, v)
                        grads = torch.autograd.grad(out, (q, k, v), do)
                        ratios, fail = ref.check(out, grads)
                        del grads
                del out
            except Exception as exc:
                fail, ratios = _reason(exc, b, "first call" if phase == "fwd" else "first forward+backward"), {}
                if is_oom(exc):
                    cleanup(device)
        note["check"].update({(f"{n}" if phase == "fwd" else f"{n} (grad)"): round(r, 4) for n, r in ratios.items()})
        for w in caught:
            text = str(w.message).strip().splitlines()[0][:300] if str(w.message).strip() else ""
            if text and text not in note["warnings"]:
                note["warnings"].append(text)
        if fail:
            for m in (list(modes) if phase == "fwd" else pending):  # no forward, no backward either
                na.setdefault((p.name, m), fail)


def _caller(b: Built, mode: str, sets: list[tuple[torch.Tensor, ...]],
            graphs: list[torch.Tensor] | None) -> Callable[[int], object]:
    n = len(sets)
    call = b.call
    if mode == "fwd":
        def fwd(i: int) -> object:
            s = sets[i % n]
            return call(s[0], s[1], s[2])
        return fwd
    if mode == "fwdbwd":
        def fwdbwd(i: int) -> object:
            s = sets[i % n]
            return torch.autograd.grad(call(s[0], s[1], s[2]), s[:3], s[3])
        return fwdbwd
    if graphs is None:
        raise ValueError("Expected the retained forward graphs for mode 'bwd', but got None instead.")
    outs = graphs

    def bwd(i: int) -> object:
        s = sets[i % n]
        return torch.autograd.grad(outs[i % n], s[:3], s[3], retain_graph=True)
    return bwd


def _context(b: Built, mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        return lambda: stacked(b.context, torch.no_grad)
    return b.context


def _row(case: Case, p: PathDef, mode: str, b: Built | None, st: Stats | None, reason: str,
         note: dict[str, Any], copies: int = 1) -> Row:
    row: Row = {"case": case.label, **case.as_dict(), "path": p.name, "family": p.family, "mode": mode,
                "backend": "", "status": "ok" if st is not None and not reason else "n/a", "reason": reason}
    if b is not None:
        try:
            row["backend"] = b.backend(mode != "fwd")
        except Exception:  # the name is informative only
            row["backend"] = "?"
    row["flops"] = case.flops(mode)
    if row["status"] == "ok" and st is not None:
        row.update(ms=st.median_ms, ms_q1=st.q1_ms, ms_q3=st.q3_ms, spread=st.spread, rounds=len(st.samples_ms),
                   calls_per_sample=st.calls_per_sample, copies=copies, samples_ms=list(st.samples_ms),
                   tflops=case.flops(mode) / st.median_ms / 1e9, peak_bytes=st.peak_bytes)
    else:
        row["reason"] = reason or "not measured"
    if note.get("check"):
        row["check"] = dict(note["check"])
    if note.get("warnings"):
        row["warnings"] = list(note["warnings"])
    return row


def run_cases(cases: Sequence[Case], paths: Sequence[PathDef], modes: Sequence[str], device: torch.device,
              settings: Settings, *, explicit: frozenset[str] = frozenset(), deadline: float | None = None,
              progress: Callable[[int, int, Case, float, list[Row] | None], None] | None = None,
              ) -> tuple[list[Row], list[dict[str, Any]]]:
    """Run ``cases`` in order until ``deadline`` (``time.monotonic()``); later cases are listed as skipped.

    Returns:
        The rows, and the skipped cases (``{"case", ..., "reason"}``).
    """
    rows: list[Row] = []
    skipped: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        if deadline is not None and time.monotonic() > deadline:
            skipped.append({"case": case.label, **case.as_dict(), "reason": "not run: the time cap was reached"})
            continue
        if progress:
            progress(i, len(cases), case, time.monotonic(), None)
        case_rows = run_case(case, paths, modes, device, settings, explicit=explicit, deadline=deadline, seed=i)
        rows += case_rows
        if progress:
            progress(i, len(cases), case, time.monotonic(), case_rows)
    return rows, skipped
