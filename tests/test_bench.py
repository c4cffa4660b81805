"""``python -m sdpa_flash bench``: the quick preset runs end to end on the default device, the CPU in CI (a smoke
test: no timing asserted)."""

from __future__ import annotations

import json
import pathlib

import torch

from sdpa_flash import bench
from sdpa_flash.__main__ import main


def test_quick_preset_runs_every_path_and_reports_why_others_cannot(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "quick.json"
    rc = main(["bench", "quick", "--max-cases", "1", "--rounds", "3", "--modes", "fwd,fwdbwd",
               "--json", str(out), "--csv", str(tmp_path / "quick.csv")])
    assert rc in (0, None)
    doc = json.loads(out.read_text())
    assert doc["meta"]["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu") and doc["meta"]["torch"]
    rows = [r for s in doc["sections"] for r in s["rows"]]
    ok = {r["path"] for r in rows if r["status"] == "ok"}
    assert {"sdpa", "attention(auto)", "attention(flash)", "attention(math)"} <= ok
    for r in rows:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] > 0 and r["backend"]
        else:
            assert r["reason"]  # a path that cannot run says why, never a missing row
    assert (tmp_path / "quick.csv").read_text().count("\n") > len(ok)


def test_report_renders_markdown_from_a_result_file(tmp_path: pathlib.Path) -> None:
    doc = bench.run("quick", paths=["sdpa", "attention(auto)"], modes=["fwd"], max_cases=1, settings={"rounds": 3})
    page = bench.render_markdown([doc])
    assert page.startswith("# sdpa_flash benchmark results") and "attention(auto)" in page
