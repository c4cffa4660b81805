"""Third-party hooks, each imported only when asked for.

Importing :mod:`sdpa_flash` or :mod:`sdpa_flash.integrations` imports no third-party library; a hook imports its
library when you call it.

* :mod:`sdpa_flash.integrations.transformers` — Hugging Face transformers: ``register()`` makes
  ``attn_implementation="sdpa_flash"`` run every attention layer of a model through :func:`sdpa_flash.attention`,
  with transformers' padding masks computed on the varlen path.

Example:
    >>> from sdpa_flash.integrations import register_transformers
    >>> # register_transformers()  # then AutoModelForCausalLM.from_pretrained(..., attn_implementation="sdpa_flash")
"""

from __future__ import annotations

from typing import Any

__all__ = ["register_transformers"]


def register_transformers(name: str = "sdpa_flash", **kwargs: Any) -> str:
    """Shorthand for :func:`sdpa_flash.integrations.transformers.register` (imports transformers)."""
    from .transformers import register

    return register(name, **kwargs)
