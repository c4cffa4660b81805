"""Registration with transformers (its attention and mask interfaces), the check that a model runs here, and
the loader that answers transformers' flash-attention imports for a "flash" name with sdpa_flash.compat."""

from __future__ import annotations

import sys
import warnings
from typing import Any

from ...errors import AttentionInputError
from ...policy import PolicyLike
from . import _masks
from ._forward import make_attention_forward
from ._masks import _masking_utils, mask_function

__all__ = ["MIN_TRANSFORMERS", "check", "register", "registered", "restore_sdpa", "unregister"]

MIN_TRANSFORMERS = "4.53"
"""The oldest transformers with ``AttentionInterface`` and ``AttentionMaskInterface`` (tested: 4.57, 5.17-5.25)."""

_registered: dict[str, Any] = {}  # name -> policy
_forwards: dict[str, Any] = {}  # name -> the attention function registered under it (kept: re-registering is a no-op)
_sdpa_originals: dict[str, tuple[Any, Any]] = {}  # "sdpa" -> transformers' own (attention, mask) functions


def register(name: str = "sdpa_flash", *, policy: PolicyLike | None = None, replace_sdpa: bool = False) -> str:
    """Register sdpa_flash with transformers under ``name`` (idempotent); imports transformers.

    Afterwards ``AutoModel*.from_pretrained(..., attn_implementation=name)`` (or ``from_config``, or
    ``model.set_attn_implementation(name)``) runs every attention layer through :func:`sdpa_flash.attention`.
    Without it transformers raises its own ``ValueError: Specified `attn_implementation="sdpa_flash"` is not
    supported. The only possible arguments are ...`` (it validates the name itself; nothing of sdpa_flash runs
    there). Calling it again with the same arguments does nothing (sub-microsecond; the function transformers holds
    stays the same object).

    Args:
        name: the ``attn_implementation`` to register. A name containing ``"flash"`` (the default does) is
            treated by transformers as a flash-attention kernel; see the package docstring for what that changes
            and how it is handled.
        policy: the sdpa_flash policy for this name's calls (``None``: the policy in force at each call). Register
            the same function under several names to use several policies.
        replace_sdpa: also answer transformers' own ``"sdpa"`` with sdpa_flash (its attention and mask functions;
            :func:`restore_sdpa` undoes it). For tools that only know ``"sdpa"``, e.g. LLaMA-Factory's
            ``--flash_attn sdpa``. Masks stay exactly transformers' ``sdpa`` masks.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is not installed, or older than :data:`MIN_TRANSFORMERS`, or has no
            ``AttentionMaskInterface`` (before 4.53).
        AttentionInputError: ``name`` is empty or one of transformers' own implementations.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") or \
            name.startswith(("flash_attention_", "paged|")):
        raise AttentionInputError(f"Expected a new attn_implementation name, but got {name!r}, which is empty or "
                                  "one of transformers' own implementations.")
    if _registered.get(name, _NOTHING) == policy and not replace_sdpa and _still_registered(name):
        return name  # already in place: nothing to do (and the function object transformers holds stays the same)
    try:
        import transformers
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(f"sdpa_flash.integrations.transformers needs transformers>={MIN_TRANSFORMERS}: "
                          "pip install 'sdpa_flash[hf]'") from exc
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError(f"sdpa_flash needs transformers' AttentionMaskInterface (4.53+), but transformers "
                          f"{transformers.__version__} has none: pip install -U transformers") from exc
    _masking_utils()
    forward = make_attention_forward(policy)
    _forwards[name] = forward
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, mask_function)
    if _flash_named(name):
        _install_flash_loader(name)
    _registered[name] = policy
    if replace_sdpa:
        _sdpa_originals.setdefault("sdpa", (AttentionInterface._global_mapping["sdpa"],
                                            AttentionMaskInterface._global_mapping["sdpa"]))
        AttentionInterface.register("sdpa", forward)
        AttentionMaskInterface.register("sdpa", mask_function)
    return name


_NOTHING = object()


def _still_registered(name: str) -> bool:
    """Whether transformers' interfaces still map ``name`` to what :func:`register` put there (imports nothing)."""
    mu = _masks._MASKING_UTILS
    attn = getattr(sys.modules.get("transformers.modeling_utils"), "AttentionInterface", None)
    if mu is None or attn is None:
        return False
    return (attn._global_mapping.get(name) is _forwards.get(name)
            and mu.AttentionMaskInterface._global_mapping.get(name) is mask_function)


