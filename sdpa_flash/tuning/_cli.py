"""``python -m sdpa_flash tune``: measure this machine and write the table ``auto`` ranks by."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from ..errors import SdpaFlashError
from . import run_tune, tables_for

__all__ = ["main"]

USAGE = ("python -m sdpa_flash tune [--quick | --model CONFIGS.json] [--dtype D[,D]] [--rounds N] [--seed N] "
         "[--out PATH] [--device D]")

DESCRIPTION = """\
Time every backend that can run each class of calls on this device (head dim, query and key lengths, forward or
training, causal, GQA, dtype, dense or packed), and write the ranking table that `auto` uses from then on on
this machine: the backends of each class by median time, fastest first, with the measurements behind them."""

EPILOG = """\
modes:
  (default)             the full grid: both half-precision dtypes on a GPU (several minutes; FlashAttention-4
                        compiles each new configuration once)
  --quick               a small grid: ~19 classes in one dtype on a GPU (1-2 minutes), seconds on a CPU
  --model CONFIGS.json  exactly the configurations in the file: a JSON list of objects with sdpa_flash.warmup()'s
                        keywords, e.g. [{"heads": 32, "kv_heads": 8, "head_dim": 128, "seqlen": 4096,
                        "causal": true, "training": true, "dtype": "bfloat16"}]

where: $SDPA_FLASH_TUNE_DIR, else ~/.cache/sdpa_flash/tuned/ ($XDG_CACHE_HOME respected), a file named after this
machine's GPU and versions; `python -m sdpa_flash` shows the table in force; SDPA_FLASH_TABLE=PATH forces one."""


def _int(lo: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo:
            raise argparse.ArgumentTypeError(f"Expected an integer >= {lo}, but got {text!r} instead.")
        return value

    return parse


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdpa_flash tune", usage=USAGE, description=DESCRIPTION,
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the small grid")
    mode.add_argument("--model", metavar="CONFIGS.json", help="measure exactly these configurations")
    ap.add_argument("--dtype", metavar="D[,D]", help="measure the grid in these dtypes only, e.g. bfloat16 (default: "
                                                     "bfloat16, and float16 too in a full run)")
    ap.add_argument("--rounds", type=_int(1), help="interleaved rounds per backend (default 5 quick, 7 otherwise)")
    ap.add_argument("--seed", type=_int(0), help="draw each class's shape inside the class with this seed (default: "
                                                 "each class's usual shape)")
    ap.add_argument("--out", metavar="PATH", help="write the table here instead of the tune directory")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: the current CUDA device, else cpu)")
    args = ap.parse_args(argv)
    configs = None
    if args.model:
        try:
            with open(args.model, encoding="utf-8") as f:
                configs = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"sdpa_flash tune: --model {args.model}: {exc}", file=sys.stderr)
            return 2
    command = shlex.join(["python", "-m", "sdpa_flash", "tune", *argv])
    try:
        dtypes = None if args.dtype is None else [d.strip() for d in args.dtype.split(",")]
        table = run_tune(quick=args.quick, configs=configs, device=args.device, rounds=args.rounds, seed=args.seed,
                         out=args.out, write=True, progress=lambda line: print(line, flush=True), command=command,
                         dtypes=dtypes)
    except SdpaFlashError as exc:
        print(f"sdpa_flash tune: {exc}", file=sys.stderr)
        return 2
    run = table.run
    classes = len({r["class"] for r in table.measurements})
    print(f"wrote {table.path}: {len(table.rules)} rules from {classes} classes, {run['mode']} run, "
          f"{run['rounds']} rounds, {run['duration_s']:.0f} s")
    if table.skipped:
        print(f"skipped {len(table.skipped)} classes that no backend can run here (reasons above, and in the "
              f"table's measurements): {'; '.join(table.skipped)}")
    from ..capability import capabilities

    in_force = tables_for(capabilities(args.device)).user
    if in_force is not None and in_force.path == table.path:
        print("in force: auto ranks by this table on this machine from now on (python -m sdpa_flash shows it)")
    else:
        print(f"not in force here: auto reads the tune directory or SDPA_FLASH_TABLE; run with "
              f"SDPA_FLASH_TABLE={table.path} to use this file")
    return 0 if table.rules else 1
