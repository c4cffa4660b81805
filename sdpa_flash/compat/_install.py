"""``install()`` / ``uninstall()``: let ``import flash_attn`` resolve to this layer when flash-attn is not installed."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["FLASH_ATTN_VERSION", "install", "installed", "uninstall"]

FLASH_ATTN_VERSION = "2.8.3"
"""The flash-attn release whose public contract this layer implements (``flash_attn.__version__`` when installed)."""

_NAMES = ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding")
_MARK = "__sdpa_flash_compat__"


def _build(name: str) -> types.ModuleType:
    from . import _interface, _kvcache
    from . import bert_padding as bp

    mod = types.ModuleType(name)
    setattr(mod, _MARK, True)
    funcs = {f: getattr(_interface, f) for f in _interface.__all__ if f.startswith("flash_attn")}
    funcs["flash_attn_with_kvcache"] = _kvcache.flash_attn_with_kvcache
    if name == "flash_attn.bert_padding":
        for f in bp.__all__:
            setattr(mod, f, getattr(bp, f))
        mod.__all__ = list(bp.__all__)  # type: ignore[attr-defined]
        mod.__doc__ = bp.__doc__
        return mod
    for f, fn in funcs.items():
        setattr(mod, f, fn)
    mod.__all__ = sorted(funcs)  # type: ignore[attr-defined]
    if name == "flash_attn":
        mod.__version__ = FLASH_ATTN_VERSION  # type: ignore[attr-defined]
        mod.__path__ = []  # type: ignore[attr-defined]  # a package, so its submodules import
        mod.__doc__ = ("flash-attn's API provided by sdpa_flash.compat (sdpa_flash.compat.install()); the real "
                       "flash-attn package is not installed.")
    return mod


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _build(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        parent, _, child = module.__name__.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, module)


class _Finder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: found only when nothing else (the real flash-attn) provides the name."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _NAMES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _LOADER, is_package=fullname == "flash_attn",
                                              origin="sdpa_flash.compat")


_LOADER = _Loader()
_FINDER: _Finder | None = None


def _real_flash_attn() -> bool:
    mod = sys.modules.get("flash_attn")
    if mod is not None:
        return not getattr(mod, _MARK, False)
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def install() -> bool:
    """Make ``import flash_attn`` (and ``flash_attn.flash_attn_interface``, ``flash_attn.bert_padding``) give this
    layer — only when the real flash-attn package is absent. Idempotent.

    Returns:
        ``True`` when ``flash_attn`` now resolves to this layer, ``False`` when the real package is installed
        (it is then left alone).

    Example:
        >>> import sdpa_flash.compat
        >>> if sdpa_flash.compat.install():
        ...     from flash_attn import flash_attn_func   # sdpa_flash.compat.flash_attn_func
    """
    global _FINDER
    if _FINDER is not None:
        return True
    if _real_flash_attn():
        return False
    _FINDER = _Finder()
    sys.meta_path.append(_FINDER)
    return True


def uninstall() -> None:
    """Undo :func:`install`: remove the finder and the ``flash_attn`` modules it created. Idempotent."""
    global _FINDER
    if _FINDER is not None:
        try:
            sys.meta_path.remove(_FINDER)
        except ValueError:
            pass
        _FINDER = None
    for name in _NAMES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, _MARK, False):
            del sys.modules[name]
    importlib.invalidate_caches()


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _FINDER is not None