def check(model: Any) -> str:
    """The sdpa_flash name ``model``'s attention runs under; raises with the reason when it does not.

    transformers keeps a model's ``attn_implementation`` on its config object and reads it at every call. Models
    built from one config object (``from_config(config)``, ``Model(config)``) share it, so building a second model
    from the same config object with another ``attn_implementation=``, or ``set_attn_implementation`` on either
    one, switches both, silently: sdpa_flash is then simply not called (and :func:`route_counts` stays ``{}``).
    Build each model from its own copy (``copy.deepcopy(config)``), and call ``check(model)`` where it matters.

    Args:
        model: a transformers model (its ``config`` and every submodule's ``config`` are read).

    Returns:
        The registered name (``"sdpa_flash"``; ``"sdpa"`` after ``register(replace_sdpa=True)``).

    Raises:
        AttentionInputError: a config of the model names an implementation sdpa_flash did not register here, or
            nothing was registered (call :func:`register` first).
    """
    configs = {id(c): c for c in (getattr(model, "config", None),
                                  *(getattr(m, "config", None) for m in getattr(model, "modules", list)()))
               if c is not None and hasattr(c, "_attn_implementation")}
    ours = set(_registered) | ({"sdpa"} if "sdpa" in _sdpa_originals else set())
    found = list(dict.fromkeys(getattr(c, "_attn_implementation", None) for c in configs.values()))
    other = [impl for impl in found if impl not in ours]
    where = type(model).__name__
    if not _registered:
        raise AttentionInputError(
            f"Expected sdpa_flash to be registered with transformers, but nothing was registered in this process "
            f"instead ({where} runs {', '.join(map(repr, found)) or 'no attention'}): call "
            "sdpa_flash.integrations.transformers.register() before building the model.")
    if other or not found:
        raise AttentionInputError(
            f"Expected {where}'s attention to run through sdpa_flash ({', '.join(map(repr, sorted(ours)))}), but its "
            f"config says attn_implementation={other[0] if other else None!r} instead. transformers keeps the "
            "implementation on the config object, which every model built from it shares and reads at each call: "
            "building another model from the same config object with another attn_implementation (or "
            "set_attn_implementation on any of them) switches them all. Build each model from its own copy "
            f"(copy.deepcopy(config)); model.set_attn_implementation({sorted(_registered)[0]!r}) switches this one "
            "back.")
    return str(found[0])


def restore_sdpa() -> bool:
    """Give ``"sdpa"`` back to transformers' own functions after ``register(replace_sdpa=True)``; True if it did."""
    if "sdpa" not in _sdpa_originals:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    attn, mask = _sdpa_originals.pop("sdpa")
    AttentionInterface.register("sdpa", attn)
    AttentionMaskInterface.register("sdpa", mask)
    return True


def unregister(name: str = "sdpa_flash") -> None:
    """Remove ``name`` from transformers' attention and mask interfaces (models built with it stop working)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    loader = _flash_loader()
    if loader is not None:
        loader._sdpa_flash_names.discard(name)
    _registered.pop(name, None)
    _forwards.pop(name, None)


def registered() -> dict[str, Any]:
    """The names registered by this process, with their policies."""
    return dict(_registered)


def _flash_named(name: str) -> bool:
    """Whether transformers takes ``name`` for a flash-attention kernel (asked of transformers where it can say)."""
    try:
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:  # transformers 4.x recognises flash attention by the prefix "flash_attention" only
        return False
    return bool(is_flash_attention_requested(requested_attention_implementation=name))


def _flash_loader() -> Any:
    try:
        import transformers.modeling_flash_attention_utils as fau
    except ImportError:
        return None
    fn = getattr(fau, "_lazy_imports", None)
    return fn if getattr(fn, "_sdpa_flash_names", None) is not None else None


def _install_flash_loader(name: str) -> None:
    """Answer transformers' ``lazy_import_flash_attention(name)`` with sdpa_flash.compat (once per process).

    transformers calls it when a model is built with a "flash" name and would otherwise look for a Hub kernel
    called ``name``. Every other name still goes to transformers' own loader.
    """
    import transformers.modeling_flash_attention_utils as fau

    loader = _flash_loader()
    if loader is None:
        original = getattr(fau, "_lazy_imports", None)
        if original is None:
            warnings.warn(f"sdpa_flash: this transformers has no modeling_flash_attention_utils._lazy_imports; a model "
                          f"built with attn_implementation={name!r} may look for a flash-attention kernel of that "
                          "name. Register a name without 'flash' if it does.", UserWarning, stacklevel=3)
            return
        names: set[str] = set()

        def _lazy_imports(implementation: Any, *args: Any, **kwargs: Any) -> Any:
            if implementation in names:
                return _flash_functions(fau)
            return original(implementation, *args, **kwargs)

        _lazy_imports._sdpa_flash_names = names  # type: ignore[attr-defined]  # a function attribute
        _lazy_imports._sdpa_flash_original = original  # type: ignore[attr-defined]  # a function attribute
        fau._lazy_imports = _lazy_imports
        loader = _lazy_imports
    loader._sdpa_flash_names.add(name)


def _flash_functions(fau: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input, unpad_input)."""
    pad, unpad = getattr(fau, "_pad_input", None), getattr(fau, "_unpad_input", None)
    try:
        from ...compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError as exc:
        why = str(exc)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise ImportError(f"This model calls flash-attention functions directly for a 'flash' "
                              f"attn_implementation, and sdpa_flash.compat is not importable ({why}).")

        return missing, missing, None, pad, unpad
    return flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad, unpad
