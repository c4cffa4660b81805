"""benchmarks/flash_attn_suite.py: its failure classes and counts from a JUnit file, and a whole run on a small test
file written in flash-attn's style (``from flash_attn import ...``), so the harness is exercised without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import time
import types
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flash_attn_suite", ROOT / "benchmarks" / "flash_attn_suite.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="t" name="test_a[1]"/>
<testcase classname="t" name="test_b[local]"><failure message="sdpa_flash.errors.AttentionInputError: Expected
 window_size to be a pair of ints">E   sdpa_flash.errors.AttentionInputError: Expected window_size to be ...</failure>
</testcase>
<testcase classname="t" name="test_c"><failure message="assert 0.5 &lt;= 0.1">E   assert 0.5 &lt;= 0.1</failure>
</testcase>
<testcase classname="t" name="test_d"><error message="RuntimeError: CUDA error: device-side assert triggered">E
 RuntimeError: CUDA error: device-side assert triggered</error></testcase>
<testcase classname="t" name="test_e"><skipped message="needs sm80"/></testcase>
</testsuite></testsuites>"""


def test_summary_counts_and_classes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    s = suite().summarize(path)
    assert s["counts"] == {"passed": 1, "failed": 2, "errors": 1, "skipped": 1}
    assert s["failures_by_class"] == {"AssertionError (numerics or shape)": ["test_c"],
                                      "AttentionInputError: window_size": ["test_b[local]"],
                                      "RuntimeError: CUDA error": ["test_d"]}
    assert s["skip_reasons"] == {"needs sm80": 1}
    assert s["examples"]["RuntimeError: CUDA error"].startswith("test_d: E")
    assert s["by_function"]["test_b"] == {"failed": 1} and s["by_function"]["test_e"] == {"skipped": 1}
    assert "device-side assert" in s["examples"]["RuntimeError: CUDA error"]


FAKE_SUITE = '''
import pytest
import torch
from flash_attn import flash_attn_func
from flash_attn.flash_attn_interface import _get_block_size_n  # noqa: F401  (the harness provides it)
from flash_attn.layers.rotary import apply_rotary_emb


@pytest.mark.parametrize("dropout_p", [0.0, 0.17])
@pytest.mark.parametrize("local", [False, True])
def test_output(dropout_p, local):
    q = torch.randn(1, 8, 2, 16, device="cuda")
    window = torch.randint(0, 8, (2,)) if local else (-1, -1)
    out = flash_attn_func(q, q, q, dropout_p=dropout_p, window_size=window)
    assert out.shape == q.shape


def test_rotary_reference():
    x = torch.randn(1, 3, 2, 8, device="cuda")
    cos, sin = torch.ones(4, 2, device="cuda"), torch.zeros(4, 2, device="cuda")
    assert torch.equal(apply_rotary_emb(x, cos, sin, seqlen_offsets=1), x)  # angle 0: unchanged


def test_numerics_fail():
    print("Output max diff: 0.5")
    print("Output Pytorch max diff: 0.1")
    assert 1 == 2


def test_skips_as_flash_attn_does():
    pytest.skip()
'''


@pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="the harness needs einops")
def test_a_whole_run_on_a_small_suite(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    test_file = tmp_path / "test_fake.py"
    test_file.write_text(FAKE_SUITE)
    rc = suite().main([str(test_file), "--out", str(tmp_path / "out"), "--sample", "0", "--cpu-emulation",
                       "--label", "fake"])
    text = capsys.readouterr().out
    assert rc == 1, text  # one case fails on purpose
    assert "fake: 3 passed, 1 failed, 0 errors, 1 skipped of 5 run (5 dropout-free cases, 2 dropout cases " \
        "deselected)" in text
    assert "skipped in: test_skips_as_flash_attn_does 1" in text
    assert "1  AssertionError (numerics or shape)   e.g. test_numerics_fail" in text
    failure = json.loads((tmp_path / "out" / "summary.json").read_text())["failures"]["test_numerics_fail"]
    assert failure["at"] == "test_flash_attn.py:27"  # the assert 1 == 2 line
    assert failure["printed"] == ["Output max diff: 0.5", "Output Pytorch max diff: 0.1"]


@pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="the harness needs einops")
def test_a_rerun_of_named_cases(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    test_file = tmp_path / "test_fake.py"
    test_file.write_text(FAKE_SUITE)
    cases = tmp_path / "cases.txt"
    cases.write_text("test_output[True-0.0]\ntest_numerics_fail\n")
    rc = suite().main([str(test_file), "--out", str(tmp_path / "out"), "--cases", str(cases), "--cpu-emulation"])
    assert rc == 1
    assert "run: 1 passed, 1 failed, 0 errors, 0 skipped of 2 run" in capsys.readouterr().out
    printed = json.loads((tmp_path / "out" / "summary.json").read_text())["printed"]  # every case's, on a rerun
    assert printed == {"test_output[True-0.0]": [], "test_numerics_fail": ["Output max diff: 0.5",
                                                                           "Output Pytorch max diff: 0.1"]}
    assert (tmp_path / "out" / "summary.json").is_file() and (tmp_path / "out" / "junit.xml").is_file()


SLOW_SUITE = '''
import os
import pathlib
import time


def test_quick():
    assert True


def test_stuck():
    pathlib.Path(os.environ["STUCK_MARKER"]).write_text("stuck")
    time.sleep(600)
'''


class _LimitWhenStuck(subprocess.Popen[str]):
    """pytest's process, whose time limit runs out the moment ``test_stuck`` has started: as a real limit would
    there, without a fixed wait that a loaded machine's slow collection could outlast."""

    limit_hit = False

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None or self.limit_hit:
            return super().wait(timeout)
        marker, deadline = pathlib.Path(os.environ["STUCK_MARKER"]), time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            if marker.exists():
                self.limit_hit = True
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return super().wait(max(0.0, deadline - time.monotonic()))


@pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="the harness needs einops")
def test_a_run_past_its_time_limit_reports_the_cases_that_ran(tmp_path: pathlib.Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    test_file = tmp_path / "test_slow.py"
    test_file.write_text(SLOW_SUITE)
    monkeypatch.setenv("STUCK_MARKER", str(tmp_path / "stuck"))
    mod = suite()
    # the harness's own view of subprocess (all it uses of it), with pytest's process as above
    monkeypatch.setattr(mod, "subprocess", types.SimpleNamespace(Popen=_LimitWhenStuck, STDOUT=subprocess.STDOUT,
                                                                 TimeoutExpired=subprocess.TimeoutExpired))
    rc = mod.main([str(test_file), "--out", str(tmp_path / "out"), "--sample", "0", "--cpu-emulation",
                   "--label", "slow", "--timeout", "300", "-k", "quick or stuck"])
    text = capsys.readouterr().out
    assert rc == 1, text  # an interrupted run is not a clean one
    assert text.startswith("running:") and "slow: 1 passed, 0 failed" in text, text
    assert "interrupted at the time limit: 1 cases ran to the end, 1 were cut off" in text


OOM_ONCE_SUITE = '''
import os
import pathlib

import torch


def test_fits():
    assert True


def test_big_beside_others():
    marker = pathlib.Path(os.environ["OOM_MARKER"])
    if not marker.exists():  # the first run, "beside the other workers": out of memory
        marker.write_text("ran")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 354.00 MiB.")


def test_big_always():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.")
'''


@pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="the harness needs einops")
def test_cases_out_of_memory_are_rerun_alone_and_that_outcome_counts(tmp_path: pathlib.Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    test_file = tmp_path / "test_oom.py"
    test_file.write_text(OOM_ONCE_SUITE)
    monkeypatch.setenv("OOM_MARKER", str(tmp_path / "marker"))
    rc = suite().main([str(test_file), "--out", str(tmp_path / "out"), "--sample", "0", "--cpu-emulation",
                       "--label", "oom"])
    text = capsys.readouterr().out
    assert rc == 1, text  # the one that runs out of memory alone too is still a failure
    assert "oom: 2 passed, 1 failed, 0 errors, 0 skipped of 3 run" in text, text
    assert "2  ran out of memory beside parallel workers and were rerun alone (counted as rerun): 1 passed, " \
        "1 failed" in text, text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reran_alone"] == {"test_big_beside_others": "passed", "test_big_always": "failed"}
    assert summary["failures_by_class"] == {"out of memory": ["test_big_always"]}


@pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="the harness needs einops")
def test_no_rerun_counts_out_of_memory_as_failed(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    test_file = tmp_path / "test_oom.py"
    test_file.write_text(OOM_ONCE_SUITE)
    monkeypatch.setenv("OOM_MARKER", str(tmp_path / "marker"))
    rc = suite().main([str(test_file), "--out", str(tmp_path / "out"), "--sample", "0", "--cpu-emulation",
                       "--no-rerun"])
    assert rc == 1
    assert "run: 1 passed, 2 failed" in capsys.readouterr().out
