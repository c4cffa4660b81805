"""The BASELINE grid on a GPU, side by side: ``python -m sdpa_flash bench grid`` (this script forwards to it).

    python benchmarks/grid.py [--json grid.json] [--plots plots/] [any other `bench` option]
"""

from __future__ import annotations

import sys

from sdpa_flash.bench import main

if __name__ == "__main__":
    sys.exit(main(["grid", *sys.argv[1:]]))
