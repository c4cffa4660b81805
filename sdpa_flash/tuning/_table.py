"""Tuned tables: the file format and its key, reading with validation, atomic writing, and the tables in force.

A table is what ``python -m sdpa_flash tune`` measured on one machine, as ranking rules (one per measured class of
calls) with the raw measurements behind them. The file (JSON, ``"format": 2``)::

    {"format": 2,
     "key": {"device_type": "cuda", "name": "NVIDIA H200", "compute_capability": [9, 0], "torch": "2.11.0",
             "cuda": "13.0", "hip": null, "cudnn": "9.19.0", "kernels": {"fa4": "4.0.0b36"}, "sdpa_flash": "0.1.0"},
     "run": {"command": "python -m sdpa_flash tune --quick", "mode": "quick", "seed": null, "rounds": 5,
             "date": "2026-12-07T10:02:11Z", "duration_s": 95.2, "host": "gpu-node-3"},
     "rules": [{"order": ["cudnn", "fa4", ...], "evidence": "tuned 2026-12-07: cudnn 0.41 ms, ...",
                "device_type": "cuda", "rocm": false, "head_dim": [65, 128], "seqlen_q": [257, 1024], ...,
                "aligned": null, "failed": {}, "refused": {"chunked": "..."}}],
     "measurements": [{"class": "...", "backend": "cudnn", "status": "measured", "median_ms": 0.41, ...}]}

Which tables count (:func:`tables_for`): a *user* table whose key is this machine's exactly (GPU, compute
capability, torch, CUDA, cuDNN, kernel packages, sdpa_flash), from ``$SDPA_FLASH_TABLE`` when set, else from the
tune directory (``$SDPA_FLASH_TUNE_DIR``, else ``$XDG_CACHE_HOME/sdpa_flash/tuned`` or
``~/.cache/sdpa_flash/tuned``); then a *shipped* table (package data, ``sdpa_flash/tables/``) of the same GPU name
and compute capability, whatever versions it was measured with. Any other file named for this device is ignored
with one :class:`~sdpa_flash.errors.TunedTableWarning`: corrupt, another format, another GPU, or stale (measured
with other versions; ``python -m sdpa_flash tune`` measures again). Files are read once per device and process
(again after ``_caches.clear_all()``), never per call.

This module is what the planner imports: reading only, no timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import _caches
from .._rules import RankingRule
from ..backends import BACKENDS
from ..capability import Capabilities
from ..errors import TunedTableError, TunedTableWarning
from ..spec import FLOAT_DTYPES, AttentionSpec, cudnn_release, dtype_name

__all__ = [
    "BUILTIN_SOURCE",
    "ENV_DIR",
    "ENV_TABLE",
    "FORMAT",
    "TablesInForce",
    "TunedTable",
    "default_dir",
    "machine_key",
    "read_table",
    "suspended",
    "table_filename",
    "tables_for",
]

FORMAT = 2
"""The version of the file format this sdpa_flash writes (2: rules have ``aligned``)."""
READS = (1, 2)
"""The versions it reads: a format-1 table's rules have no ``aligned`` (each covers both kinds of key length)."""

ENV_DIR = "SDPA_FLASH_TUNE_DIR"
ENV_TABLE = "SDPA_FLASH_TABLE"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tables"
BUILTIN_SOURCE = "built-in rules (sdpa_flash/_ranking.py)"
REFRESH = "python -m sdpa_flash tune"

MODES = ("quick", "full", "model")
ENTRIES = ("dense", "packed")
STATUSES = ("measured", "refused", "failed")
MAX_LEN = 2**31 - 1
_DEVICE_TYPES = ("cuda", "cpu", "mps", "xpu")
_DTYPES = {dtype_name(d): d for d in FLOAT_DTYPES}


