"""``python -m sdpa_flash bench``: argument parsing, output files, and the ``report`` subcommand."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from ..capability import format_cudnn_version
from ._cases import MODES, Case, human_seconds, parse_dtype, tokens_rule_case
from ._paths import catalogue
from ._report import (
    NOTES_BEGIN,
    NOTES_END,
    format_dense,
    format_overhead,
    format_summary,
    format_varlen,
    render_markdown,
    write_csv,
)
from ._run import _RESULTS_SECTIONS, PRESETS, RESULTS_TIME_CAP, dense_plan, run

__all__ = ["main"]

USAGE = """\
python -m sdpa_flash bench [PRESET] [options]
       python -m sdpa_flash bench report RESULT.json [RESULT.json ...] [--md PAGE.md] [--plots DIR] [--csv FILE]"""

EPILOG = """\
presets:
{presets}

examples:
  python -m sdpa_flash bench                          # quick on a CPU, grid on a GPU
  python -m sdpa_flash bench grid --json grid.json --csv grid.csv --plots plots/
  python -m sdpa_flash bench sweep --part 1/3 --out sweep/    # then --part 2/3, 3/3; --estimate first
  python -m sdpa_flash bench --seq 1024,8192 --head-dim 128 --dtype bf16 --causal both
  python -m sdpa_flash bench --shape 2x16x4096x128 --kv-heads 4 --paths 'sdpa*,auto'
  python -m sdpa_flash bench results --out benchmarks/results --md benchmarks/RESULTS.md
  python -m sdpa_flash bench report benchmarks/results/results.json sweep/*.json --md benchmarks/RESULTS.md

--paths takes names, globs and edits: 'sdpa*,attention(auto)', 'auto,flash' (= attention(...)),
'+flex,-naive' (add to / remove from the preset's selection). --list shows them all."""


def _ints(text: str) -> list[int]:
    try:
        xs = [x.strip().lower() for x in text.split(",") if x.strip()]
        return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in xs]
    except ValueError:
        raise argparse.ArgumentTypeError(f"Expected comma-separated integers, but got {text!r} instead.") from None


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = re.split(r"[x,×]", text.strip())
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"Expected a shape BxHxSxD such as 2x16x4096x128, but got {text!r} instead.")
    b, h, s, d = (int(p) for p in parts)
    return b, h, s, d


def _part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"Expected a part such as 1/3, but got {text!r} instead.")
    return int(m.group(1)), int(m.group(2))


def _parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {n:<9} {p.description}" for n, p in PRESETS.items())
    ap = argparse.ArgumentParser(prog="python -m sdpa_flash bench", usage=USAGE,
                                 description="Every attention path side by side: time, TFLOP/s, peak memory, the "
                                             "kernel that ran, checked against float64 math before timing.",
                                 epilog=EPILOG.format(presets=presets),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", choices=[*PRESETS, "custom"], help="what to run (default: quick on a CPU, "
                    "grid on a GPU; custom when --shape or --seq is given)")
    g = ap.add_argument_group("what")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--paths", help="comma-separated names, globs, or +name/-name edits of the preset's selection")
    g.add_argument("--modes", help=f"comma-separated among {', '.join(MODES)}")
    g.add_argument("--shape", action="append", type=_shape, metavar="BxHxSxD", help="a custom shape (repeatable)")
    g.add_argument("--seq", type=_ints, help="sequence lengths (custom shapes with --head-dim, or a filter on a "
                                             "preset's cases); 4k = 4096")
    g.add_argument("--head-dim", type=_ints, help="head dims (as --seq)")
    g.add_argument("--tokens", type=int, help="custom --seq shapes: B = tokens // S (default 16384 on CUDA, 2048 "
                                              "on the CPU)")
    g.add_argument("--hd-product", type=int, help="custom --seq shapes: H = this // D (default 2048 / 256)")
    g.add_argument("--kv-heads", type=int, help="custom shapes: key/value heads (GQA)")
    g.add_argument("--dtype", help="comma-separated: bf16, fp16, fp32 (custom shapes; a filter on presets)")
    g.add_argument("--causal", nargs="?", const="yes", choices=["yes", "no", "both"],
                   help="causal masking: yes (the flag alone), no, both (custom shapes; a filter on presets; "
                        "overhead: causal calls)")
    h = ap.add_argument_group("how long")
    h.add_argument("--rounds", type=int, help="interleaved rounds per path (default 15 on CUDA, 7 on the CPU)")
    h.add_argument("--sample-ms", type=float, help="length of one timed block of calls")
    h.add_argument("--budget-s", type=float, help="time for one path's rounds; slower calls get fewer rounds (>= 3)")
    h.add_argument("--warmup-ms", type=float, help="warm-up time per path")
    h.add_argument("--max-call-s", type=float, help="a call slower than this is reported n/a (too slow)")
    h.add_argument("--calls", type=int, help="overhead: calls per timed block (default 2000)")
    h.add_argument("--threads", type=int, help="torch intra-op threads (default on the CPU: 1, for stable timings)")
    h.add_argument("--part", type=_part, metavar="I/N", help="run the I-th of N parts of equal estimated cost")
    h.add_argument("--time-cap", type=float, metavar="SECONDS",
                   help="start no case after this (they are listed as skipped); results: the whole run's budget "
                        f"(default {RESULTS_TIME_CAP['cuda']:.0f} s on CUDA)")
    h.add_argument("--max-cases", type=int, help="run only the first N cases")
    o = ap.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write PRESET.json, PRESET.csv and the plots into DIR")
    o.add_argument("--json", metavar="FILE", help="write the result document here")
    o.add_argument("--csv", metavar="FILE", help="write every row here")
    o.add_argument("--plots", metavar="DIR", help="write PNG plots here (needs matplotlib: the bench extra)")
    o.add_argument("--md", metavar="FILE", help="write the results page here (its notes block is kept)")
    o.add_argument("--quiet", action="store_true", help="no progress on stderr")
    o.add_argument("--list", action="store_true", help="list presets and paths, then exit")
    o.add_argument("--estimate", action="store_true", help="print the cases and an estimated H200 run time, "
                                                           "then exit")
    return ap


def _custom_cases(args: argparse.Namespace, device_type: str) -> list[Case]:
    dtypes = [parse_dtype(x) for x in args.dtype.split(",")] if args.dtype else (
        ["bfloat16"] if device_type == "cuda" else ["float32"])
    causals = {"yes": [True], "no": [False], "both": [False, True], None: [False]}[args.causal]
    cases = [Case(b, h, s, d, dt, c, args.kv_heads) for b, h, s, d in args.shape or [] for dt in dtypes
             for c in causals]
    tokens = args.tokens or (16384 if device_type == "cuda" else 2048)
    hd = args.hd_product or (2048 if device_type == "cuda" else 256)
    if args.seq:
        cases += [tokens_rule_case(s, d, tokens=tokens, hd_product=hd, dtype=dt, causal=c, kv_heads=args.kv_heads)
                  for dt in dtypes for c in causals for d in (args.head_dim or [128 if device_type == "cuda" else 64])
                  for s in args.seq]
    return cases


def _list() -> str:
    lines = ["presets:"]
    lines += [f"  {n:<9} {p.description}" for n, p in PRESETS.items()]
    lines += ["", "paths (dense presets):"]
    lines += [f"  {p.name:<20} {p.description}" for p in catalogue()]
    lines += ["", f"modes: {', '.join(MODES)} (fwd: forward without autograd; bwd: backward on a retained graph; "
                  "fwdbwd: both)"]
    return "\n".join(lines)


def _estimate(args: argparse.Namespace, custom: list[Case]) -> str:
    names = [args.preset] if args.preset and args.preset != "results" else [n for n, _, _ in _RESULTS_SECTIONS]
    if custom:
        names = ["custom"]
    lines = ["Estimated wall-clock on an H200 (a cost model from BASELINE.md's rates, ±2x; compile time of "
             "FlexAttention guessed at 15 s per shape and autograd mode):"]
    total = 0.0
    for name in names:
        if name == "custom":
            from ._run import Preset

            pre = Preset("custom", "dense", "", paths=("*", "-attention(chunked)"))
        else:
            pre = PRESETS[name]
        if pre.kind != "dense" and name != "custom":
            lines.append(f"  {name:<9} ~{'10' if pre.kind == 'overhead' else '30'} s")
            continue
        sel = next((s for n, _, s in _RESULTS_SECTIONS if n == name), None) if args.preset == "results" else None
        plan = dense_plan(pre, "cuda", cases=custom or None, paths=args.paths or sel,
                          modes=args.modes.split(",") if args.modes else None,
                          dtypes=[parse_dtype(x) for x in args.dtype.split(",")] if args.dtype else None,
                          causal=args.causal, seqs=args.seq, head_dims=args.head_dim, part=args.part,
                          max_cases=args.max_cases)
        total += plan["estimate_s"]
        part = f" (part {args.part[0]}/{args.part[1]} of {len(plan['all_cases'])} cases)" if args.part else ""
        lines.append(f"  {name:<9} {len(plan['cases'])} cases{part}, {len(plan['paths'])} paths, modes "
                     f"{','.join(plan['modes'])}: ~{human_seconds(plan['estimate_s'])}")
        if name != "results" and args.preset not in (None, "results"):
            for label, s in plan["estimate_by_case"].items():
                lines.append(f"      {label:<44} ~{s:6.1f} s")
    if args.preset == "results":
        cap = args.time_cap or RESULTS_TIME_CAP["cuda"]
        lines.append(f"  total ~{human_seconds(total)} of measurement; capped at {cap:.0f} s (--time-cap), plus "
                     "start-up and plotting")
    return "\n".join(lines)


def _keep_notes(md_path: str) -> str:
    try:
        with open(md_path) as f:
            text = f.read()
    except OSError:
        return ""
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip()
    return ""


def write_outputs(docs: Sequence[dict[str, Any]], *, json_path: str | None = None, csv_path: str | None = None,
                  plots_dir: str | None = None, md_path: str | None = None, quiet: bool = False) -> list[str]:
    """Write JSON (first document), CSV (first document), plots and the page; return the files written."""
    written: list[str] = []
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(docs[0], f, indent=1, default=str)
            f.write("\n")
        written.append(json_path)
    if csv_path:
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        write_csv(csv_path, docs[0])
        written.append(csv_path)
    plots: list[str] = []
    if plots_dir:
        from ._plots import matplotlib_missing, nothing_to_plot, write_plots

        why = matplotlib_missing()
        if why:
            print(f"sdpa_flash bench: no plots: {why}", file=sys.stderr)
        else:
            plots = write_plots(docs, plots_dir)
            written += plots
            if not plots:  # said whatever --quiet says: the user asked for plots
                print(f"sdpa_flash bench: no plots written to {plots_dir}: {nothing_to_plot(docs)}", file=sys.stderr)
    if md_path:
        os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
        text = render_markdown(docs, plots=plots, md_path=md_path, notes=_keep_notes(md_path))
        with open(md_path, "w") as f:
            f.write(text)
        written.append(md_path)
    if written and not quiet:
        print("wrote " + ", ".join(written), file=sys.stderr)
    return written


def print_doc(doc: dict[str, Any]) -> None:
    """The terminal report: each section's table, then the headline ratios."""
    meta = doc["meta"]
    where = meta["device"] if meta["device_type"] == "cuda" else f"CPU ({meta['cpu']}, {meta['cpu_threads']} threads)"
    print(f"{where}; torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {format_cudnn_version(meta['cudnn'])}, "
          f"driver {meta.get('driver')}; "
          f"sdpa_flash {meta['sdpa_flash']}; {meta['date']}")
    mm = meta.get("matmul")
    if mm and "tflops" in mm:
        print(f"matmul {mm['n']}^3 {mm['dtype']}: {mm['tflops']:.3g} TFLOP/s (ceiling for the ratios)")
    for sec in doc["sections"]:
        print(f"\n== {sec['name']}: {sec.get('description', '')}")
        if sec.get("unavailable") or sec.get("error"):
            print(f"not measured: {sec.get('unavailable') or sec.get('error')}")
            continue
        if sec["kind"] == "dense":
            print("TFLOP/s: 4*B*H*S^2*D forward (halved when causal), backward 2.5x, fwd+bwd 3.5x; ± = IQR/median; "
                  "peak = CUDA bytes beyond the inputs\n")
            print(format_dense(sec["rows"]))
            for s in sec.get("skipped", []):
                print(f"skipped {s['case']}: {s['reason']}")
            text = format_summary(sec.get("summary", {}), mm)
            if text:
                print(text)
            wrong = [r for r in sec["rows"] if r.get("reason", "").startswith("wrong result")]
            if wrong:
                print(f"WARNING: {len(wrong)} rows gave wrong results (see their n/a reasons)")
        elif sec["kind"] == "overhead":
            print(format_overhead(sec))
        elif sec["kind"] == "varlen":
            print(format_varlen(sec.get("rows", [])))
        if "elapsed_s" in sec:
            print(f"({sec['name']}: {sec['elapsed_s']} s)")
    print(f"\ntotal {human_seconds(doc.get('elapsed_s', 0))}")


def _report_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdpa_flash bench report",
                                 description="Rebuild the results page, plots and CSV from result files.")
    ap.add_argument("files", nargs="+", help="result JSON files (the first one's environment leads the page)")
    ap.add_argument("--md", help="write the results page here")
    ap.add_argument("--plots", help="write PNG plots here")
    ap.add_argument("--csv", help="write the first file's rows here")
    args = ap.parse_args(argv)
    docs = []
    for path in args.files:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"sdpa_flash bench report: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        if not str(doc.get("schema", "")).startswith("sdpa_flash.bench/"):
            print(f"sdpa_flash bench report: {path} is not an sdpa_flash bench result", file=sys.stderr)
            return 2
        docs.append(doc)
    for doc in docs:
        print_doc(doc)
    write_outputs(docs, csv_path=args.csv, plots_dir=args.plots, md_path=args.md)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sdpa_flash bench``; returns the exit status (0 ok, 2 bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return _report_main(argv[1:])
    ap = _parser()
    args = ap.parse_args(argv)
    if args.list:
        print(_list())
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_kind = "cuda" if device.startswith("cuda") else "cpu"
    try:
        custom = _custom_cases(args, dtype_kind) if (args.shape or (args.seq and not args.preset)) else []
        if args.estimate:
            print(_estimate(args, custom))
            return 0
        modes = args.modes.split(",") if args.modes else None
        if modes and not set(modes) <= set(MODES):
            raise ValueError(f"Expected modes among {', '.join(MODES)}, but got {args.modes!r} instead.")
        settings = {k: getattr(args, k) for k in ("rounds", "sample_ms", "budget_s", "warmup_ms", "max_call_s")}
        doc = run(None if custom and args.preset in (None, "custom") else args.preset, device=device,
                  cases=custom or None, paths=args.paths, modes=modes,
                  dtypes=[parse_dtype(x) for x in args.dtype.split(",")] if args.dtype and not custom else None,
                  causal=args.causal if not custom else None, seqs=args.seq if not custom else None,
                  head_dims=args.head_dim if not custom else None, part=args.part, time_cap=args.time_cap,
                  max_cases=args.max_cases, settings=settings, calls=args.calls, threads=args.threads,
                  progress=not args.quiet)
    except ValueError as exc:
        print(f"sdpa_flash bench: {exc}", file=sys.stderr)
        return 2
    print_doc(doc)
    name = doc["preset"] + (f"_part{args.part[0]}of{args.part[1]}" if args.part else "")
    json_path, csv_path, plots = args.json, args.csv, args.plots
    if args.out:
        json_path = json_path or os.path.join(args.out, f"{name}.json")
        csv_path = csv_path or os.path.join(args.out, f"{name}.csv")
        plots = plots or args.out
    md = args.md or (os.path.join(args.out, "RESULTS.md") if args.out and doc["preset"] == "results" else None)
    write_outputs([doc], json_path=json_path, csv_path=csv_path, plots_dir=plots, md_path=md)
    return 0
