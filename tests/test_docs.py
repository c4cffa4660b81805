"""Every Python example in the README runs, and the example scripts run (small, on the CPU)."""

from __future__ import annotations

import pathlib
import re
import runpy
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(readme_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_example_runs(index: int) -> None:
    exec(compile(readme_blocks()[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_first_screen_has_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text()[:1500]
    assert "python -m sdpa_flash" in head and "python -m pytest" in head


@pytest.mark.parametrize(
    ("script", "args", "code"),
    [("quickstart.py", ["--seq", "64"], None), ("startup_check.py", [], 0),
     ("startup_check.py", ["--require", "cudnn", "--device", "cpu"], 1)],
)
def test_example_script_runs(script: str, args: list[str], code: int | None, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    if code is None:
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    else:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
        assert exc.value.code == code
    assert capsys.readouterr().out or code == 1