# ------------------------------------------------------------------------------------------------ the key
@functools.cache
def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def device_name(caps: Capabilities) -> str:
    """The device's name in a table's key: the GPU's (``"NVIDIA H200"``); a probed CPU's model (``"cpu: AMD EPYC
    9654 96-Core Processor"``), so a table measured on one CPU is not taken for another's."""
    if caps.device_type == "cpu" and caps.probed:
        return f"cpu: {_cpu_model()}"
    return caps.name or caps.device_type


def machine_key(caps: Capabilities) -> dict[str, Any]:
    """What a table measured on ``caps`` is keyed by: the device and every version that can change a timing."""
    from .. import __version__

    cc = caps.compute_capability
    return {
        "device_type": caps.device_type,
        "name": device_name(caps),
        "compute_capability": list(cc) if cc is not None else None,
        "torch": caps.torch_version,
        "cuda": caps.cuda_version,
        "hip": caps.hip_version,
        "cudnn": cudnn_release(caps.cudnn_version) if caps.cudnn_version is not None else None,
        "kernels": dict(caps.kernels),
        "sdpa_flash": __version__,
    }


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "device"


def table_filename(key: Mapping[str, Any]) -> str:
    """``nvidia-h200-3f2a9c01de.json``: the device's name, then a short hash of the whole key (one file per
    machine configuration; a new torch gets a new file)."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:10]
    return f"{_slug(key['name'])}-{digest}.json"


def default_dir() -> Path:
    """Where ``tune()`` writes and the planner looks: ``$SDPA_FLASH_TUNE_DIR``, else ``$XDG_CACHE_HOME/sdpa_flash/
    tuned``, else ``~/.cache/sdpa_flash/tuned``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sdpa_flash" / "tuned"


def _device_difference(key: Mapping[str, Any], ours: Mapping[str, Any]) -> str | None:
    """Why a table keyed ``key`` is for another device than ``ours`` (``None``: the same device)."""
    def what(k: Mapping[str, Any]) -> str:
        cc = k["compute_capability"]
        return f"{k['name']}" + (f" (compute capability {cc[0]}.{cc[1]})" if cc else f" ({k['device_type']})")

    same = all(key[f] == ours[f] for f in ("device_type", "name", "compute_capability"))
    return None if same else f"measured on {what(key)}, this is {what(ours)}"


_VERSIONS = (("torch", "torch"), ("cuda", "CUDA"), ("hip", "HIP"), ("cudnn", "cuDNN"), ("sdpa_flash", "sdpa_flash"))


