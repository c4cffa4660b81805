"""``python -m sdpa_flash``: the report, its JSON form, ``--require`` and the exit codes (0 ok, 1 requirement
not met or self-check failed, 2 bad usage), run as a user runs it; plus in-process calls of ``main()``."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import required_backends

import sdpa_flash
from sdpa_flash import policy as policy_mod
from sdpa_flash.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 120


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, gpu: bool = False, **env: str) -> Result:
    """``python -m sdpa_flash ARGS`` in a clean environment (no SDPA_FLASH_* variables but the tests' empty tune
    directory, so no tuned table of this machine is read) plus ``env``; with the GPU hidden
    (``CUDA_VISIBLE_DEVICES=""``) unless ``gpu``, so that the CPU report is what is tested on any machine."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SDPA_FLASH_") or k == "SDPA_FLASH_TUNE_DIR"}
    if not gpu:
        base["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "sdpa_flash", *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_report_passes_self_check() -> None:
    r = run_cli()
    assert r.returncode == 0, r.stderr
    assert "self-check" in r.stdout
    assert "PASS" in r.stdout
    assert "FAIL" not in r.stdout
    assert f"sdpa_flash {sdpa_flash.__version__}" in r.stdout
    assert re.search(r"^\s*flash\s+available <- chosen by the policy", r.stdout, flags=re.M)
    assert "policy:  auto  (default)" in r.stdout


def test_report_json() -> None:
    r = run_cli("--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {"torch", "device", "backends", "self_check", "policy"} <= rep.keys()
    assert rep["device"]["type"] == "cpu"
    assert rep["policy"] == "auto"
    assert rep["chosen"] == "flash"
    assert rep["backends"]["flash"]["available"] is True
    assert rep["backends"]["math"]["available"] is True
    assert rep["backends"]["cudnn"]["available"] is False
    assert rep["variants"] == {"window": {"math": "as a mask", "chunked": "native"}, "softcap": {"chunked": "native"},
                               "sinks": {"chunked": "native"}}
    ran = [row for row in rep["self_check"] if row["status"] != "SKIP"]
    assert {row["backend"] for row in ran} >= {"flash", "math"}
    assert all(row["status"] == "PASS" for row in ran), ran
    for row in ran:
        assert set(row["errors"]) == {"out", "dq", "dk", "dv"}
        assert all(e["error"] <= e["bound"] for e in row["errors"].values())


def test_variants_report_says_which_kernel_adapts_them() -> None:
    from sdpa_flash.__main__ import variants_report

    sm80 = sdpa_flash.Capabilities.synthetic("cuda", (8, 0))  # no FA4 there: PyTorch's kernels and the references
    rep = variants_report(sm80)
    assert rep["sinks"] == {"flash": "adapted", "chunked": "native"}  # from the flash kernel's log-sum-exp
    assert rep["softcap"] == {"chunked": "native", "flex": "native"} and rep["window"]["math"] == "as a mask"
    assert rep["window"].get("flash") in (None, "native")  # (where this torch's flash ops take window sizes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_report_on_the_gpu_passes_self_check_for_every_available_backend() -> None:
    r = run_cli("--json", gpu=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["device"]["type"] == "cuda"
    assert rep["backends"][rep["chosen"]]["available"] is True
    ran = {row["backend"]: row for row in rep["self_check"] if row["status"] != "SKIP"}
    available = {name for name, b in rep["backends"].items() if b["available"]}
    assert "math" in ran and set(ran) <= available
    built_in = required_backends() - {"fa4"}  # what torch's own facts say this GPU has (conftest)
    assert built_in <= available and built_in <= set(ran), (built_in, available, set(ran))
    assert all(row["status"] == "PASS" for row in ran.values()), ran


def test_require_flash_met_on_the_cpu_when_asked_for() -> None:
    r = run_cli("--require", "flash", "--device", "cpu", "--no-check")
    assert r.returncode == 0, r.stderr
    assert "requirement 'flash' met" in r.stdout
    assert "self-check" not in r.stdout


@pytest.mark.parametrize("policy", ["flash", "fused", "auto"])
def test_require_without_device_means_the_gpu(policy: str) -> None:
    # A startup check is for a job that expects a GPU: without one (and without --device cpu) it is not met,
    # even though PyTorch's CPU flash kernel would run the call.
    r = run_cli("--require", policy, "--no-check")
    assert r.returncode == 1, r.stdout
    assert f"requirement '{policy}' not met" in r.stderr
    assert "no CUDA GPU is visible to this PyTorch" in r.stderr
    assert "To check the CPU, pass device='cpu' (on the command line: --device cpu)." in r.stderr
    assert "Traceback" not in r.stderr


def test_require_cudnn_not_met() -> None:
    r = run_cli("--require", "cudnn", "--device", "cpu", "--no-check")
    assert r.returncode == 1
    assert "cudnn" in r.stderr
    assert "not available on device type 'cpu'" in r.stderr
    assert "requirement 'cudnn' not met" in r.stderr


def test_require_bogus_is_a_usage_error() -> None:
    r = run_cli("--require", "bogus")
    assert r.returncode == 2
    assert "sdpa_flash:" in r.stderr
    assert "Expected policy to be one of" in r.stderr and "'bogus'" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_environment_is_a_usage_error() -> None:
    r = run_cli("--no-check", SDPA_FLASH_POLICY="bogus")
    assert r.returncode == 2
    assert "SDPA_FLASH_POLICY" in r.stderr and "'bogus'" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------- in-process
@pytest.fixture
def default_policy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    saved_env, saved_process = policy_mod._env_policy, policy_mod._process_policy
    for var in [v for v in os.environ if v.startswith("SDPA_FLASH_") and v != "SDPA_FLASH_TUNE_DIR"]:
        monkeypatch.delenv(var)
    policy_mod._env_policy = None
    policy_mod._process_policy = None
    try:
        yield
    finally:
        policy_mod._env_policy, policy_mod._process_policy = saved_env, saved_process


@pytest.mark.usefixtures("default_policy")
def test_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--require", "flash", "--device", "cpu", "--no-check"]) == 0
    assert "requirement 'flash' met" in capsys.readouterr().out

    assert main(["--require", "cudnn", "--device", "cpu", "--no-check"]) == 1
    assert "not available on device type 'cpu'" in capsys.readouterr().err

    assert main(["--require", "bogus"]) == 2
    assert "'bogus'" in capsys.readouterr().err

    assert main(["--json", "--no-check", "--device", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["chosen"] == "flash" and "self_check" not in rep

    # --json: the report, not the one-liner
    assert main(["--require", "math", "--device", "cpu", "--json", "--no-check"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "auto"

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "self-check" in out and "PASS" in out and "FAIL" not in out


# ------------------------------------------------------------------------------------- optional torch APIs
def test_report_lists_the_optional_torch_apis_it_found() -> None:
    from sdpa_flash.capability import TORCH_FEATURE_APIS, torch_features

    r = run_cli("--no-check")
    assert r.returncode == 0, r.stderr
    assert "torch APIs (optional; found by looking, not by version):" in r.stdout
    found = torch_features()
    for name, apis in TORCH_FEATURE_APIS.items():
        line = next(ln for ln in r.stdout.splitlines() if ln.split()[:1] == [name])
        assert (" found " in line) is getattr(found, name) and all(a in line for a in apis), line
    rep = json.loads(run_cli("--no-check", "--json").stdout)
    assert rep["torch_features"] == found.as_dict()
    assert rep["torch_features_missing"] == list(found.missing)
    assert set(rep["torch_features"]) == {"flash_impl_registry", "varlen_attn", "cudnn_attention", "flex_attention"}


def _exists(dotted: str) -> bool:
    """Whether ``dotted`` names something, found here without the code under test: import the parent module and
    look for the attribute, or locate a submodule not imported yet."""
    parent, _, name = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(parent), name) or importlib.util.find_spec(dotted) is not None
    except ImportError:  # a parent that is not there (or not a package)
        return False


def test_torch_features_are_found_by_looking_not_by_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdpa_flash import capability

    monkeypatch.setattr(torch, "__version__", "99.0.0")  # a version says nothing
    capability.torch_features.cache_clear()
    try:
        truth = {api: _exists(api) for apis in capability.TORCH_FEATURE_APIS.values() for api in apis}
        assert capability.torch_features().as_dict() == {
            name: all(truth[a] for a in apis) for name, apis in capability.TORCH_FEATURE_APIS.items()}
        if truth["torch.backends.cuda.can_use_cudnn_attention"]:
            monkeypatch.delattr(torch.backends.cuda, "can_use_cudnn_attention")
            capability.torch_features.cache_clear()
            feats = capability.torch_features()
            assert not feats.cudnn_attention and "torch.backends.cuda.can_use_cudnn_attention" in feats.missing
        assert not capability._has_api("torch.nn.attention.no_such_module.fn")
        assert not capability._has_api("torch.no_such_attribute")
    finally:
        capability.torch_features.cache_clear()


def test_import_touches_no_gpu_and_imports_no_optional_module() -> None:
    code = ("import sys, torch; before = set(sys.modules); import sdpa_flash; "  # what torch imports is torch's
            "heavy = [m for m in ('torch.nn.attention.flex_attention', 'transformers', 'flash_attn', "
            "'torch.nn.attention.varlen', 'triton') if m in set(sys.modules) - before]; "
            "print(heavy, torch.cuda.is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          check=True)
    assert proc.stdout.split("\n")[0] == "[] False", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------- examples/startup_check.py
@pytest.mark.parametrize(("args", "status", "expected"), [
    ([], 1, "no CUDA GPU is visible to this PyTorch"),
    (["--require", "flash"], 1, "To check the CPU, pass device='cpu' (on the command line: --device cpu)."),
    (["--device", "cpu"], 0, "policy 'fused' runs flash"),
    (["--require", "flash", "--device", "cpu"], 0, "policy 'flash' runs flash"),
])
def test_startup_check_example_follows_require(args: list[str], status: int, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPA_FLASH_") or k == "SDPA_FLASH_TUNE_DIR"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the machine without a GPU, on any machine
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))  # installed or not
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "startup_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == status, proc.stderr
    assert expected in (proc.stdout if status == 0 else proc.stderr)


# ------------------------------------------------------------------------------------- cuDNN versions as read
@pytest.mark.parametrize(("v", "text"), [(92400, "9.24.0 (92400)"), (91900, "9.19.0 (91900)"),
                                         (90000, "9.0.0 (90000)"), (8907, "8.9.7 (8907)"), (8600, "8.6.0 (8600)"),
                                         (7605, "7.6.5 (7605)"), (None, "none")])
def test_cudnn_versions_are_shown_as_releases(v: int | None, text: str) -> None:
    from sdpa_flash.capability import format_cudnn_version

    assert format_cudnn_version(v) == text


def test_cudnn_reason_and_report_header_use_the_release() -> None:
    old = sdpa_flash.Capabilities.synthetic("cuda", (9, 0), cudnn_version=8907)
    spec = sdpa_flash.AttentionSpec("cuda", torch.bfloat16, 1, 8, 8, 128, 128, 64, 64)
    from sdpa_flash.backends import BACKENDS

    assert "requires cuDNN >= 9.0.0 (90000), this build has 8.9.7 (8907)" in (
        BACKENDS["cudnn"].not_supported_reasons(spec, old))
    r = run_cli("--no-check")
    assert re.search(r"  cuDNN (none|\d+\.\d+\.\d+ \(\d+\))  Python ", r.stdout), r.stdout.splitlines()[0]


# ------------------------------------------------------------------------------------- a first run's noise
def test_no_numpy_warning_on_the_command_line(tmp_path: pathlib.Path) -> None:
    # `import torch` warns "Failed to initialize NumPy" where numpy is absent (pip install sdpa_flash does not
    # install it); the command line imports torch with exactly that warning ignored. numpy is hidden here by a
    # package that fails to import, as a missing one does.
    fake = tmp_path / "numpy"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    r = run_cli("--no-check", PYTHONPATH=path)
    assert r.returncode == 0, r.stderr
    assert "NumPy" not in r.stderr and r.stdout.startswith("sdpa_flash ")


# ------------------------------------------------------------------------------------- the self-check's rule
def test_self_check_header_states_the_rule_and_lines_the_bound(capsys: pytest.CaptureFixture[str]) -> None:
    from sdpa_flash.__main__ import _print_self_check

    errors = {"out": {"error": 7.2e-07, "bound": 2.1e-06, "ratio": 0.86, "floor": 4.4e-07},
              "dq": {"error": 2.9e-06, "bound": 4.1e-06, "ratio": 3.37, "floor": 2.4e-06}}
    bad = {"dv": {"error": 9e-06, "bound": 4.1e-06, "ratio": 5.0, "floor": 2.4e-06}}
    _print_self_check([
        {"backend": "chunked", "case": "causal GQA 8/2 (2, 8, 256, 64)", "dtype": "float32", "status": "PASS",
         "errors": errors},
        {"backend": "flash", "case": "non-causal (2, 8, 256, 64)", "dtype": "float32", "status": "FAIL",
         "errors": bad},
        {"backend": "cudnn", "case": "non-causal (2, 8, 256, 64)", "status": "SKIP", "dtype": "float32",
         "reasons": ["not available on device type 'cpu' (has kernels for: cuda)"]},
    ])
    assert capsys.readouterr().out.splitlines() == [
        "self-check against float64 math, forward + backward:",
        "  a tensor passes when its largest error <= 2x the same-dtype math error + a floor of 8 eps "
        "max(1, max|reference|)",
        "  (float32: eps 1.2e-07); (xR) = error / same-dtype math error; where R > 2, the bound that applied is shown",
        "  chunked    causal GQA 8/2 (2, 8, 256, 64)   PASS  float32  out 7.2e-07 (x0.86)  "
        "dq 2.9e-06 (x3.37, within 2x + floor 2.4e-06 = 4.1e-06)",
        "  flash      non-causal (2, 8, 256, 64)       FAIL  float32  "
        "dv 9e-06 (x5.00, over 2x + floor 2.4e-06 = 4.1e-06)",
        "  cudnn      non-causal (2, 8, 256, 64)       SKIP  "
        "(not available on device type 'cpu' (has kernels for: cuda))",
    ]


def test_self_check_rows_carry_the_floor() -> None:
    rows = [r for r in sdpa_flash.__main__.self_check(torch.device("cpu"), torch.float32) if r["status"] != "SKIP"]
    assert rows and all(r["status"] == "PASS" for r in rows)
    for r in rows:
        for e in r["errors"].values():
            assert e["floor"] > 0 and e["error"] <= e["bound"]
            assert e["ratio"] <= 2 or e["error"] <= e["bound"]  # over 2x only within the floor


def test_help_lists_the_commands_first(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m sdpa_flash [--device DEVICE] [--json] [--no-check] [--require POLICY]\n"
                          "       python -m sdpa_flash bench [PRESET] [options]\n")
    commands = out.split("commands:\n", 1)[1].split("options:", 1)[0]
    for line in ("  python -m sdpa_flash                  the report:", "  python -m sdpa_flash --require POLICY a "
                 "startup check:", "  python -m sdpa_flash bench [PRESET]   the benchmarks:",
                 "  python -m sdpa_flash bench report R.json ..."):
        assert line in commands
