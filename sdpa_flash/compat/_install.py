"""``install()`` / ``uninstall()``: let ``import flash_attn`` resolve to this layer when flash-attn is not installed."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

from ..errors import SdpaFlashError

__all__ = ["FLASH_ATTN_VERSION", "NotProvidedError", "install", "installed", "uninstall"]

FLASH_ATTN_VERSION = "2.8.3"
"""The flash-attn release whose public contract this layer implements (``flash_attn.__version__`` when installed)."""

_NAMES = ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding")
_MARK = "__sdpa_flash_compat__"

# flash-attn's private names that code is known to import, deliberately not provided: each is a kernel-level entry
# point whose arguments and returns changed between flash-attn releases (window_size split into two ints, softcap
# inserted positionally, caller-allocated dq/dk/dv, an RNG state), so an imitation would drift silently.
_PRIVATE = {
    "flash_attn_gpu": "flash-attn's compiled CUDA extension module (flash_attn_2_cuda)",
    "_flash_attn_forward": "a private kernel entry point returning (out, softmax_lse, S_dmask, rng_state)",
    "_flash_attn_varlen_forward": "a private kernel entry point returning (out, softmax_lse, S_dmask, rng_state)",
    "_flash_attn_backward": "a private kernel entry point writing into caller-allocated dq, dk, dv",
    "_flash_attn_varlen_backward": "a private kernel entry point writing into caller-allocated dq, dk, dv",
    "_wrapped_flash_attn_forward": "a private torch.library wrapper of the kernel",
    "_wrapped_flash_attn_varlen_forward": "a private torch.library wrapper of the kernel",
    "_wrapped_flash_attn_backward": "a private torch.library wrapper of the kernel",
    "_wrapped_flash_attn_varlen_backward": "a private torch.library wrapper of the kernel",
    "_get_block_size_n": "a tile size of flash-attn's CUDA kernels (only meaningful for its S_dmask layout)",
}


class NotProvidedError(SdpaFlashError, ImportError):
    """A private flash-attn name that :func:`install` deliberately does not provide (raised on import/access)."""


def _missing(module: str) -> Any:
    def __getattr__(name: str) -> Any:
        if name in _PRIVATE:
            raise NotProvidedError(
                f"{module}.{name} is {_PRIVATE[name]}; sdpa_flash.compat provides flash-attn 2.8's public API only "
                "(flash_attn_func, the packed and varlen variants, flash_attn_with_kvcache, bert_padding). For "
                "(out, softmax_lse) call the public function with return_attn_probs=True (return_softmax_lse=True "
                "for flash_attn_with_kvcache); code that needs the kernel's private entry points needs the real "
                "flash-attn package.", name=module)
        raise AttributeError(f"module {module!r} (sdpa_flash.compat) has no attribute {name!r}")

    return __getattr__


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
    mod.__getattr__ = _missing(name)  # type: ignore[method-assign]
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
