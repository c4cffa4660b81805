"""Turning rows into what people read: the headline ratios, the terminal table, CSV, and the results page."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

from ..capability import format_cudnn_version
from ._paths import catalogue

__all__ = ["format_dense", "format_overhead", "format_summary", "format_varlen", "render_markdown", "summarize",
           "write_csv"]

Row = dict[str, Any]
_MODE_LABEL = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd"}
GOAL = 0.97
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the page is regenerated -->", "<!-- /notes -->"


# ----------------------------------------------------------------------------------------------- ratios
def _paired(a: Row, b: Row) -> tuple[float, float]:
    """Speed of ``a`` over ``b`` as the median of per-round time ratios (rounds were interleaved), and its IQR."""
    xs, ys = a.get("samples_ms") or [a["ms"]], b.get("samples_ms") or [b["ms"]]
    n = min(len(xs), len(ys))
    rs = sorted(ys[i] / xs[i] for i in range(n) if xs[i] > 0)
    if not rs:
        return b["ms"] / a["ms"], 0.0
    q1, q3 = rs[(len(rs) - 1) // 4], rs[(3 * (len(rs) - 1)) // 4]
    return statistics.median(rs), q3 - q1


def _cases(rows: Iterable[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["case"], None)
    return list(seen)


def summarize(rows: Sequence[Row], matmul_tflops: float | None = None) -> dict[str, Any]:
    """The headline ratios of a dense section, per case and mode, and over all of them.

    ``auto_over_best``: ``attention(auto)`` against the fastest single-backend path of that row (SDPA with one
    backend forced, or ``attention()`` under a one-backend policy); ``auto_over_flash``: against SDPA forced to
    FLASH; ``auto_over_default``: against PyTorch's default dispatch; ``auto_over_math`` / ``auto_over_naive``:
    against SDPA's math backend and the naive formula. Ratios are speed ratios (> 1: auto is faster), each the
    median of per-round ratios.
    """
    by: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by.setdefault((r["case"], r["mode"]), {})[r["path"]] = r
    per: list[dict[str, Any]] = []
    for case in _cases(rows):
        for mode in ("fwd", "bwd", "fwdbwd"):
            paths = by.get((case, mode))
            if not paths or "attention(auto)" not in paths:
                continue
            auto = paths["attention(auto)"]
            ent: dict[str, Any] = {"case": case, "mode": mode, "s": auto["s"], "d": auto["d"],
                                   "causal": auto["causal"], "dtype": auto["dtype"], "auto_tflops": auto["tflops"],
                                   "auto_backend": auto["backend"]}
            single = {p.name for p in catalogue() if p.single_backend}
            singles = {p: r for p, r in paths.items() if p in single}
            if singles:
                best = max(singles, key=lambda p: singles[p]["tflops"])
                ent["best_single"], ent["best_tflops"] = best, singles[best]["tflops"]
                ent["auto_over_best"], ent["auto_over_best_iqr"] = _paired(auto, singles[best])
            for key, path in (("flash", "sdpa[flash]"), ("default", "sdpa"), ("math", "sdpa[math]"),
                              ("naive", "naive"), ("flex", "flex")):
                if path in paths:
                    ent[f"auto_over_{key}"] = _paired(auto, paths[path])[0]
            if matmul_tflops:
                ent["matmul_fraction"] = auto["tflops"] / matmul_tflops
            per.append(ent)
    overall: dict[str, Any] = {}
    for mode in ("fwd", "bwd", "fwdbwd"):
        ents = [e for e in per if e["mode"] == mode and "auto_over_best" in e]
        if not ents:
            continue
        worst = min(ents, key=lambda e: e["auto_over_best"])
        o: dict[str, Any] = {"shapes": len(ents), "min_auto_over_best": worst["auto_over_best"],
                             "min_case": worst["case"],
                             "median_auto_over_best": statistics.median(e["auto_over_best"] for e in ents),
                             "at_goal": sum(e["auto_over_best"] >= GOAL for e in ents),
                             "below_goal": [e["case"] for e in ents if e["auto_over_best"] < GOAL]}
        for key in ("flash", "default"):
            xs = [e[f"auto_over_{key}"] for e in per if e["mode"] == mode and f"auto_over_{key}" in e]
            if xs:
                o[f"auto_over_{key}_range"] = [min(xs), max(xs)]
                o[f"auto_over_{key}_median"] = statistics.median(xs)
        for key in ("math", "naive"):
            at = [e for e in per if e["mode"] == mode and e["s"] == 1024 and f"auto_over_{key}" in e]
            if at:
                o[f"auto_over_{key}_s1024"] = {e["case"]: e[f"auto_over_{key}"] for e in at}
        fr = [e for e in per if e["mode"] == mode and "matmul_fraction" in e]
        if fr:
            top = max(fr, key=lambda e: e["matmul_fraction"])
            o["max_matmul_fraction"], o["max_matmul_fraction_case"] = top["matmul_fraction"], top["case"]
        overall[mode] = o
    return {"per_case": per, "overall": overall}


# ------------------------------------------------------------------------------------------------- text
def _fmt_tf(x: float) -> str:
    return f"{x:.0f}" if x >= 9.5 else f"{x:.2g}" if x >= 0.01 else f"{x:.1e}"


def _fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}" if b >= 2**20 else f"{b / 2**20:.2f}"


def format_dense(rows: Sequence[Row], width: int = 120) -> str:
    """One block per case: a line per path with ms, TFLOP/s and spread per mode, peak MiB, then the n/a reasons."""
    out: list[str] = []
    modes = [m for m in ("fwd", "bwd", "fwdbwd") if any(r["mode"] == m for r in rows)]
    show_peak = any(r.get("peak_bytes") is not None for r in rows)
    head = f"  {'path':<20} {'backend':<18}"
    for m in modes:
        head += f" {_MODE_LABEL[m] + ' ms':>11} {'TFLOP/s':>8} {'±':>4}"
    if show_peak:
        head += "  peak MiB " + "/".join(_MODE_LABEL[m] for m in modes)
    for case in _cases(rows):
        crows = [r for r in rows if r["case"] == case]
        out.append(case)
        out.append(head)
        reasons: dict[str, dict[str, list[str]]] = {}
        for path in dict.fromkeys(r["path"] for r in crows):
            prow = {r["mode"]: r for r in crows if r["path"] == path}
            backend = next((r["backend"] for r in prow.values() if r.get("backend")), "")
            line = f"  {path:<20} {backend[:18]:<18}"
            for m in modes:
                r = prow.get(m)
                if r is not None and r.get("status") == "ok":
                    line += f" {_fmt_ms(r['ms']):>11} {_fmt_tf(r['tflops']):>8} {r['spread'] * 100:>3.0f}%"
                else:
                    line += f" {'n/a':>11} {'':>8} {'':>4}"
                    if r is not None:
                        reasons.setdefault(path, {}).setdefault(r["reason"], []).append(_MODE_LABEL[m])
            if show_peak:
                line += "  " + "/".join(_mib(prow[m].get("peak_bytes")) if m in prow else "-" for m in modes)
            out.append(line.rstrip())
        for path, by_reason in reasons.items():
            for reason, ms in by_reason.items():
                which = "" if len(ms) == len(modes) else f" ({', '.join(ms)})"
                text = f"    n/a {path}{which}: {reason}"
                out += textwrap.wrap(text, width, subsequent_indent="        ")
        out.append("")
    return "\n".join(out)


def format_summary(summary: dict[str, Any], matmul: dict[str, Any] | None = None) -> str:
    """The headline ratios in a few lines."""
    lines = []
    for mode, o in summary.get("overall", {}).items():
        s = (f"{_MODE_LABEL[mode]:>8}: attention(auto) / best single backend: min {o['min_auto_over_best']:.3f} "
             f"({o['min_case']}), median {o['median_auto_over_best']:.3f}; {o['at_goal']}/{o['shapes']} shapes "
             f">= {GOAL}")
        if "auto_over_flash_range" in o:
            lo, hi = o["auto_over_flash_range"]
            s += f"; / forced FLASH {lo:.2f}-{hi:.2f}x"
        if "auto_over_default_median" in o:
            s += f"; / SDPA default {o['auto_over_default_median']:.3f} (median)"
        for key in ("math", "naive"):
            for case, x in o.get(f"auto_over_{key}_s1024", {}).items():
                s += f"; / {key} at {case.split(' B=')[0]}: {x:.1f}x"
        if "max_matmul_fraction" in o and matmul:
            s += f"; up to {o['max_matmul_fraction']:.2f} of the {matmul['dtype']} matmul rate"
        lines.append(s)
    return "\n".join(textwrap.fill(x, 120, subsequent_indent="          ") for x in lines)


def format_overhead(sec: dict[str, Any]) -> str:
    lines = [f"shape {sec['shape']} {sec['dtype']}, causal={sec['causal']}, auto -> {sec['auto_backend']}, "
             f"{sec['threads']} thread(s)"]
    for r in sec["rows"]:
        lines.append(f"  {r['path']:<36} {r['us_per_call']:8.2f} us/call   x{r['ratio_to_raw']:.3f} of raw   "
                     f"±{r['spread'] * 100:.0f}%")
    return "\n".join(lines)


def format_varlen(rows: Sequence[Row], width: int = 120) -> str:
    out = []
    for case in _cases(rows):
        out.append(case)
        out.append(f"  {'path':<36} {'backend':<30} {'mode':<8} {'ms':>9} {'useful TFLOP/s':>15} {'±':>4}")
        for r in (r for r in rows if r["case"] == case):
            if r["status"] == "ok":
                out.append(f"  {r['path']:<36} {r['backend'][:30]:<30} {_MODE_LABEL[r['mode']]:<8} "
                           f"{_fmt_ms(r['ms']):>9} {_fmt_tf(r['tflops']):>15} {r['spread'] * 100:>3.0f}%")
            else:
                out += textwrap.wrap(f"  {r['path']:<36} {'':<30} {_MODE_LABEL[r['mode']]:<8} n/a: {r['reason']}",
                                     width, subsequent_indent=" " * 10)
        out.append("")
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------- csv
def write_csv(path: str, doc: dict[str, Any]) -> None:
    """Every row of every section, one line each (per-round samples joined with ``;``)."""
    flat: list[Row] = []
    for sec in doc.get("sections", []):
        for r in sec.get("rows", []):
            row = {"section": sec["name"], **r}
            for key, val in list(row.items()):
                if isinstance(val, list):
                    row[key] = ";".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in val)
                elif isinstance(val, dict):
                    row[key] = json.dumps(val, sort_keys=True)
            flat.append(row)
    cols: dict[str, None] = {}
    for r in flat:
        for key in r:
            cols.setdefault(key, None)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    with open(path, "w", newline="") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------------------------------------- markdown
def _md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return lines


def _x(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}×"


def _grid_tables(rows: Sequence[Row], footnotes: dict[str, int]) -> list[str]:
    cases = _cases(rows)
    paths = list(dict.fromkeys(r["path"] for r in rows))
    index = {(r["case"], r["path"], r["mode"]): r for r in rows}
    short = {c: next(r for r in rows if r["case"] == c) for c in cases}
    names = [_short_case(short[c]) for c in cases]
    lines: list[str] = []

    def cell(case: str, path: str, modes: Sequence[str], key: str = "tflops") -> str:
        parts = []
        for m in modes:
            r = index.get((case, path, m))
            if r is None:
                parts.append("")
            elif r["status"] == "ok":
                parts.append(_fmt_tf(r[key]) if key == "tflops" else _mib(r.get(key)))
            else:
                n = footnotes.setdefault(r["reason"], len(footnotes) + 1)
                parts.append(f"n/a[^{n}]")
        return " / ".join(p for p in parts if p) or "—"

    for title, modes in (("forward / forward+backward", ("fwd", "fwdbwd")), ("backward alone", ("bwd",))):
        if not any(index.get((c, p, m)) for c in cases for p in paths for m in modes):
            continue
        lines += [f"TFLOP/s, {title}:", ""]
        lines += _md_table(["path", *names], ([f"`{p}`", *(cell(c, p, modes) for c in cases)] for p in paths))
        lines.append("")
    if any(r.get("peak_bytes") is not None for r in rows):
        lines += ["Peak memory beyond the inputs during one call (MiB, outputs and saved tensors included), "
                  "forward / forward+backward:", ""]
        lines += _md_table(["path", *names], ([f"`{p}`", *(cell(c, p, ("fwd", "fwdbwd"), "peak_bytes")
                                                          for c in cases)] for p in paths))
        lines.append("")
    lines += ["The kernel each path ran (forward; with autograd where it differs):", ""]

    def backend(case: str, path: str) -> str:
        f, g = index.get((case, path, "fwd")), index.get((case, path, "fwdbwd")) or index.get((case, path, "bwd"))
        a, b = (f or {}).get("backend", ""), (g or {}).get("backend", "")
        return (a if not b or a == b else f"{a} / {b}" if a else b) or "—"

    lines += _md_table(["path", *names], ([f"`{p}`", *(backend(c, p) for c in cases)] for p in paths))
    lines.append("")
    return lines


def _short_case(r: Row) -> str:
    s = r["s"]
    sl = f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)
    gqa = f" GQA {r['h']}/{r['h_kv']}" if r.get("h_kv") not in (None, r["h"]) else ""
    dt = {"bfloat16": "", "float32": " fp32", "float16": " fp16"}.get(r["dtype"], f" {r['dtype']}")
    return f"hd{r['d']} S={sl}{' causal' if r['causal'] else ''}{dt}{gqa}"


def _headline(summary: dict[str, Any], matmul: dict[str, Any] | None) -> list[str]:
    ov = summary.get("overall", {})
    modes = [m for m in ("fwd", "fwdbwd", "bwd") if m in ov]
    if not modes:
        return ["No `attention(auto)` rows to compare in this run.", ""]
    head = ["", *(_MODE_LABEL[m] for m in modes)]

    def get(m: str, key: str) -> Any:
        return ov[m].get(key)

    body = [
        ["`attention()` auto / best single backend, worst shape (goal ≥ 0.97)",
         *(f"{get(m, 'min_auto_over_best'):.3f} ({_short_from_label(get(m, 'min_case'))})" for m in modes)],
        ["… median over shapes", *(f"{get(m, 'median_auto_over_best'):.3f}" for m in modes)],
        ["… shapes at ≥ 0.97", *(f"{get(m, 'at_goal')}/{get(m, 'shapes')}" for m in modes)],
        ["auto / SDPA forced to FLASH, range",
         *(("{:.2f}–{:.2f}×".format(*get(m, "auto_over_flash_range"))) if get(m, "auto_over_flash_range") else "—"
           for m in modes)],
        ["auto / SDPA default dispatch, median", *(_x(get(m, "auto_over_default_median"), 3) for m in modes)],
    ]
    for key, label in (("math", "SDPA math backend"), ("naive", "the naive formula")):
        cases = dict.fromkeys(c for m in modes for c in (get(m, f"auto_over_{key}_s1024") or {}))
        for c in cases:
            body.append([f"auto / {label} at {_short_from_label(c)}",
                         *(_x((get(m, f"auto_over_{key}_s1024") or {}).get(c), 1) for m in modes)])
    if matmul and "tflops" in matmul:
        body.append([f"best fraction of the measured {matmul['dtype']} matmul rate ({matmul['tflops']:.0f} TFLOP/s)",
                     *(f"{get(m, 'max_matmul_fraction'):.2f} ({_short_from_label(get(m, 'max_matmul_fraction_case'))})"
                       if get(m, "max_matmul_fraction") is not None else "—" for m in modes)])
    lines = _md_table(head, body)
    below = sorted({c for m in modes for c in get(m, "below_goal") or []})
    if below:
        lines += ["", "Below the 0.97 goal: " + "; ".join(_short_from_label(c) for c in below) + " (see the spread "
                  "column of the per-shape table: a ratio within its spread of the goal is timing noise)."]
    return [*lines, ""]


def _short_from_label(label: str | None) -> str:
    if not label:
        return "—"
    parts = label.split()
    keep = [p for p in parts if p.startswith(("hd", "S=")) or p in ("causal", "fp32", "fp16")]
    return " ".join(keep) or label


def _per_shape(summary: dict[str, Any]) -> list[str]:
    per = summary.get("per_case", [])
    if not per:
        return []
    body = []
    for e in per:
        if e["mode"] == "bwd":
            continue
        iqr = e.get("auto_over_best_iqr")
        body.append([_short_from_label(e["case"]), _MODE_LABEL[e["mode"]], f"`{e.get('auto_backend', '')}`",
                     _fmt_tf(e["auto_tflops"]), f"`{e.get('best_single', '—')}` {_fmt_tf(e.get('best_tflops', 0))}",
                     f"{e['auto_over_best']:.3f}" + (f" ±{iqr / 2:.3f}" if iqr else "") if "auto_over_best" in e
                     else "—", _x(e.get("auto_over_flash")), _x(e.get("auto_over_default"), 3),
                     f"{e['matmul_fraction']:.2f}" if "matmul_fraction" in e else "—"])
    return [*_md_table(["shape", "mode", "auto ran", "auto TFLOP/s", "best single backend", "auto / best",
                        "auto / FLASH", "auto / default", "of matmul"], body), ""]


def _na_list(rows: Sequence[Row], footnotes: dict[str, int]) -> list[str]:
    lines = []
    for reason, n in sorted(footnotes.items(), key=lambda kv: kv[1]):
        where = sorted({f"`{r['path']}`" for r in rows if r.get("reason") == reason and r.get("status") != "ok"})
        lines.append(f"[^{n}]: {', '.join(where[:6])}{' …' if len(where) > 6 else ''}: {reason}")
    return lines


def _memory_table(rows: Sequence[Row]) -> list[str]:
    seqs = sorted({r["s"] for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    index = {(r["path"], r["s"], r["mode"]): r for r in rows}
    mode = "fwdbwd" if any(r["mode"] == "fwdbwd" for r in rows) else "fwd"

    def cell(p: str, s: int) -> str:
        r = index.get((p, s, mode))
        if r is None:
            return "—"
        if r["status"] == "ok":
            return _mib(r.get("peak_bytes")) + (f" ({_fmt_ms(r['ms'])} ms)" if r.get("peak_bytes") is None else "")
        return "OOM" if "out of memory" in r["reason"] else "n/a"

    head = ["path", *(f"S={s // 1024}k" if s % 1024 == 0 else f"S={s}" for s in seqs)]
    return [*_md_table(head, ([f"`{p}`", *(cell(p, s) for s in seqs)] for p in paths)), ""]


def render_markdown(docs: Sequence[dict[str, Any]], *, plots: Sequence[str] = (), md_path: str | None = None,
                    notes: str = "") -> str:
    """The results page for one or more result files (sections in order; the first file's environment leads)."""
    meta = docs[0]["meta"]
    md_dir = os.path.dirname(os.path.abspath(md_path)) if md_path else os.getcwd()
    rel = [os.path.relpath(p, md_dir).replace(os.sep, "/") for p in plots]
    matmul = meta.get("matmul")
    lines = ["# sdpa_flash benchmark results", "",
             "<!-- Generated by `python -m sdpa_flash bench` from the JSON result files named below; regenerate with "
             "`python -m sdpa_flash bench report FILE.json ... --md THIS.md`. Only the notes block is kept. -->", ""]
    if meta.get("device_type") != "cuda":
        lines += ["> **This page holds a CPU run** (a 2-core container, float32, scaled-down shapes): it shows the "
                  "page's structure and that every path runs, and says nothing about GPU performance. The committed "
                  "page is produced on an H200 with `python -m sdpa_flash bench results --out benchmarks/results "
                  "--md benchmarks/RESULTS.md`.", ""]
    commit = (meta.get("git_commit") or "")[:10]
    dirty = " + local changes" if meta.get("git_dirty") else ""
    dev = meta.get("device", "?")
    if meta.get("device_type") == "cuda":
        dev += (f" ({meta.get('arch')}, {meta.get('sm_count')} SMs, {meta.get('gpu_memory_gib')} GiB, driver "
                f"{meta.get('driver') or '?'}, CUDA driver API {meta.get('cuda_driver_api') or '?'})")
    else:
        dev = f"CPU: {meta.get('cpu')} ({meta.get('cpu_threads')} threads)"
    lines += [f"Measured {meta.get('date')} on {dev}; torch {meta.get('torch')}, CUDA {meta.get('cuda')}, "
              f"cuDNN {format_cudnn_version(meta.get('cudnn'))}, Triton {meta.get('triton')}, "
              f"Python {meta.get('python')}, "
              f"sdpa_flash {meta.get('sdpa_flash')}" + (f" (commit `{commit}`{dirty})" if commit else "") + ".", ""]
    lines += ["Commands (each wrote one of the result files, JSON and CSV next to the plots):", "", "```bash"]
    lines += list(dict.fromkeys(d["meta"].get("command", "") for d in docs))
    lines += ["```", ""]
    if matmul and "tflops" in matmul:
        lines += [f"Ceiling: a {matmul['n']}³ {matmul['dtype']} matrix product ran at {matmul['tflops']:.0f} TFLOP/s "
                  f"(±{matmul['spread'] * 100:.0f}%) in the same run.", ""]
    sections = [s for d in docs for s in d.get("sections", [])]
    dense = [s for s in sections if s.get("kind") == "dense" and s.get("rows")]
    footnotes: dict[str, int] = {}
    head_sec = next((s for s in dense if s["name"] == "grid"), dense[0] if dense else None)
    if head_sec is not None:
        summary = summarize(head_sec["rows"], (matmul or {}).get("tflops"))
        lines += [f"## Headline (`{head_sec['name']}` preset)", ""]
        lines += _headline(summary, matmul)
        lines += _per_shape(summary)
    curve_plots = [p for p in rel if os.path.basename(p).startswith("tflops")]
    if curve_plots:
        lines += ["## TFLOP/s against sequence length", ""]
        lines += [f"![TFLOP/s vs sequence length: {os.path.basename(p)}]({p})" for p in curve_plots]
        lines.append("")
    for sec in dense:
        if sec["name"] == "memory":
            lines += [f"## Peak memory against sequence length (`{sec['name']}` preset)", "",
                      sec.get("description", ""), "",
                      "Peak MiB beyond the inputs, forward+backward (OOM: the allocation failed; n/a: see the "
                      "notes below the tables):", ""]
            lines += _memory_table(sec["rows"])
            lines += [f"![peak memory vs sequence length]({p})" for p in rel
                      if os.path.basename(p).startswith("memory")]
            lines.append("")
            lines += _grid_tables(sec["rows"], footnotes)
            continue
        lines += [f"## `{sec['name']}` preset", "", sec.get("description", ""), ""]
        if sec is not head_sec and sec["name"] in ("sweep", "curves", "flex", "quick"):
            summ = summarize(sec["rows"], (matmul or {}).get("tflops"))
            lines += _headline(summ, matmul)
        if sec["name"] in ("sweep", "curves") and len(_cases(sec["rows"])) > 12:
            lines += [f"{len(_cases(sec['rows']))} configurations: every row is in the CSV/JSON; the plots above "
                      "show them.", ""]
        else:
            lines += _grid_tables(sec["rows"], footnotes)
        if sec.get("skipped"):
            lines += [f"Not run (time cap): {', '.join(_short_from_label(s['case']) for s in sec['skipped'])}.", ""]
    for sec in sections:
        if sec.get("kind") == "overhead":
            lines += ["## Host overhead per call", ""]
            if sec.get("error") or sec.get("unavailable"):
                lines += [f"Not measured: {sec.get('error') or sec.get('unavailable')}", ""]
                continue
            lines += [f"Shape {tuple(sec['shape'])} {sec['dtype']}, causal={sec['causal']}, {sec['threads']} "
                      f"thread(s); auto runs `{sec['auto_backend']}`. Median of {sec['rows'][0]['rounds']} interleaved "
                      f"rounds of {sec['rows'][0]['calls_per_sample']} calls.", ""]
            lines += _md_table(["way of calling", "µs/call", "× raw SDPA", "spread"],
                               ([r["path"], f"{r['us_per_call']:.2f}", f"{r['ratio_to_raw']:.3f}",
                                 f"±{r['spread'] * 100:.0f}%"] for r in sec["rows"]))
            lines.append("")
        if sec.get("kind") == "varlen":
            lines += ["## Variable-length batches", ""]
            if sec.get("unavailable") or sec.get("error"):
                lines += [f"Not measured: {sec.get('unavailable') or sec.get('error')}", ""]
                continue
            lines += ["Useful TFLOP/s (Σ 4·H·Lᵢ²·D; padding is lost work), forward / forward+backward:", ""]
            vrows = sec["rows"]
            cases = _cases(vrows)
            index = {(r["case"], r["path"], r["mode"]): r for r in vrows}

            def vcell(c: str, p: str, index: dict[tuple[str, str, str], Row] = index) -> str:
                out = []
                for m in ("fwd", "fwdbwd"):
                    r = index.get((c, p, m))
                    if r is None:
                        continue
                    if r["status"] == "ok":
                        out.append(_fmt_tf(r["tflops"]))
                    else:
                        out.append(f"n/a[^{footnotes.setdefault(r['reason'], len(footnotes) + 1)}]")
                return " / ".join(out) or "—"

            vpaths = list(dict.fromkeys(r["path"] for r in vrows))
            lines += _md_table(["path", *(c.split(",")[0] + ", " + c.split(",")[1].strip() for c in cases)],
                               ([f"`{p}`", *(vcell(c, p) for c in cases)] for p in vpaths))
            lines += ["", "Batches: " + "; ".join(cases), ""]
    if footnotes:
        all_rows = [r for s in sections for r in s.get("rows", [])]
        lines += ["## Paths that could not run, and why", ""]
        lines += _na_list(all_rows, footnotes)
        lines.append("")
    lines += ["## How it is measured", "",
              "- Every path of a shape is timed in the same process, in interleaved rounds, each in a fresh "
              "random order (so no path always runs right after the same, perhaps power-hungry, neighbour), with "
              "~0.5 ms of untimed calls before each sample of a fast path; drift on a shared GPU hits all alike. "
              "Each number is the median of its rounds, `±` the interquartile range over the median, and ratios "
              "are medians of per-round ratios.",
              "- One round is a block of back-to-back calls (≥ 2 ms on a GPU) timed with CUDA events; the calls "
              "cycle through copies of the inputs covering twice the L2 cache, so short calls do not run from a "
              "warm cache. Warm-up first (compilation, cuDNN plans); random normal inputs, never zeros.",
              "- Before any timing, each path's output (and `dq`, on rows spread over the sequence; whole `dq`, "
              "`dk`, `dv` for small shapes) is checked against float64 math: at most 2× the error of PyTorch's math "
              "backend in the same dtype plus 8 ulps of the largest output. A path that fails is reported as n/a, "
              "never timed, so a fast wrong path cannot win a row.",
              "- TFLOP/s: forward 4·B·H·S²·D (flash-attention convention), halved when causal; backward 2.5×, "
              "forward+backward 3.5× that. The backward alone is timed on a retained forward graph.",
              "- Peak memory: `torch.cuda.max_memory_allocated()` during one call minus what was allocated before "
              "it (the inputs), so outputs, saved tensors and gradients count; not measured on the CPU.",
              "- A path that cannot run a shape (unsupported dtype or head dim, out of memory, no kernel on this "
              "device) is listed with sdpa_flash's or PyTorch's reason, never dropped.", ""]
    lines += ["## Notes", "", NOTES_BEGIN, notes.strip(), NOTES_END, ""]
    return "\n".join(lines)
