"""What a result file records about where it was measured, and the matmul ceiling the ratios are taken against."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

import torch

from .. import __version__
from ..capability import capabilities
from ._timing import Settings, Stats, Timed, interleave

__all__ = ["environment", "matmul_ceiling"]


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, torch, CUDA, cuDNN, Triton and Python versions, the command line, the date and the commit."""
    caps = capabilities(device)
    here = os.path.dirname(os.path.abspath(__file__))
    commit = _run(["git", "rev-parse", "HEAD"], cwd=here)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here) if commit else None
    triton = None
    with contextlib.suppress(Exception):
        import triton as _triton

        triton = _triton.__version__
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "sdpa_flash", "bench", *sys.argv[2:]])
        if sys.argv[1:2] == ["bench"] else " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "sdpa_flash": __version__,
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "device_type": device.type,
        "device": caps.name,
        "arch": caps.arch,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _run(["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=driver_version",
                       "--format=csv,noheader"])
        env.update(
            compute_capability=list(caps.compute_capability or ()),
            sm_count=caps.sm_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            driver=driver,
            cuda_driver_api=_cuda_driver_api(),
            flash_impl=caps.flash_impl,
        )
    else:
        env.update(driver=None, peak_memory="not measured on the CPU: torch's CPU allocator keeps no peak "
                                            "statistics (tracemalloc does not see torch's allocations)")
    return env


def _cuda_driver_api() -> str | None:
    fn = getattr(torch._C, "_cuda_getDriverVersion", None)
    if fn is None:
        return None
    try:
        v = int(fn())
    except Exception:  # not a CUDA build, or no driver
        return None
    return f"{v // 1000}.{v % 1000 // 10}"


def matmul_ceiling(device: torch.device, settings: Settings) -> dict[str, Any]:
    """A large matrix product's TFLOP/s in the usual training dtype (bf16 8192³ on CUDA, fp32 1024³ on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    res = interleave([Timed("matmul", lambda i: a @ b)], device, settings, measure_peak=False)["matmul"]
    if not isinstance(res, Stats):
        return {"error": str(res)}
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": res.median_ms, "spread": res.spread,
            "tflops": 2 * n**3 / res.median_ms / 1e9}
