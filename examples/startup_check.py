"""Fail a job early, with reasons, when the attention kernel it expects is not available.

    python examples/startup_check.py                      # require a fused (O(N)-memory) kernel on the GPU
    python examples/startup_check.py --require flash      # require SDPBackend.FLASH_ATTENTION on the GPU
    python examples/startup_check.py --device cpu         # check the CPU instead (PyTorch's CPU flash is fused)
Without ``--device`` the check is for the current CUDA GPU: on a machine where none is visible it fails, since a
job that expects a GPU has landed on the wrong machine.
Exit status 0 when the requirement is met, 1 (with the reasons on stderr) when it is not.
The same check from a shell: ``python -m sdpa_flash --require flash --no-check``.
"""

from __future__ import annotations

import argparse
import sys

import torch

import sdpa_flash


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require", default="fused", help="a policy (auto, fused, flash, ...) or backend name")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the current CUDA GPU; "
                    "without one the check fails)")
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        plan = sdpa_flash.require(args.require, args.device, head_dim=args.head_dim)
    except sdpa_flash.BackendUnavailableError as exc:
        print(f"startup check failed: {exc}", file=sys.stderr)
        return 1
    caps = plan.caps
    print(f"startup check passed on {caps.name} ({caps.arch}), torch {torch.__version__}: "
          f"policy {args.require!r} runs {plan.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
