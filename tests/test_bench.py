"""``python -m sdpa_flash bench``: the quick preset runs end to end on the default device, the CPU in CI (a smoke
test: no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

import sdpa_flash
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


def test_plots_for_a_preset_without_curves_say_why_and_which_presets_draw(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    plots = tmp_path / "plots"
    rc = main(["bench", "quick", "--max-cases", "1", "--rounds", "3", "--modes", "fwd", "--paths", "sdpa",
               "--plots", str(plots), "--quiet"])
    assert rc in (0, None)
    err = capsys.readouterr().err
    if importlib.util.find_spec("matplotlib") is None:
        assert "sdpa_flash bench: no plots: matplotlib is not installed: pip install 'sdpa_flash[bench]'" in err
    else:
        assert f"sdpa_flash bench: no plots written to {plots}: the TFLOP/s plots need at least two sequence " \
               "lengths for one head dim, causal setting, dtype and mode" in err
        assert "The curves, memory and results presets draw plots (python -m sdpa_flash bench curves --plots DIR), " \
               "as do custom runs with several --seq." in err
    assert not plots.exists()  # no empty folder left behind


def test_plot_titles_wrap_to_the_figure_width() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdpa_flash.bench._plots import _title

    fig = plt.figure(figsize=(4.2, 3.4))
    where = "NVIDIA H100 80GB HBM3 (sm90, 132 SMs), driver 580.65.06, torch 2.13.0+cu130, 2026-12-07 03:43 UTC"
    _title(fig, "forward TFLOP/s, bfloat16", where)
    lines = fig._suptitle.get_text().splitlines()  # type: ignore[union-attr]
    plt.close(fig)
    assert lines[0] == "forward TFLOP/s, bfloat16" and " ".join(lines[1:]) == where
    assert all(len(line) <= 54 for line in lines)  # 13 characters an inch at 10 pt fit a 4.2-inch figure


def test_fa4_is_a_bench_path_skipped_with_its_reason() -> None:
    from sdpa_flash.bench._paths import CATALOGUE

    assert "attention(fa4)" in [p.name for p in CATALOGUE]
    doc = bench.run("quick", paths=["attention(fa4)", "sdpa"], modes=["fwd"], max_cases=1, settings={"rounds": 3})
    rows = [r for s in doc["sections"] for r in s["rows"] if r["path"] == "attention(fa4)"]
    assert rows
    caps = sdpa_flash.capabilities()
    for r in rows:
        if caps.device_type == "cpu":
            assert r["status"] != "ok" and r["reason"] == "not available on device type 'cpu' (has kernels for: cuda)"
        elif caps.kernel_version("fa4") is None:
            assert r["status"] != "ok" and r["reason"].startswith("flash-attn-4 is not installed")


def test_the_benchmark_scripts_harness_times_a_pass_and_keeps_going(tmp_path: pathlib.Path) -> None:
    from sdpa_flash.bench._timing import Settings, interleave

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "_harness.py"
    spec = importlib.util.spec_from_file_location("_harness", path)
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    q = torch.randn(1, 2, 16, 8)
    calls = []

    def call(*ts: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return sdpa_flash.attention(*ts, causal=True)

    items = [harness.timed_pass(mode, call, [q, q, q], mode) for mode in ("fwd", "fwdbwd")]
    assert calls == [True]  # the output gradient, made once for the fwd+bwd pass
    grads = items[1].fn(0)
    assert len(grads) == 3 and all(g.shape == q.shape for g in grads)
    res = interleave(items, torch.device("cpu"), Settings.for_device("cpu", rounds=2, budget_s=0.05),
                     measure_peak=False)
    assert set(res) == {"fwd", "fwdbwd"} and not any(isinstance(r, BaseException) for r in res.values())
    assert False in calls  # the forward pass ran under no_grad
    rows: list[dict[str, object]] = []
    out = tmp_path / "r.json"
    harness.run_sections({"ok": lambda: rows.append({"x": 1}), "bad": lambda: 1 / 0}, "bad,ok", str(out), {"m": 1},
                         rows)
    written = json.loads(out.read_text())
    assert written["info"] == {"m": 1} and written["rows"][0]["section"] == "bad" and written["rows"][1] == {"x": 1}
