"""Every Python example in the README runs, and the example scripts run (small, on the CPU)."""

from __future__ import annotations

import importlib
import pathlib
import re
import runpy
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(readme_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_example_runs(index: int) -> None:
    try:
        exec(compile(readme_blocks()[index], f"README.md[python block {index}]", "exec"), {})
    finally:  # the drop-in example installs `import flash_attn`: leave no trace for the other tests
        compat = sys.modules.get("sdpa_flash.compat")
        if compat is not None:
            compat.uninstall()


def test_readme_first_screen_has_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text()[:1500]
    assert "python -m sdpa_flash" in head and "python -m pytest" in head


def _needs(module: str) -> pytest.MarkDecorator:
    """Skip an example whose optional dependency is missing (transformers; sdpa_flash.compat while it is new)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return pytest.mark.skipif(True, reason=f"{module} is not importable: {exc}")
    return pytest.mark.skipif(False, reason=f"{module} is importable")


@pytest.mark.parametrize(
    ("script", "args", "code"),
    [("quickstart.py", ["--seq", "64"], None), ("startup_check.py", [], 0),
     ("startup_check.py", ["--require", "cudnn", "--device", "cpu"], 1),
     ("varlen_batching.py", [], None), ("varlen_batching.py", ["--causal", "--batch", "3"], None),
     ("train_tiny_transformer.py", ["--steps", "3"], None), ("fa4_warmup.py", ["--causal"], None),
     pytest.param("hf_transformers.py", [], None, marks=_needs("transformers")),
     pytest.param("flash_attn_dropin.py", [], None, marks=_needs("sdpa_flash.compat"))],
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


def example_main(script: str) -> Any:
    return runpy.run_path(str(ROOT / "examples" / script), run_name="example")["main"]


def test_train_tiny_transformer_loss_drops(capsys: pytest.CaptureFixture[str]) -> None:
    result = example_main("train_tiny_transformer.py")(["--steps", "30"])
    assert result["last_loss"] < 0.5 * result["first_loss"], result
    assert "attention calls" in capsys.readouterr().out


def test_varlen_batching_routes_agree() -> None:
    result = example_main("varlen_batching.py")(["--causal", "--device", "cpu"])  # float32: exact paths agree
    assert result["nested_err"] < 1e-5 and result["padded_err"] < 1e-5, result


@_needs("transformers")
def test_hf_transformers_example_matches_sdpa() -> None:
    result = example_main("hf_transformers.py")(["--device", "cpu"])
    assert result["max_logit_diff"] < 1e-4 and result["same_tokens"] == 1.0, result


@_needs("sdpa_flash.compat")
def test_flash_attn_dropin_matches_attention() -> None:
    result = example_main("flash_attn_dropin.py")(["--device", "cpu"])
    assert result["dense_err"] < 1e-5 and result["varlen_err"] < 1e-5, result
