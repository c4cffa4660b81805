"""Host overhead per call of ``sdpa_flash.attention()`` against raw SDPA, ``sdpa_kernel`` and the direct aten op,
in interleaved rounds: ``python -m sdpa_flash bench overhead`` (this script forwards to it).

    python benchmarks/overhead.py                 # CPU
    python benchmarks/overhead.py --device cuda   # GPU: 1x8x128x64 bfloat16 (as in shared BASELINE.md)
"""

from __future__ import annotations

import sys

from sdpa_flash.bench import main

if __name__ == "__main__":
    sys.exit(main(["overhead", *sys.argv[1:]]))
