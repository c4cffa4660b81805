"""What this machine can run: a frozen, hashable description of one device.

Probing is lazy and cached per device: importing sdpa_flash touches no GPU. A :class:`Capabilities` is plain
data, so the planner can be exercised with constructed profiles (``Capabilities.synthetic(...)``) for GPUs
that are not present, which is how the test-suite checks decisions for sm70 ... sm100 on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from typing import Any

import torch

from . import _caches
from .backends import BACKENDS
from .spec import cudnn_release, cudnn_version_tuple, format_cudnn_version

__all__ = ["Capabilities", "capabilities", "cudnn_release", "cudnn_version_tuple", "format_cudnn_version"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one device and this PyTorch build can do.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        device_index: CUDA ordinal, or ``None`` for the CPU.
        name: the device's name (``"NVIDIA H200"``), or ``"cpu"``.
        compute_capability: ``(major, minor)`` on CUDA, ``None`` elsewhere.
        sm_count: number of streaming multiprocessors (CUDA only).
        total_memory: device memory in bytes (CUDA only).
        torch_version: ``torch.__version__`` without the local part (``"2.11.0"``).
        cuda_version: the CUDA runtime PyTorch was built with, or ``None``.
        hip_version: the ROCm/HIP version PyTorch was built with, or ``None``.
        cudnn_version: cuDNN's version as an integer (``91900`` for 9.19.0, ``8907`` for 8.9.7; see
            :func:`cudnn_version_tuple`), or ``None``.
        backends: the backends this build and install have for this device (``"flash"``, ``"cudnn"``, ...), as
            each registered backend's own probe (``Backend.missing_reason``) finds them.
        flash_impl: the flash implementation registered with PyTorch (torch >= 2.10), e.g. ``"FA3"``;
            ``None`` means PyTorch's built-in FlashAttention-2 (or no flash kernel at all).
        kernels: ``(backend, version)`` of each backend installed as its own package (``("fa4", "4.0.0b36")``
            for flash-attn-4), read from package metadata; see :meth:`kernel_version`.
        missing: ``(backend, reason)`` for each registered backend this device lacks, as its probe put it
            (``Backend.missing_reason``); see :meth:`missing_reason`.
        probed: ``True`` when read from a real device of this process, ``False`` for a constructed profile.
    """

    device_type: str
    device_index: int | None = None
    name: str = ""
    compute_capability: tuple[int, int] | None = None
    sm_count: int | None = None
    total_memory: int | None = None
    torch_version: str = ""
    cuda_version: str | None = None
    hip_version: str | None = None
    cudnn_version: int | None = None
    backends: frozenset[str] = frozenset()
    flash_impl: str | None = None
    kernels: tuple[tuple[str, str], ...] = ()
    missing: tuple[tuple[str, str], ...] = ()
    probed: bool = False

    def kernel_version(self, backend: str) -> str | None:
        """The installed version of ``backend``'s own package (``"4.0.0b36"`` for ``"fa4"``), or ``None``."""
        for name, version in self.kernels:
            if name == backend:
                return version
        return None

    def missing_reason(self, backend: str) -> str | None:
        """Why the probe found no kernel of ``backend`` here (``None``: it found one, or gave no reason)."""
        for name, reason in self.missing:
            if name == backend:
                return reason
        return None

    @property
    def arch(self) -> str:
        """A short architecture tag: ``"sm90"``, ``"cpu"``, ``"rocm"``."""
        if self.device_type == "cuda" and self.hip_version:
            return "rocm"
        if self.compute_capability is not None:
            major, minor = self.compute_capability
            return f"sm{major}{minor}"
        return self.device_type

    @classmethod
    def synthetic(
        cls,
        device_type: str = "cuda",
        compute_capability: tuple[int, int] | None = (9, 0),
        *,
        torch_version: str | None = None,
        cudnn_version: int | None = 91900,
        backends: frozenset[str] | None = None,
        name: str | None = None,
        kernels: dict[str, str] | None = None,
        **extra: Any,
    ) -> Capabilities:
        """A constructed profile, e.g. ``Capabilities.synthetic("cuda", (7, 5))`` for a T4, or
        ``Capabilities.synthetic("cuda", (9, 0), kernels={"fa4": "4.0.0b36"})`` for an H100 with FlashAttention-4.

        Unless given, ``backends`` is every registered backend with requirements for the device type, less those
        installed as their own package that ``kernels`` does not list: what a stock CUDA (or CPU) build of PyTorch
        ships, plus the plug-ins.
        """
        if device_type == "cpu":
            compute_capability = None
            cudnn_version = None
        kernels = dict(kernels or {})
        if backends is None:
            backends = frozenset(
                n for n, b in BACKENDS.items() if device_type in b.REQUIREMENTS
                and (b.PACKAGE is None or n in kernels))
        return cls(
            device_type=device_type,
            device_index=0 if device_type == "cuda" else None,
            name=name if name is not None else (f"synthetic {device_type} {compute_capability or ''}".strip()),
            compute_capability=compute_capability,
            torch_version=torch_version or _torch_version(),
            cuda_version="13.0" if device_type == "cuda" else None,
            cudnn_version=cudnn_version,
            backends=backends,
            kernels=tuple(sorted(kernels.items())),
            probed=False,
            **extra,
        )


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def capabilities(device: torch.device | str | int | None = None) -> Capabilities:
    """Probe (once, then cached) what ``device`` can run.

    Args:
        device: a ``torch.device``, a string such as ``"cuda:1"`` or ``"cpu"``, a CUDA ordinal, or ``None``
            for the current CUDA device when CUDA is available and the CPU otherwise.

    Returns:
        The device's :class:`Capabilities`.
    """
    if device is None:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    elif isinstance(device, int):
        dev = torch.device("cuda", device)
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _probe(dev.type, dev.index)


