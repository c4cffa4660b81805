"""PNG plots (needs the ``bench`` extra, matplotlib; imported only here, only when plots are asked for).

* ``tflops_<mode>_<dtype>.png``: TFLOP/s against sequence length, one line per path, one panel per head dim
  (columns) and causal/non-causal (rows);
* ``memory.png``: peak memory beyond the inputs against sequence length (log-log), one line per path, a cross
  where the path ran out of memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["matplotlib_missing", "nothing_to_plot", "write_plots"]

_PRIORITY = {"sweep": 0, "curves": 1, "grid": 2, "quick": 3, "custom": 4}
_MODE_LABEL = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}


def matplotlib_missing() -> str:
    """Why plots cannot be drawn here (``""`` when matplotlib is importable)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed: pip install 'sdpa_flash[bench]' (or matplotlib) to get the PNG plots"
    return ""


def nothing_to_plot(docs: Sequence[dict[str, Any]]) -> str:
    """Why :func:`write_plots` drew nothing for these results, and which runs do draw plots."""
    dense = [r for d in docs for s in d.get("sections", []) if s.get("kind") == "dense" for r in s.get("rows", [])]
    seqs = sorted({r["s"] for r in dense})
    have = (f"these results have sequence length{'s' if len(seqs) != 1 else ''} "
            f"{', '.join(map(str, seqs))}, none twice for one head dim, causal setting, dtype and mode"
            if dense else "these results have no dense rows")
    return (f"the TFLOP/s plots need at least two sequence lengths for one head dim, causal setting, dtype and mode "
            f"({have}), and the memory plot needs the memory preset. The curves, memory and results presets draw "
            "plots (python -m sdpa_flash bench curves --plots DIR), as do custom runs with several --seq.")


def _title(fig: Any, head: str, where: str) -> None:
    """A figure title with ``where`` wrapped to the figure's width, so that a long device name is not cut off
    (``tight_layout`` then makes room for however many lines it takes)."""
    import textwrap

    width_in = fig.get_size_inches()[0]
    fig.suptitle("\n".join([head, *textwrap.wrap(where, width=max(30, int(width_in * 13)))]), fontsize=10)


def _seq_label(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def _style(path: str) -> dict[str, Any]:
    if path.startswith("attention(auto)"):
        return {"color": "black", "linewidth": 2.4, "zorder": 5}
    if path == "sdpa":
        return {"color": "tab:gray", "linestyle": "--", "linewidth": 1.6}
    return {"linewidth": 1.3, "linestyle": ":" if "math" in path or path == "naive" else "-"}


def write_plots(docs: Sequence[dict[str, Any]], outdir: str) -> list[str]:
    """Draw what the result files support into ``outdir``; return the files written (empty when nothing fits,
    and then ``outdir`` is not created; :func:`nothing_to_plot` says why).

    Raises:
        ImportError: matplotlib is not installed (see :func:`matplotlib_missing`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = docs[0]["meta"]
    where = f"{meta.get('device', '?')}, torch {meta.get('torch')}, {meta.get('date', '')}"
    written: list[str] = []
    sections = sorted((s for d in docs for s in d.get("sections", []) if s.get("kind") == "dense"
                       and s["name"] != "memory" and s.get("rows")), key=lambda s: _PRIORITY.get(s["name"], 9))
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for sec in sections:
        for r in sec["rows"]:
            if r.get("status") == "ok" and r.get("h_kv", r["h"]) == r["h"]:  # GQA rows are not on these curves
                best.setdefault((r["path"], r["d"], r["causal"], r["dtype"], r["mode"], r["s"]), r)
    rows = list(best.values())
    for mode in ("fwd", "fwdbwd", "bwd"):
        for dtype in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            panels = sorted({(r["causal"], r["d"]) for r in sel
                             if len({x["s"] for x in sel if x["d"] == r["d"] and x["causal"] == r["causal"]}) >= 2})
            if not panels:
                continue
            causals = sorted({c for c, _ in panels})
            dims = sorted({d for _, d in panels})
            fig, axes = plt.subplots(len(causals), len(dims), figsize=(4.2 * len(dims), 3.4 * len(causals)),
                                     squeeze=False, sharey=True)
            paths = list(dict.fromkeys(r["path"] for r in sel))
            for i, c in enumerate(causals):
                for j, d in enumerate(dims):
                    ax = axes[i][j]
                    ax.set_title(f"hd{d}{' causal' if c else ''}", fontsize=10)
                    ax.grid(True, alpha=0.3)
                    if (c, d) not in panels:
                        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                        continue
                    seqs = sorted({r["s"] for r in sel if r["d"] == d and r["causal"] == c})
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(seqs, [_seq_label(x) for x in seqs], fontsize=7)
                    ax.minorticks_off()
                    for p in paths:
                        pts = sorted((r["s"], r["tflops"]) for r in sel if r["path"] == p and r["d"] == d
                                     and r["causal"] == c)
                        if pts:
                            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=p,
                                    **_style(p))
                    if i == len(causals) - 1:
                        ax.set_xlabel("sequence length S")
                    if j == 0:
                        ax.set_ylabel("TFLOP/s")
            handles, labels = axes[0][0].get_legend_handles_labels()
            for ax in axes.flat:
                h, lab = ax.get_legend_handles_labels()
                for hh, ll in zip(h, lab, strict=True):
                    if ll not in labels:
                        handles.append(hh)
                        labels.append(ll)
            fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
            _title(fig, f"{_MODE_LABEL[mode]} TFLOP/s, {dtype}", where)
            fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 6), 1, 1))
            os.makedirs(outdir, exist_ok=True)
            name = os.path.join(outdir, f"tflops_{mode}_{dtype}.png")
            fig.savefig(name, dpi=110)
            plt.close(fig)
            written.append(name)
    mem = [r for d in docs for s in d.get("sections", []) if s.get("name") == "memory" for r in s.get("rows", [])]
    if any(r.get("peak_bytes") is not None for r in mem):
        modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in mem)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False, sharey=True)
        for ax, mode in zip(axes[0], modes, strict=True):
            sel = [r for r in mem if r["mode"] == mode]
            top = max((r["peak_bytes"] for r in sel if r.get("peak_bytes")), default=2**30) / 2**20 * 2
            for p in dict.fromkeys(r["path"] for r in sel):
                pts = sorted((r["s"], r["peak_bytes"] / 2**20) for r in sel if r["path"] == p
                             and r.get("peak_bytes") is not None and r["status"] == "ok")
                line = ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=p,
                               **_style(p)) if pts else None
                ooms = [r["s"] for r in sel if r["path"] == p and "out of memory" in r.get("reason", "")]
                if ooms:
                    color = line[0].get_color() if line else None
                    ax.scatter(ooms, [top] * len(ooms), marker="x", color=color, s=40,
                               label=None if line else f"{p} (OOM)")
            ax.set_xscale("log", base=2)
            seqs = sorted({r["s"] for r in sel})
            ax.set_xticks(seqs, [_seq_label(x) for x in seqs], fontsize=7)
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{_MODE_LABEL[mode]} (x: out of memory)", fontsize=10)
            ax.set_xlabel("sequence length S")
            ax.set_ylabel("peak MiB beyond the inputs")
        axes[0][0].legend(fontsize=7, frameon=False)
        _title(fig, "peak memory", where)
        fig.tight_layout()
        os.makedirs(outdir, exist_ok=True)
        name = os.path.join(outdir, "memory.png")
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