def _version_differences(key: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """``["measured with torch 2.11.0, this is 2.13.0", ...]``: each version that differs."""
    out = [f"measured with {label} {key[f] or 'none'}, this is {ours[f] or 'none'}"
           for f, label in _VERSIONS if key[f] != ours[f]]
    for name in sorted(set(key["kernels"]) | set(ours["kernels"])):
        theirs, mine = key["kernels"].get(name), ours["kernels"].get(name)
        if theirs != mine:
            out.append(f"measured with {name} {theirs or 'not installed'}, this has {mine or 'it not installed'}")
    return out


# --------------------------------------------------------------------------------------------- validation
class _Checker:
    """Type and range checks that raise :class:`TunedTableError` naming the file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str, expected: str, got: object) -> NoReturn:
        shown = repr(got)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise TunedTableError(f"{self.where}: Expected {what} to be {expected}, but got {shown} instead.")

    def obj(self, value: object, what: str, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(what, "an object", value)
        unknown = sorted(set(value) - set(keys) - set(optional))
        if unknown:
            self.fail(f"the keys of {what}", f"among {', '.join(keys)}", unknown[0])
        missing = [k for k in keys if k not in value]
        if missing:
            self.fail(f"{what}.{missing[0]}", "present", None)
        return value

    def text(self, value: object, what: str, none: bool = False) -> str | None:
        if (value is None and none) or (isinstance(value, str) and value):
            return value
        self.fail(what, "a non-empty string" + (" or null" if none else ""), value)

    def integer(self, value: object, what: str, lo: int = 0, hi: int = MAX_LEN, none: bool = False) -> int | None:
        if value is None and none:
            return None
        if type(value) is not int or not lo <= value <= hi:
            self.fail(what, f"an integer in [{lo}, {hi}]" + (" or null" if none else ""), value)
        return value

    def number(self, value: object, what: str, none: bool = False) -> float | None:
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            self.fail(what, "a finite number >= 0" + (" or null" if none else ""), value)
        return float(value)

    def flag(self, value: object, what: str, none: bool = False) -> bool | None:
        if (value is None and none) or isinstance(value, bool):
            return value
        self.fail(what, "true or false" + (" or null" if none else ""), value)

    def choice(self, value: object, what: str, choices: Sequence[object]) -> Any:
        if value not in choices:
            self.fail(what, f"one of {', '.join(map(str, choices))}", value)
        return value

    def bounds(self, value: object, what: str) -> tuple[int, int] | None:
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == 2 and all(type(x) is int for x in value)
                and 0 <= value[0] <= value[1] <= MAX_LEN):
            self.fail(what, f"null or [low, high] with 0 <= low <= high <= {MAX_LEN}", value)
        return value[0], value[1]

    def backend(self, value: object, what: str) -> str:
        return str(self.choice(value, what, sorted(BACKENDS)))

    def reasons(self, value: object, what: str) -> dict[str, str]:
        if not isinstance(value, dict):
            self.fail(what, "an object of backend: reason", value)
        for name, why in value.items():
            self.backend(name, f"a backend of {what}")
            self.text(why, f"{what}.{name}")
        return value

    def dtype(self, value: object, what: str, none: bool = False) -> torch.dtype | None:
        if value is None and none:
            return None
        return _DTYPES[self.choice(value, what, sorted(_DTYPES))]


_KEY_FIELDS = ("device_type", "name", "compute_capability", "torch", "cuda", "hip", "cudnn", "kernels", "sdpa_flash")
_RUN_FIELDS = ("command", "mode", "seed", "rounds", "date", "duration_s", "host")
_RULE_FIELDS = ("order", "evidence", "device_type", "rocm", "head_dim", "seqlen_q", "seqlen_k", "training", "gqa",
                "causal", "aligned", "dtype", "entry", "failed", "refused")
_ROW_FIELDS = ("class", "backend", "status", "reason", "shape", "lengths", "dtype", "causal", "training", "entry",
               "median_ms", "min_ms", "max_ms", "samples_ms", "calls_per_sample", "first_call_s")


def _check_key(c: _Checker, key: object) -> dict[str, Any]:
    k = c.obj(key, "key", _KEY_FIELDS)
    c.choice(k["device_type"], "key.device_type", _DEVICE_TYPES)
    c.text(k["name"], "key.name")
    cc = k["compute_capability"]
    if cc is not None and not (isinstance(cc, list) and len(cc) == 2 and all(type(x) is int and x >= 0 for x in cc)):
        c.fail("key.compute_capability", "null or [major, minor]", cc)
    c.text(k["torch"], "key.torch")
    for field in ("cuda", "hip", "cudnn"):
        c.text(k[field], f"key.{field}", none=True)
    if k["cudnn"] is not None and not re.fullmatch(r"\d+\.\d+\.\d+", k["cudnn"]):
        c.fail("key.cudnn", "null or a release such as '9.19.0'", k["cudnn"])
    if not isinstance(k["kernels"], dict):
        c.fail("key.kernels", "an object of backend: version", k["kernels"])
    for name, version in k["kernels"].items():
        c.backend(name, "a backend of key.kernels")
        c.text(version, f"key.kernels.{name}")
    c.text(k["sdpa_flash"], "key.sdpa_flash")
    return k


def _check_run(c: _Checker, run: object) -> dict[str, Any]:
    r = c.obj(run, "run", _RUN_FIELDS)
    c.text(r["command"], "run.command")
    c.choice(r["mode"], "run.mode", MODES)
    c.integer(r["seed"], "run.seed", 0, 2**63 - 1, none=True)
    c.integer(r["rounds"], "run.rounds", 1, 10**6)
    try:
        datetime.datetime.fromisoformat(str(c.text(r["date"], "run.date")).replace("Z", "+00:00"))
    except ValueError:
        c.fail("run.date", "an ISO 8601 date such as '2026-12-07T10:02:11Z'", r["date"])
    c.number(r["duration_s"], "run.duration_s")
    c.text(r["host"], "run.host")
    return r


def _check_rule(c: _Checker, value: object, what: str, fmt: int = FORMAT) -> tuple[RankingRule, dict[str, str]]:
    d = c.obj(value, what, _RULE_FIELDS if fmt >= 2 else tuple(f for f in _RULE_FIELDS if f != "aligned"))
    order = d["order"]
    if not (isinstance(order, list) and order and len(set(order)) == len(order)):
        c.fail(f"{what}.order", "a non-empty list of distinct backend names", order)
    for name in order:
        c.backend(name, f"a backend of {what}.order")
    rule = RankingRule(
        device_type=c.choice(d["device_type"], f"{what}.device_type", _DEVICE_TYPES),
        order=tuple(order),
        evidence=str(c.text(d["evidence"], f"{what}.evidence")),
        rocm=bool(c.flag(d["rocm"], f"{what}.rocm")),
        head_dim=c.bounds(d["head_dim"], f"{what}.head_dim"),
        seqlen_q=c.bounds(d["seqlen_q"], f"{what}.seqlen_q"),
        seqlen_k=c.bounds(d["seqlen_k"], f"{what}.seqlen_k"),
        training=c.flag(d["training"], f"{what}.training", none=True),
        gqa=c.flag(d["gqa"], f"{what}.gqa", none=True),
        causal=c.flag(d["causal"], f"{what}.causal", none=True),
        aligned=c.flag(d["aligned"], f"{what}.aligned", none=True) if fmt >= 2 else None,
        dtype=c.dtype(d["dtype"], f"{what}.dtype", none=True),
        entry=c.choice(d["entry"], f"{what}.entry", ENTRIES),
        failed=tuple(sorted(c.reasons(d["failed"], f"{what}.failed").items())),
    )
    return rule, c.reasons(d["refused"], f"{what}.refused")


def _check_row(c: _Checker, value: object, what: str) -> dict[str, Any]:
    r = c.obj(value, what, _ROW_FIELDS)
    c.text(r["class"], f"{what}.class")
    c.backend(r["backend"], f"{what}.backend")
    status = c.choice(r["status"], f"{what}.status", STATUSES)
    c.text(r["reason"], f"{what}.reason", none=status == "measured")
    shape = r["shape"]
    if not (isinstance(shape, list) and len(shape) == 7 and all(type(x) is int and x >= 0 for x in shape)):
        c.fail(f"{what}.shape", "[B, Hq, Hkv, Sq, Sk, D, Dv]", shape)
    lengths = r["lengths"]
    if lengths is not None and not (isinstance(lengths, list) and all(type(x) is int and x > 0 for x in lengths)):
        c.fail(f"{what}.lengths", "null or a list of sequence lengths", lengths)
    c.dtype(r["dtype"], f"{what}.dtype")
    c.flag(r["causal"], f"{what}.causal")
    c.flag(r["training"], f"{what}.training")
    c.choice(r["entry"], f"{what}.entry", ENTRIES)
    timed = status == "measured"
    for field in ("median_ms", "min_ms", "max_ms"):
        c.number(r[field], f"{what}.{field}", none=not timed)
    samples = r["samples_ms"]
    if not (samples is None or (isinstance(samples, list) and samples)) or (timed and samples is None):
        c.fail(f"{what}.samples_ms", "a non-empty list of times" + ("" if timed else " or null"), samples)
    for i, x in enumerate(samples or ()):
        c.number(x, f"{what}.samples_ms[{i}]")
    c.integer(r["calls_per_sample"], f"{what}.calls_per_sample", 1, none=not timed)
    c.number(r["first_call_s"], f"{what}.first_call_s", none=True)
    return r


# ------------------------------------------------------------------------------------------------- tables
@dataclasses.dataclass(frozen=True, eq=False)
class TunedTable:
    """One tuned table: the machine it was measured on, the run, its rules and the measurements behind them.

    Attributes:
        key: the machine (see :func:`machine_key`): device, compute capability, torch, CUDA, cuDNN, kernel packages,
            sdpa_flash.
        run: how it was measured: ``command``, ``mode`` (``quick``, ``full``, ``model``), ``seed``, ``rounds``,
            ``date`` (UTC, ISO 8601), ``duration_s``, ``host``.
        rules: one :class:`~sdpa_flash.planner.RankingRule` per measured class of calls; the first that matches a
            call decides (the classes do not overlap).
        refused: per rule, the backends that could not run its class and why (they stand last in its order).
        measurements: the raw rows, one per class and backend: ``status`` (``measured``, ``refused``, ``failed``),
            ``median_ms`` with ``min_ms`` / ``max_ms`` over the rounds, ``samples_ms``, ``first_call_s`` (the first
            call, compile included: never part of a timing), ``reason``.
        path: the file it was read from or written to (``None`` for a table not on disk).
    """

    key: Mapping[str, Any]
    run: Mapping[str, Any]
    rules: tuple[RankingRule, ...]
    refused: tuple[Mapping[str, str], ...]
    measurements: tuple[Mapping[str, Any], ...]
    path: str | None = None

    def rule_for(self, caps: Capabilities, spec: AttentionSpec, entry: str = "dense") -> RankingRule | None:
        """The first rule that matches the call (``None``: the table has no measurement for its class)."""
        for rule in self.rules:
            if rule.matches(caps, spec, entry):
                return rule
        return None

    @property
    def skipped(self) -> dict[str, dict[str, str]]:
        """The classes no backend could run here (no rule came of them), each with every backend's reason: on a
        CPU, the packed classes (no backend has a packed kernel there)."""
        out: dict[str, dict[str, str]] = {}
        measured = {r["class"] for r in self.measurements if r["status"] == "measured"}
        for r in self.measurements:
            if r["class"] not in measured:
                out.setdefault(r["class"], {})[r["backend"]] = r["reason"]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The file's content (``json.dump`` it, or use :meth:`write`)."""
        return {"format": FORMAT, "key": dict(self.key), "run": dict(self.run),
                "rules": [_rule_dict(r, refused) for r, refused in zip(self.rules, self.refused, strict=True)],
                "measurements": [dict(m) for m in self.measurements]}

    @classmethod
    def from_dict(cls, data: object, *, path: str | None = None) -> TunedTable:
        """Validate ``data`` (a parsed file) and build the table.

        Raises:
            TunedTableError: another format version, or any missing, unknown or ill-typed field, naming it.
        """
        c = _Checker(path or "tuned table")
        if not isinstance(data, dict):
            c.fail("the file", "a JSON object", type(data).__name__)
        fmt = data.get("format")
        if fmt not in READS:
            raise TunedTableError(f"{c.where}: format {fmt!r}, but this sdpa_flash reads formats "
                                  f"{', '.join(map(str, READS))}; run `{REFRESH}` to measure again.")
        c.obj(data, "the file", ("format", "key", "run", "rules", "measurements"))
        key = _check_key(c, data["key"])
        run = _check_run(c, data["run"])
        if not isinstance(data["rules"], list):
            c.fail("rules", "a list", data["rules"])
        if not isinstance(data["measurements"], list):
            c.fail("measurements", "a list", data["measurements"])
        checked = [_check_rule(c, r, f"rules[{i}]", fmt) for i, r in enumerate(data["rules"])]
        for i, (rule, _) in enumerate(checked):
            if rule.device_type != key["device_type"]:
                c.fail(f"rules[{i}].device_type", f"the key's {key['device_type']!r}", rule.device_type)
        rows = tuple(_check_row(c, r, f"measurements[{i}]") for i, r in enumerate(data["measurements"]))
        return cls(key, run, tuple(r for r, _ in checked), tuple(f for _, f in checked), rows, path)

    def write(self, path: str | os.PathLike[str]) -> TunedTable:
        """Write the table to ``path`` atomically (a temporary file in the same directory, then ``os.replace``: a
        reader sees the old file or the new one, never a part), creating the directory. Returns the table with its
        ``path`` set."""
        data = self.to_dict()
        TunedTable.from_dict(json.loads(json.dumps(data)), path=str(path))  # what is written reads back
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(_dumps(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return dataclasses.replace(self, path=str(target))


def _dumps(data: Mapping[str, Any]) -> str:
    """JSON with one line per rule and per measurement (a table reads, and diffs, line by line)."""
    parts = []
    for name, value in data.items():
        if isinstance(value, list):
            items = ",\n  ".join(json.dumps(v) for v in value)
            parts.append(f"{json.dumps(name)}: [\n  {items}\n ]" if value else f"{json.dumps(name)}: []")
        else:
            parts.append(f"{json.dumps(name)}: {json.dumps(value)}")
    return "{" + ",\n ".join(parts) + "}\n"


def _rule_dict(rule: RankingRule, refused: Mapping[str, str]) -> dict[str, Any]:
    def rng(r: tuple[int, int] | None) -> list[int] | None:
        return None if r is None else list(r)

    return {"order": list(rule.order), "evidence": rule.evidence, "device_type": rule.device_type, "rocm": rule.rocm,
            "head_dim": rng(rule.head_dim), "seqlen_q": rng(rule.seqlen_q), "seqlen_k": rng(rule.seqlen_k),
            "training": rule.training, "gqa": rule.gqa, "causal": rule.causal, "aligned": rule.aligned,
            "dtype": None if rule.dtype is None else dtype_name(rule.dtype), "entry": rule.entry,
            "failed": dict(rule.failed), "refused": dict(refused)}


def read_table(path: str | os.PathLike[str]) -> TunedTable:
    """Read and validate a table file.

    Raises:
        TunedTableError: the file cannot be read, is not JSON (a truncated or hand-edited file), or is not a valid
            table (see :meth:`TunedTable.from_dict`).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TunedTableError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TunedTableError(f"{path}: not valid JSON ({exc}); delete it or run `{REFRESH}` again.") from None
    return TunedTable.from_dict(data, path=str(path))


# ------------------------------------------------------------------------------------------ tables in force
@dataclasses.dataclass(frozen=True)
class TablesInForce:
    """The tuned tables the planner consults for one device, and the files it found and ignored.

    Attributes:
        user: the table measured on this machine, its key this machine's exactly (``None``: none found).
        shipped: the table shipped with sdpa_flash for this GPU (``None``: none).
        stale: ``(path, why)`` for each table of this device measured with other versions (``why``: ``"measured with
            torch 2.11.0, this is 2.13.0"``); ``python -m sdpa_flash tune`` replaces it.
        rejected: ``(path, why)`` for each other file found and ignored (corrupt, another format, another device).
    """

    user: TunedTable | None = None
    shipped: TunedTable | None = None
    stale: tuple[tuple[str, str], ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    shipped_differences: tuple[str, ...] = ()

    @property
    def tables(self) -> tuple[TunedTable, ...]:
        """The tables in order of precedence: this machine's, then the shipped one."""
        return tuple(t for t in (self.user, self.shipped) if t is not None)

    def source(self, table: TunedTable | None) -> str:
        """One line naming where a rule comes from: the table's file and how it was measured."""
        if table is None:
            return BUILTIN_SOURCE
        when = f"{table.run['mode']} run of {str(table.run['date'])[:10]}"
        if table is self.user:
            return f"tuned table {table.path} (measured on this machine, {when})"
        diffs = "; ".join(self.shipped_differences) or "the same versions as this machine"
        return f"shipped table sdpa_flash/tables/{Path(table.path or '').name} ({table.key['name']}, {when}; {diffs})"

    @property
    def in_force(self) -> str:
        """The source of the first table in force, or the built-in rules."""
        return self.source(self.tables[0] if self.tables else None)


_suspended = 0


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No tuned table is in force inside (``tune()`` measures with the built-in rules only, so an old table's
    recorded failures do not keep a backend from being measured again); plans are made afresh on entry and exit."""
    global _suspended
    _suspended += 1
    _caches.clear_all()
    try:
        yield
    finally:
        _suspended -= 1
        _caches.clear_all()


def tables_for(caps: Capabilities) -> TablesInForce:
    """The tuned tables in force for ``caps`` (read once, then cached until ``_caches.clear_all()``).

    A constructed profile (``caps.probed`` false: ``Capabilities.synthetic``) reads the user tables only from a
    location named explicitly (``SDPA_FLASH_TABLE`` or ``SDPA_FLASH_TUNE_DIR``), never from the default cache
    directory.
    """
    if _suspended:
        return TablesInForce()
    forced = os.environ.get(ENV_TABLE) or None
    user_dir = None
    if forced is None and (caps.probed or os.environ.get(ENV_DIR)):
        user_dir = str(default_dir())
    return _load(caps, forced, user_dir, str(SHIPPED_DIR))


_warned: set[tuple[str, str]] = set()


def _warn(path: str, message: str) -> None:
    """One warning per file and problem per process (a cache clear re-reads the file but does not repeat it)."""
    if (path, message) in _warned:
        return
    _warned.add((path, message))
    warnings.warn(message, TunedTableWarning, stacklevel=3)


def _named_for(directory: str, key: Mapping[str, Any]) -> list[Path]:
    """The table files in ``directory`` named for the device of ``key`` (temporary files of a writer excluded)."""
    prefix = _slug(key["name"]) + "-"
    with contextlib.suppress(OSError):
        return sorted(p for p in Path(directory).iterdir() if p.name.startswith(prefix) and p.suffix == ".json")
    return []


@functools.lru_cache(maxsize=64)
def _load(caps: Capabilities, forced: str | None, user_dir: str | None, shipped_dir: str) -> TablesInForce:
    ours = machine_key(caps)
    stale: list[tuple[str, str]] = []
    rejected: list[tuple[str, str]] = []

    def read(paths: Sequence[Path | str], kind: str) -> list[tuple[TunedTable, list[str]]]:
        out = []
        for path in paths:
            try:
                table = read_table(path)
            except TunedTableError as exc:
                rejected.append((str(path), str(exc)))
                _warn(str(path), f"sdpa_flash ignores the {kind} table {exc}")
                continue
            foreign = _device_difference(table.key, ours)
            if foreign is not None:
                rejected.append((str(path), foreign))
                _warn(str(path), f"sdpa_flash ignores the {kind} table {path}: {foreign}.")
                continue
            out.append((table, _version_differences(table.key, ours)))
        return out

    exact = []
    user_paths: Sequence[Path | str] = [forced] if forced else _named_for(user_dir, ours) if user_dir else []
    for table, diffs in read(user_paths, "tuned"):
        if diffs:
            why = "; ".join(diffs)
            stale.append((str(table.path), why))
            _warn(str(table.path), f"sdpa_flash ignores the tuned table {table.path}: it is stale ({why}); "
                                   f"`{REFRESH}` measures this machine again.")
        else:
            exact.append(table)
    user = max(exact, key=lambda t: (t.run["date"], t.path or "")) if exact else None
    shipped = read(_named_for(shipped_dir, ours), "shipped")
    best = max(shipped, key=lambda c: (-len(c[1]), c[0].run["date"])) if shipped else None
    return TablesInForce(user, best[0] if best else None, tuple(stale), tuple(rejected),
                         tuple(best[1]) if best else ())


_caches.register("tuning.tables", _load.cache_clear)
