"""``python -m sdpa_flash`` (also ``sdpa-flash``): what this machine can run, and a self-check.

Paste its output into bug reports. ``--json`` gives the same as machine-readable data; ``--require POLICY``
exits with status 1 and the reasons when that policy (or backend) cannot run on the current CUDA GPU (or on
``--device``; ``--device cpu`` checks the CPU) — a startup check for jobs.
``python -m sdpa_flash bench ...`` runs the benchmarks (:mod:`sdpa_flash.bench`; ``bench --help``);
``python -m sdpa_flash tune`` measures this machine and writes the ranking table ``auto`` uses
(:mod:`sdpa_flash.tuning`; ``tune --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

import torch

from . import __version__
from ._tolerance import K
from .attention import attention
from .backends import BACKENDS
from .capability import TORCH_FEATURE_APIS, Capabilities, capabilities, format_cudnn_version, torch_features
from .errors import BackendUnavailableError, SdpaFlashError
from .planner import denylist, ranking
from .policy import get_policy, resolve_policy
from .require import parse_device, require
from .spec import AttentionSpec
from .testing import compare_to_reference, reference_attention
from .testing._compare import _LEGACY_FLOOR_ULPS as _FLOOR_ULPS
from .tuning import tables_for

__all__ = ["main", "report", "self_check"]


def _default_dtype(caps: Capabilities) -> torch.dtype:
    if caps.device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if (caps.compute_capability or (0, 0)) >= (8, 0) else torch.float16


def _policy_source() -> str:
    if os.environ.get("SDPA_FLASH_POLICY") or os.environ.get("SDPA_FLASH_FALLBACK"):
        return (f"environment: SDPA_FLASH_POLICY={os.environ.get('SDPA_FLASH_POLICY', '')!r} "
                f"SDPA_FLASH_FALLBACK={os.environ.get('SDPA_FLASH_FALLBACK', '')!r}")
    return "default"


def self_check(device: torch.device, dtype: torch.dtype, *, seed: int = 0) -> list[dict[str, Any]]:
    """Run every backend that can run here on small random inputs, forward and backward, against float64 math.

    Two cases per backend: (2, 8, 256, 64) non-causal, and causal GQA with 2 key/value heads.
    """
    rows: list[dict[str, Any]] = []
    for causal, kv_heads in ((False, 8), (True, 2)):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shapes = ((2, 8, 256, 64), (2, kv_heads, 256, 64), (2, kv_heads, 256, 64))
        base = [torch.randn(s, generator=gen, dtype=torch.float32) for s in shapes]
        grad_out = torch.randn(2, 8, 256, 64, generator=gen).to(device=device, dtype=dtype)
        leaves64 = [t.to(device=device, dtype=torch.float64).requires_grad_() for t in base]
        ref = reference_attention(*leaves64, causal=causal)
        ref_grads = torch.autograd.grad(ref, leaves64, grad_out.to(torch.float64))
        same = [t.to(device=device, dtype=dtype).requires_grad_() for t in base]
        same_out = reference_attention(*same, causal=causal, dtype=None)
        same_grads = torch.autograd.grad(same_out, same, grad_out)
        case = f"{'causal GQA 8/2' if causal else 'non-causal'} {tuple(shapes[0])}"
        for name in BACKENDS:
            row: dict[str, Any] = {"backend": name, "case": case, "dtype": str(dtype).removeprefix("torch.")}
            backend = BACKENDS[name]
            if not backend.TUNED and torch.device(device).type in backend.REQUIREMENTS:  # (Flex: compiles)
                row.update(status="SKIP", reasons=["runs only what no kernel above it takes (softcap, float32 "
                                                   "windows), compiled per call structure: not checked here; "
                                                   f"policy={name!r} runs it"])
                rows.append(row)
                continue
            leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in base]
            try:
                out = attention(*leaves, causal=causal, policy=name)
            except BackendUnavailableError as exc:
                row.update(status="SKIP", reasons=[r for rs in exc.reasons.values() for r in rs])
                rows.append(row)
                continue
            grads = torch.autograd.grad(out, leaves, grad_out)
            comps = [
                compare_to_reference(c, s, r, name=n)
                for c, s, r, n in zip((out, *grads), (same_out, *same_grads), (ref, *ref_grads),
                                      ("out", "dq", "dk", "dv"), strict=True)
            ]
            row.update(
                status="PASS" if all(c.passed for c in comps) else "FAIL",
                errors={c.name: {"error": c.error, "bound": c.bound, "ratio": c.ratio,
                                 "floor": c.bound - K * c.reference_error} for c in comps},
            )
            rows.append(row)
    return rows


def report(device: str | None = None, *, check: bool = True) -> dict[str, Any]:
    """Everything ``python -m sdpa_flash`` prints, as a dictionary."""
    caps = capabilities(device)
    # torch.device takes index None too (its stubs say int); for CUDA it is an int
    dev = (torch.device(caps.device_type, caps.device_index)  # type: ignore[arg-type]
           if caps.device_type == "cuda" else torch.device("cpu"))
    pol = get_policy()
    dtype = _default_dtype(caps)
    backends: dict[str, Any] = {}
    try:
        chosen = require(pol, dev, dtype=dtype)
    except BackendUnavailableError as exc:
        chosen = None
        backends_err = str(exc)
    else:
        backends_err = ""
    for name in BACKENDS:
        try:
            p = require(name, dev, dtype=dtype)
            backends[name] = {"available": True, "reasons": [], "notes": list(p.notes)}
        except BackendUnavailableError as exc:
            backends[name] = {"available": False, "reasons": list(exc.reasons.get(name, ()))}
    out: dict[str, Any] = {
        "sdpa_flash": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": {
            "type": caps.device_type, "index": caps.device_index, "name": caps.name, "arch": caps.arch,
            "compute_capability": caps.compute_capability, "sm_count": caps.sm_count,
            "total_memory_gib": round(caps.total_memory / 2**30, 1) if caps.total_memory else None,
            "flash_impl": caps.flash_impl,
        },
        "cuda_available": torch.cuda.is_available(),
        "policy": str(pol),
        "policy_source": _policy_source(),
        "ranking": {"order": list(ranking(caps).order), "evidence": ranking(caps).evidence},
        "tuned_table": tuned_report(caps),
        "probe_call": f"(1, 16, 1024, 128) {str(dtype).removeprefix('torch.')}, causal, with backward",
        "chosen": chosen.backend if chosen else None,
        "chosen_error": backends_err,
        "backends": backends,
        "denylist_entries_here": [e.describe() for e in denylist() if e.device_type == caps.device_type],
        "fa4": fa4_report(caps),
        "variants": variants_report(caps),
        "torch_features": torch_features().as_dict(),
        "torch_features_missing": list(torch_features().missing),
    }
    if check:
        out["self_check"] = self_check(dev, dtype)
    return out


def tuned_report(caps: Capabilities) -> dict[str, Any]:
    """Which ranking table is in force here (a table tuned on this machine, the one shipped for this GPU, or the
    built-in rules), and the tables found and ignored: stale ones (measured with other versions: which changed) and
    rejected ones (corrupt, another format or device)."""
    tables = tables_for(caps)
    first = tables.tables[0] if tables.tables else None
    return {
        "in_force": tables.in_force,
        "path": first.path if first else None,
        "rules": len(first.rules) if first else None,
        "user": tables.user.path if tables.user else None,
        "shipped": tables.shipped.path if tables.shipped else None,
        "stale": [{"path": path, "why": why} for path, why in tables.stale],
        "rejected": [{"path": path, "why": why} for path, why in tables.rejected],
        "refresh": "python -m sdpa_flash tune",
    }


def variants_report(caps: Capabilities) -> dict[str, dict[str, str]]:
    """Which backend on this device takes ``window`` / ``softcap`` / ``sinks``: ``native``, ``adapted`` (exactly,
    around the kernel: :attr:`Backend.ADAPTED`), ``as a mask`` (math's window) or absent; only backends available
    here."""
    out: dict[str, dict[str, str]] = {}
    for variant in ("window", "softcap", "sinks"):
        row = {}
        for name, backend in BACKENDS.items():
            req = backend.requirements(caps.device_type)
            if req is None or name not in caps.backends:
                continue
            if getattr(req, variant):
                row[name] = "adapted" if variant in backend.ADAPTED else "native"
            elif variant == "window" and req.mask and not backend.fused:
                row[name] = "as a mask"
        out[variant] = row
    return out


def fa4_report(caps: Capabilities) -> dict[str, Any]:
    """FlashAttention-4 here: installed or not, whether it imports, what it covers on this device, its cache."""
    import dataclasses

    from .backends import fa4

    out: dict[str, Any] = {"installed": caps.kernel_version("fa4"), "install": fa4.INSTALL_HINT}
    req = BACKENDS["fa4"].requirements(caps.device_type)
    if caps.kernel_version("fa4") is None:
        out["covers"] = "nothing: not installed"
    elif req is None or caps.compute_capability is None:
        out["covers"] = f"nothing on {caps.device_type}: FlashAttention-4 runs on NVIDIA sm90/sm100 GPUs"
    else:
        probe = AttentionSpec(caps.device_type, torch.bfloat16, 1, 16, 16, 1024, 1024, 128, 128, "top_left",
                              needs_grad=True)
        why = BACKENDS["fa4"].not_supported_reasons(probe, caps)
        if why:
            out["covers"] = f"nothing here: {why[0]}"
        else:
            hd = "8-256" if caps.compute_capability[0] == 9 else "8-128, (192, 128), (256, 256)"
            out["covers"] = (f"{caps.arch}: float16/bfloat16, head dims {hd} (multiples of 8; others zero-padded), "
                             "GQA, causal (bottom-right corner), forward and backward, packed varlen batches; no "
                             "dropout, no attn_mask")
        out["import_seconds"] = fa4.import_seconds
    out["cache"] = dataclasses.asdict(fa4.cache_info())
    return out


def _print(rep: dict[str, Any]) -> None:
    d = rep["device"]
    print(f"sdpa_flash {rep['sdpa_flash']}  torch {rep['torch']}  CUDA {rep['cuda']}  "
          f"cuDNN {format_cudnn_version(rep['cudnn'])}  Python {rep['python']}")
    desc = d["name"] if d["type"] != "cuda" else (
        f"{d['name']} ({d['arch']}, {d['sm_count']} SMs, {d['total_memory_gib']} GiB), flash impl: "
        f"{d['flash_impl'] or 'built-in FA2'}")
    print(f"device:  {desc}" + ("" if rep["cuda_available"] or d["type"] != "cpu" else "  (no CUDA device visible)"))
    print(f"policy:  {rep['policy']}  ({rep['policy_source']})")
    print(f"ranking: {' > '.join(rep['ranking']['order'])}  - {rep['ranking']['evidence']}")
    _print_tuned(rep["tuned_table"])
    print(f"backends for a probe call {rep['probe_call']}:")
    for name, b in rep["backends"].items():
        mark = " <- chosen by the policy" if name == rep["chosen"] else ""
        if b["available"]:
            extra = f"  ({'; '.join(b['notes'])})" if b["notes"] else ""
            print(f"  {name:<10} available{mark}{extra}")
        else:
            print(f"  {name:<10} unavailable: {'; '.join(b['reasons'])}")
    if rep["chosen_error"]:
        print("policy cannot run the probe call:\n" + rep["chosen_error"])
    f4 = rep["fa4"]
    cache = f4["cache"]
    where = (f"on, {cache['directory']} ({cache['entries']} kernels, {cache['bytes'] / 2**20:.1f} MiB)"
             if cache["enabled"] else "off (SDPA_FLASH_FA4_CACHE=0 or FA4's own setting)")
    print(f"FlashAttention-4: {f4['installed'] or 'not installed (' + f4['install'] + ')'}; covers {f4['covers']}"
          + (f"; imported in {f4['import_seconds']:.1f} s" if f4.get("import_seconds") else ""))
    if f4["installed"]:
        print(f"  compile cache: {where}")
    variants = "; ".join(f"{v}: " + (", ".join(f"{n} ({how})" for n, how in row.items()) or "none")
                         for v, row in rep["variants"].items())
    print(f"variants: {variants}")
    if rep["denylist_entries_here"]:
        print(f"denylist: {len(rep['denylist_entries_here'])} entries for {d['type']} (see sdpa_flash.denylist())")
    _print_torch_features(rep)
    if "self_check" in rep:
        _print_self_check(rep["self_check"])


def _print_tuned(t: dict[str, Any]) -> None:
    if t["path"]:
        print(f"tuned:   {t['in_force']}, {t['rules']} rules")
    else:
        print(f"tuned:   no table for this machine: {t['in_force']} ({t['refresh']} measures this machine)")
    for s in t["stale"]:
        print(f"  stale, ignored: {s['path']}: {s['why']}; `{t['refresh']}` refreshes it")
    for r in t["rejected"]:
        print(f"  ignored: {r['path']}: {r['why']}")


def _print_self_check(rows: list[dict[str, Any]]) -> None:
    """The self-check's rule in its header, then one line per backend and case; an error over K times the
    same-dtype math error (passing on the floor) shows the bound that applied."""
    dtypes = dict.fromkeys(r["dtype"] for r in rows)
    eps = ", ".join(f"{d}: eps {torch.finfo(getattr(torch, d)).eps:.2g}" for d in dtypes)
    k = f"{K:g}"
    print("self-check against float64 math, forward + backward:\n"
          f"  a tensor passes when its largest error <= {k}x the same-dtype math error + a floor of {_FLOOR_ULPS} eps "
          f"max(1, max|reference|)\n  ({eps}); (xR) = error / same-dtype math error; where R > {k}, the bound that "
          "applied is shown")
    for r in rows:
        if r["status"] == "SKIP":
            print(f"  {r['backend']:<10} {r['case']:<32} SKIP  ({r['reasons'][0] if r['reasons'] else ''})")
            continue
        errs = []
        for n, e in r["errors"].items():
            within = ""
            if e["ratio"] > K:
                within = (f", {'within' if e['error'] <= e['bound'] else 'over'} {k}x + floor {e['floor']:.2g} = "
                          f"{e['bound']:.2g}")
            errs.append(f"{n} {e['error']:.2g} (x{e['ratio']:.2f}{within})")
        print(f"  {r['backend']:<10} {r['case']:<32} {r['status']}  {r['dtype']}  {'  '.join(errs)}")


def _print_torch_features(rep: dict[str, Any]) -> None:
    """The "torch APIs" section: each optional API found or not (:func:`sdpa_flash.capability.torch_features`)."""
    print("torch APIs (optional; found by looking, not by version):")
    missing = set(rep["torch_features_missing"])
    for name, found in rep["torch_features"].items():
        apis = TORCH_FEATURE_APIS[name]
        detail = "" if found else f"  (missing: {', '.join(a for a in apis if a in missing)})"
        print(f"  {name:<20} {'found' if found else 'not found'}  {' / '.join(apis)}{detail}")


_USAGE = """\
python -m sdpa_flash [--device DEVICE] [--json] [--no-check] [--require POLICY]
       python -m sdpa_flash bench [PRESET] [options]
       python -m sdpa_flash tune [--quick | --model CONFIGS.json] [options]"""

_COMMANDS = """\
What this machine can run, and a self-check; paste the output into bug reports.

commands:
  python -m sdpa_flash                  the report: versions, device, policy, ranking, every backend for a
                                        probe call, FlashAttention-4, then the self-check (every backend that
                                        runs here against float64 math, forward + backward; --no-check skips
                                        it, --json prints the report as data)
  python -m sdpa_flash --require POLICY a startup check: exit 1 with the reasons unless POLICY runs on the
                                        current CUDA GPU (--device cpu checks the CPU)
  python -m sdpa_flash bench [PRESET]   the benchmarks: every attention path side by side (bench --help,
                                        bench --list for presets and paths)
  python -m sdpa_flash bench report R.json ...
                                        a results page, CSV and plots from saved runs
  python -m sdpa_flash tune [--quick]   rank the backends on this machine: time each one per class of calls
                                        and write the table auto uses from then on (tune --help)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["tune"]:
        from .tuning._cli import main as tune_main

        return tune_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m sdpa_flash", usage=_USAGE, description=_COMMANDS,
                                 epilog="python -m sdpa_flash bench --help: the benchmarks' presets and options",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: the current CUDA device, else cpu; with "
                                     "--require: the current CUDA GPU)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--require", metavar="POLICY",
                    help="exit 1 with the reasons unless POLICY (auto, fused, or a backend: fa4, cudnn, flash, "
                         "efficient, math, chunked; or a comma-separated list of backends) can run a typical call "
                         "on the current CUDA GPU, or on --device (--device cpu checks the CPU; without a GPU and "
                         "without --device the requirement is not met)")
    ap.add_argument("--no-check", action="store_true", help="skip the self-check")
    args = ap.parse_args(argv)
    try:
        parse_device(args.device)  # a bad --device is a usage error (2), not a traceback
    except BackendUnavailableError as exc:
        if not args.require:
            print(f"sdpa_flash: --device {args.device}: {exc}", file=sys.stderr)
            return 2
    except SdpaFlashError as exc:
        print(f"sdpa_flash: --device: {exc}", file=sys.stderr)
        return 2
    try:
        if args.require:
            pol = resolve_policy(args.require)
            try:
                p = require(pol, args.device)
            except BackendUnavailableError as exc:
                print(f"sdpa_flash: requirement {args.require!r} not met\n{exc}", file=sys.stderr)
                return 1
            if not args.json:
                print(f"sdpa_flash: requirement {args.require!r} met: {p}")
            if args.no_check and not args.json:
                return 0
        rep = report(args.device, check=not args.no_check)
    except SdpaFlashError as exc:
        print(f"sdpa_flash: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(rep, sys.stdout, indent=1, default=str)
        print()
    else:
        _print(rep)
    failed = [r for r in rep.get("self_check", []) if r["status"] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