@functools.cache
def _probe(device_type: str, index: int | None) -> Capabilities:
    device = torch.device(device_type, index)  # type: ignore[arg-type]  # index None works; torch's stubs say int
    missing = tuple((name, why) for name, b in BACKENDS.items() if (why := b.missing_reason(device)) is not None)
    backends = frozenset(BACKENDS).difference(name for name, _ in missing)
    common: dict[str, Any] = {
        "torch_version": _torch_version(),
        "cuda_version": torch.version.cuda,
        "hip_version": getattr(torch.version, "hip", None),
        "backends": backends,
        "kernels": tuple((n, v) for n in sorted(BACKENDS) if (v := BACKENDS[n].installed_version()) is not None),
        "missing": missing,
        "probed": True,
    }
    if device_type == "cpu":
        return Capabilities(device_type="cpu", name="cpu", total_memory=_host_memory(), **common)
    if device_type != "cuda":
        # MPS, XPU, ...: PyTorch's fused kernels of other devices are reached through its own dispatcher, which
        # sdpa_flash does not model: the math reference and chunked (plain ops) run there.
        return Capabilities(device_type=device_type, device_index=index, name=device_type, **common)
    props = torch.cuda.get_device_properties(index)
    return Capabilities(
        device_type="cuda",
        device_index=index,
        name=props.name,
        compute_capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        total_memory=props.total_memory,
        cudnn_version=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        flash_impl=_flash_impl(),
        **common,
    )


_caches.register("capability.probe", _probe.cache_clear)


def _host_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def _flash_impl() -> str | None:
    impl = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    if impl is None:
        return None
    try:
        value = impl()
    except Exception:  # a registry that cannot answer is the same as no registration
        return None
    return None if value is None else str(value)


# ------------------------------------------------------------------------------------- optional torch APIs
TORCH_FEATURE_APIS: dict[str, tuple[str, ...]] = {
    "flash_impl_registry": ("torch.nn.attention.register_flash_attention_impl",
                            "torch.nn.attention.activate_flash_attention_impl",
                            "torch.nn.attention.current_flash_attention_impl"),
    "varlen_attn": ("torch.nn.attention.varlen.varlen_attn",),
    "cudnn_attention": ("torch.backends.cuda.can_use_cudnn_attention", "torch._scaled_dot_product_cudnn_attention"),
    "flex_attention": ("torch.nn.attention.flex_attention",),
}
"""Each optional feature and the public names it needs, all of which must be present for it to count as found."""


@dataclasses.dataclass(frozen=True)
class TorchFeatures:
    """Which optional PyTorch attention APIs this torch build has, found by looking for them (never by version).

    Attributes:
        flash_impl_registry: ``torch.nn.attention.register_flash_attention_impl`` / ``activate_...`` /
            ``current_flash_attention_impl`` (a swappable CUDA flash implementation, such as FA3 or FA4).
        varlen_attn: ``torch.nn.attention.varlen.varlen_attn`` (flash varlen with ``cu_seqlens``).
        cudnn_attention: ``torch.backends.cuda.can_use_cudnn_attention`` and
            ``torch._scaled_dot_product_cudnn_attention``.
        flex_attention: the ``torch.nn.attention.flex_attention`` module (located, not imported).
        missing: every name looked for and not found, dotted.
    """

    flash_impl_registry: bool
    varlen_attn: bool
    cudnn_attention: bool
    flex_attention: bool
    missing: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, bool]:
        """``{feature: found}`` for each feature of :data:`TORCH_FEATURE_APIS`."""
        return {name: bool(getattr(self, name)) for name in TORCH_FEATURE_APIS}


def _has_api(dotted: str) -> bool:
    """Whether ``dotted`` (``"torch.a.b"``) names an attribute or module, importing at most a not-yet-imported
    submodule on the way to an attribute (a final module is located with ``find_spec``, not imported)."""
    import importlib
    import importlib.util

    parts = dotted.split(".")
    obj: Any = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        name = ".".join(parts[:i])
        if not isinstance(obj, types.ModuleType):
            return False
        try:
            if importlib.util.find_spec(name) is None:
                return False
            if i == len(parts):
                return True
            obj = importlib.import_module(name)
        except Exception:  # a submodule that fails to import is a feature this build does not have
            return False
    return True


@functools.cache
def torch_features() -> TorchFeatures:
    """Probe (once, then cached) which optional attention APIs this torch has; touches no GPU.

    Returns:
        A :class:`TorchFeatures`. ``python -m sdpa_flash`` prints it under "torch APIs".
    """
    found = {api: _has_api(api) for apis in TORCH_FEATURE_APIS.values() for api in apis}
    return TorchFeatures(**{name: all(found[a] for a in apis) for name, apis in TORCH_FEATURE_APIS.items()},
                         missing=tuple(a for a, ok in found.items() if not ok))


__all__ += ["TORCH_FEATURE_APIS", "TorchFeatures", "cudnn_version_tuple", "torch_features"]
