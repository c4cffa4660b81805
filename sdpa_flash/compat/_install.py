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


class _ModuleNotProvided(NotProvidedError, ModuleNotFoundError):
    """A ``flash_attn`` submodule that this layer does not provide (``flash_attn.layers.rotary``, ...)."""


def _no_module(fullname: str) -> _ModuleNotProvided:
    return _ModuleNotProvided(
        f"No module named {fullname!r}: flash_attn here is sdpa_flash's drop-in (sdpa_flash.compat.install(); the "
        "real flash-attn package is not installed), and it provides flash-attn 2.8's public attention API only: "
        "flash_attn (flash_attn_func, the qkvpacked/kvpacked and varlen variants, flash_attn_with_kvcache), "
        "flash_attn.flash_attn_interface and flash_attn.bert_padding. For flash_attn's layers, modules and ops "
        "(rotary, MHA, fused dense, ...) install flash-attn itself.", name=fullname)


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
        mod.__all__ = list(bp.__all__)  # type: ignore[attr-defined]  # ModuleType declares no __all__
        mod.__doc__ = bp.__doc__
        return mod
    for f, fn in funcs.items():
        setattr(mod, f, fn)
    mod.__getattr__ = _missing(name)  # type: ignore[method-assign]  # a module's __getattr__ (PEP 562)
    mod.__all__ = sorted(funcs)  # type: ignore[attr-defined]  # ModuleType declares no __all__
    if name == "flash_attn":
        mod.__version__ = FLASH_ATTN_VERSION  # type: ignore[attr-defined]  # nor __version__
        # a package, so its submodules import; where FlashAttention-4 is installed, its flash_attn.cute with them
        mod.__path__ = list(_SHARED_PATH)
        mod.__doc__ = ("flash-attn's API provided by sdpa_flash.compat (sdpa_flash.compat.install()); the real "
                       "flash-attn package is not installed.")
        if _SHADOWED is not None:  # FA4's namespace package was imported first: keep its loaded submodules
            for key, value in vars(_SHADOWED).items():
                if isinstance(value, types.ModuleType) and not hasattr(mod, key):
                    setattr(mod, key, value)
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
            if not fullname.startswith("flash_attn.") or not getattr(sys.modules.get("flash_attn"), _MARK, False):
                return None
            # A submodule of our flash_attn: another finder may have it (FlashAttention-4's flash_attn.cute, where
            # this finder goes first); else it is one this layer does not provide, and the error says so.
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None) if finder is not self else None
                spec = find(fullname, path, target) if find is not None else None
                if spec is not None:
                    return spec
            raise _no_module(fullname)
        return importlib.machinery.ModuleSpec(fullname, _LOADER, is_package=fullname == "flash_attn",
                                              origin="sdpa_flash.compat")


_LOADER = _Loader()
_FINDER: _Finder | None = None
_SHARED_PATH: list[str] = []  # the folders of a flash_attn namespace package (FlashAttention-4's flash_attn.cute)
_SHADOWED: types.ModuleType | None = None  # that namespace package's module, when it was imported before install()


def _namespace_path(spec: importlib.machinery.ModuleSpec | None) -> list[str] | None:
    """The folders of a namespace package's spec (a package without a file of its own), else ``None``."""
    if spec is None or spec.origin not in (None, "namespace") or spec.submodule_search_locations is None:
        return None
    return list(spec.submodule_search_locations)


def _flash_attn_here() -> tuple[str, list[str]]:
    """What ``import flash_attn`` finds: ``("ours", [])``, ``("real", [])`` (flash-attn 2, which has an
    ``__init__.py``), ``("namespace", folders)`` (only FlashAttention-4's ``flash_attn/cute``, which ships no
    ``flash_attn/__init__.py``) or ``("absent", [])``. Finding a top-level name imports nothing."""
    mod = sys.modules.get("flash_attn")
    if mod is not None:
        if getattr(mod, _MARK, False):
            return "ours", []
        spec = getattr(mod, "__spec__", None)
    else:
        try:
            spec = importlib.util.find_spec("flash_attn")
        except (ImportError, ValueError):
            return "absent", []
        if spec is None:
            return "absent", []
    folders = _namespace_path(spec)
    return ("real", []) if folders is None else ("namespace", folders)


def install() -> bool:
    """Make ``import flash_attn`` (and ``flash_attn.flash_attn_interface``, ``flash_attn.bert_padding``) give this
    layer — only when the real flash-attn package is absent. Idempotent.

    FlashAttention-4 (``pip install "sdpa_flash[fa4]"``) is not "the real package": it ships only
    ``flash_attn.cute``, without ``flash_attn/__init__.py``. With it installed, ``flash_attn`` resolves to this layer
    and ``flash_attn.cute`` still imports from FA4 (sdpa_flash's ``fa4`` backend needs it).

    Returns:
        ``True`` when ``flash_attn`` now resolves to this layer, ``False`` when the real package (flash-attn 2) is
        installed (it is then left alone).

    Example:
        >>> import sdpa_flash.compat
        >>> if sdpa_flash.compat.install():
        ...     from flash_attn import flash_attn_func   # sdpa_flash.compat.flash_attn_func
    """
    global _FINDER, _SHADOWED
    if _FINDER is not None:
        return True
    found, folders = _flash_attn_here()
    if found == "real":
        return False
    _FINDER = _Finder()
    if found == "namespace":
        # Python's path finder would answer ``flash_attn`` with the bare namespace package, so this finder goes
        # first (for its own three names only); the package it builds searches the same folders for submodules.
        _SHARED_PATH[:] = folders
        _SHADOWED = sys.modules.pop("flash_attn", None)
        sys.meta_path.insert(0, _FINDER)
    else:
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
    global _SHADOWED
    if _SHADOWED is not None:
        sys.modules.setdefault("flash_attn", _SHADOWED)
        _SHADOWED = None
    _SHARED_PATH.clear()
    importlib.invalidate_caches()


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _FINDER is not None
