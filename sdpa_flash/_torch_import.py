"""Import torch quietly when ``python -m sdpa_flash`` / ``sdpa-flash`` runs (imported first by the package).

``import torch`` itself warns ``Failed to initialize NumPy: No module named 'numpy'`` where numpy is not
installed (torch/_subclasses/functional_tensor.py, torch 2.13), and ``pip install sdpa_flash`` does not install
numpy: nothing in sdpa_flash needs it. The command-line report would open with that line, so there, and only
there, exactly that warning is ignored while torch is imported. A program that imports sdpa_flash sees torch's
warnings as usual.
"""

from __future__ import annotations

import os
import sys
import warnings


def _command_line() -> bool:
    """Whether this process is ``python -m sdpa_flash ...`` or the ``sdpa-flash`` script."""
    argv = getattr(sys, "orig_argv", ())
    if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] == "sdpa_flash":
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in ("sdpa-flash", "sdpa-flash.exe")


if "torch" not in sys.modules and _command_line():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
        import torch  # noqa: F401
