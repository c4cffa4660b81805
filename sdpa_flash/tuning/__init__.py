"""Ranked on your own machine: ``tune()`` / ``python -m sdpa_flash tune`` time every backend on each class of calls
and write a table that ``auto`` then ranks by.

The planner consults, in order: a table tuned on this machine (its key this machine's exactly: GPU, compute
capability, torch, CUDA, cuDNN, kernel packages, sdpa_flash), a table shipped with sdpa_flash for this GPU
(``sdpa_flash/tables/``; measured with other versions, which ``explain()`` says), then the built-in rules. Within a
table the rule of the call's class decides; a call of a class the table did not measure goes on to the next.

Importing this package is cheap (the planner imports the table reader from it); the timing code is imported when
``tune()`` runs.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _caches
from ..errors import AttentionInputError
from ._table import (
    TablesInForce,
    TunedTable,
    default_dir,
    machine_key,
    read_table,
    table_filename,
    tables_for,
)

__all__ = ["TablesInForce", "TunedTable", "default_dir", "read_table", "tables_for", "tune"]

DEFAULT_ROUNDS = {"quick": 5, "full": 7, "model": 7}


def tune(
    *,
    quick: bool = False,
    configs: Sequence[Mapping[str, Any]] | None = None,
    device: torch.device | str | int | None = None,
    rounds: int | None = None,
    seed: int | None = None,
    out: str | os.PathLike[str] | None = None,
    write: bool = True,
    progress: Callable[[str], None] | None = None,
    dtypes: Sequence[torch.dtype | str] | None = None,
) -> TunedTable:
    """Time every backend that can run each class of calls on this device, and write the ranking table.

    For each class (dtype, head-dim range, query and key length ranges, forward or training, causal, GQA, dense or
    packed) one representative call is timed on every backend that can run it, through ``attention(...,
    policy=[name])`` (packed classes: each backend's packed ``cu_seqlens`` kernel), forward or forward+backward:
    first one call on its own (compilation: ``first_call_s``), then interleaved rounds. The class's rule orders the
    measured backends by median time (fused kernels first), then the rest with their reasons. A backend that raises
    is recorded with the error, and the planner then refuses it on that class. Nothing is asserted about speed: the
    table is what this machine measured.

    Args:
        quick: the small grid (about 19 classes in one dtype on a GPU: a minute or two; seconds on a CPU) instead of
            the full one (both half-precision dtypes on a GPU).
        configs: measure exactly these configurations instead, each a dict of :func:`sdpa_flash.warmup`'s keywords
            (``heads``, ``kv_heads``, ``head_dim``, ``head_dim_v``, ``seqlen``, ``seqlen_k``, ``batch``, ``causal``,
            ``training``, ``varlen``, ``dtype``).
        device: the device (default: the current CUDA device, else the CPU).
        rounds: interleaved rounds per backend (default 5 quick, 7 otherwise).
        seed: draw each class's shape inside the class with this seed (default: each class's usual shape); another
            seed measures other points of the same classes.
        out: the file to write, or a directory to write it in under its usual name (default: the tune directory,
            ``$SDPA_FLASH_TUNE_DIR`` or ``~/.cache/sdpa_flash/tuned/``, a name derived from this machine's key:
            where the planner finds it).
        write: write the file (plans are then made afresh, so the next call uses it).
        progress: called with one line per class as it is measured (the command line prints them).
        dtypes: measure the grid in these dtypes only (``torch.bfloat16`` or ``"bfloat16"``; default: bfloat16,
            and float16 too in a full run, on a GPU that has bfloat16). Not with ``configs``, whose entries name
            their own dtype.

    Returns:
        The :class:`TunedTable` (``path`` set when written).

    Raises:
        AttentionInputError: a bad argument or configuration.
    """
    args = [f"quick={quick!r}"] if quick else []
    args += [f"{k}={v!r}" for k, v in (("configs", configs), ("rounds", rounds), ("seed", seed), ("dtypes", dtypes))
             if v is not None]
    return run_tune(quick=quick, configs=configs, device=device, rounds=rounds, seed=seed, out=out, write=write,
                    progress=progress, command=f"sdpa_flash.tune({', '.join(args)})", dtypes=dtypes)


def run_tune(*, quick: bool, configs: Sequence[Mapping[str, Any]] | None, device: torch.device | str | int | None,
             rounds: int | None, seed: int | None, out: str | os.PathLike[str] | None, write: bool,
             progress: Callable[[str], None] | None, command: str,
             dtypes: Sequence[torch.dtype | str] | None = None) -> TunedTable:
    """:func:`tune`, with the command line to record (the command line's entry point)."""
    from ..capability import capabilities
    from ._grid import from_configs, grid
    from ._measure import measure

    if quick and configs is not None:
        raise AttentionInputError("Expected either quick=True or configs=..., but got both instead (configs are "
                                  "measured exactly as given).")
    for name, value, lo, hi in (("rounds", rounds, 1, 10**6), ("seed", seed, 0, 2**63 - 1)):
        if value is not None and (type(value) is not int or not lo <= value <= hi):
            raise AttentionInputError(f"Expected {name} to be None or an int in [{lo}, {hi}], but got {value!r} "
                                      "instead.")
    if dtypes is not None and configs is not None:
        raise AttentionInputError("Expected either dtypes=... or configs=..., but got both instead (each "
                                  "configuration names its own dtype).")
    wanted = None if dtypes is None else _dtypes(dtypes)
    caps = capabilities(device)
    dev = torch.device(caps.device_type, caps.device_index)  # type: ignore[arg-type]  # index None works; stubs say int
    mode = "model" if configs is not None else "quick" if quick else "full"
    classes = from_configs(configs, caps) if configs is not None else grid(caps, quick=quick, seed=seed,
                                                                                   dtypes=wanted)
    n = rounds or DEFAULT_ROUNDS[mode]
    started, clock = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    rules, refused, rows = measure(classes, caps, dev, rounds=n, date=started.strftime("%Y-%m-%d"), progress=progress)
    key = machine_key(caps)
    run = {"command": command, "mode": mode, "seed": seed, "rounds": n,
           "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "duration_s": round(time.monotonic() - clock, 3),
           "host": platform.node() or "unknown"}
    table = TunedTable(key, run, tuple(rules), tuple(refused), tuple(rows))
    if write:
        target = Path(out).expanduser() if out is not None else default_dir()
        if out is None or target.is_dir() or str(out).endswith(("/", os.sep)):
            target = target / table_filename(key)
        table = table.write(target)
        _caches.clear_all()  # the next plan reads the tables again
    return table


def _dtypes(dtypes: Sequence[torch.dtype | str]) -> tuple[torch.dtype, ...]:
    """``dtypes`` as torch dtypes, each named as a model configuration's ``dtype`` may be."""
    from ._grid import parse_dtype

    out = [parse_dtype(d, f"dtypes[{i}]") for i, d in enumerate([dtypes] if isinstance(dtypes, (str, torch.dtype))
                                                                else dtypes)]
    if not out:
        raise AttentionInputError("Expected dtypes to name at least one dtype, but got none instead.")
    return tuple(dict.fromkeys(out))
