"""``sdpa_flash.bench``: every attention path side by side, correctly timed, reproducible.

``python -m sdpa_flash bench [PRESET]`` (see ``--help`` and ``--list``) or, from Python, :func:`run`, which
returns the result document that ``--json`` writes. For each case it builds random inputs, checks every path's
output and gradients against float64 math, then times the paths in interleaved rounds (forward, backward on a
retained graph, forward+backward), reporting the median, the spread, TFLOP/s in the flash-attention
convention, peak CUDA memory beyond the inputs, and the kernel each path ran. A path that cannot run a case is
a row with ``status: "n/a"`` and the reason, never a missing row.

Presets: ``quick`` (CPU smoke test), ``grid`` (the BASELINE grid), ``sweep`` (80 configurations, in parts),
``curves``, ``memory``, ``flex``, ``varlen``, ``overhead``, and ``results`` (all of them under one time cap,
writing JSON, CSV, PNG plots and the Markdown results page).

Example:
    >>> from sdpa_flash import bench
    >>> doc = bench.run("quick", paths=["sdpa", "attention(auto)"], modes=["fwd"], max_cases=1,
    ...                 settings={"rounds": 3})
    >>> sorted({(r["path"], r["status"]) for r in doc["sections"][0]["rows"]})
    [('attention(auto)', 'ok'), ('sdpa', 'ok')]
"""

from __future__ import annotations

from ._cases import MODES, Case
from ._cli import main, print_doc, write_outputs
from ._paths import CATALOGUE, PathDef, catalogue
from ._report import render_markdown, summarize
from ._run import PRESETS, SCHEMA, Preset, run
from ._timing import Settings

__all__ = [
    "CATALOGUE",
    "MODES",
    "PRESETS",
    "SCHEMA",
    "Case",
    "PathDef",
    "Preset",
    "Settings",
    "catalogue",
    "main",
    "print_doc",
    "render_markdown",
    "run",
    "summarize",
    "write_outputs",
]
