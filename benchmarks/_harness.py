"""What the GPU benchmark scripts share: the machine line, one timed pass of a path, and the sections loop.

The scripts are run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``: ``import _harness``.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch

from sdpa_flash.backends import fa4 as fa4_backend
from sdpa_flash.bench._timing import Timed


def machine_info() -> dict[str, Any]:
    """torch, the GPU, FlashAttention-4 and cuDNN versions: the head of every result file."""
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "fa4": fa4_backend.installed_version(),
            "cudnn": torch.backends.cudnn.version()}


def timed_pass(name: str, call: Callable[..., torch.Tensor], tensors: list[torch.Tensor], mode: str,
               context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> Timed:
    """``call(*tensors)`` to time: forward under ``no_grad`` (``mode="fwd"``), or forward and backward (the
    gradients of fresh leaves against one fixed random output gradient, made once under ``context``, as every
    timed call runs). ``Timed.fn`` is the timed function (for a profile of the same calls). Raises what the path
    raises on its first call: it cannot run the case."""
    ctx = context or contextlib.nullcontext
    if mode == "fwd":
        def fn(i: int) -> object:
            with torch.no_grad():
                return call(*tensors)
    else:
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        with ctx():
            gout = torch.randn_like(call(*leaves))

        def fn(i: int) -> object:
            return torch.autograd.grad(call(*leaves), leaves, gout)
    return Timed(name, fn, ctx)


def run_sections(sections: Mapping[str, Callable[[], object]], chosen: str, out: str, info: Mapping[str, Any],
                 rows: list[dict[str, Any]]) -> None:
    """Run the comma-separated ``chosen`` sections in order; a section that raises is reported (its traceback, and
    a row with the error) and the others still run. ``{"info", "rows", "seconds"}`` is written to ``out`` after
    each section, so a run cut short keeps what it measured."""
    print(dict(info), flush=True)
    start = time.perf_counter()
    for section in chosen.split(","):
        t = time.perf_counter()
        try:
            sections[section]()
        except Exception as exc:
            traceback.print_exc()
            rows.append({"section": section, "error": repr(exc)[:500]})
        print(f"-- {section}: {time.perf_counter() - t:.0f} s", flush=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"info": dict(info), "rows": rows, "seconds": time.perf_counter() - start}, f, indent=1)
