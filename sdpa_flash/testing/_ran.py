"""What ran: the attention kernels a call actually ran, seen by ``torch.profiler``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ran_backends"]

_KERNEL_EVENTS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_backward": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "flash",
    "aten::_flash_attention_forward": "flash",
    "aten::_flash_attention_backward": "flash",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_cudnn_attention_backward": "cudnn",
    "aten::_cudnn_attention_forward": "cudnn",
    "aten::_cudnn_attention_backward": "cudnn",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_efficient_attention_backward": "efficient",
    "aten::_efficient_attention_forward": "efficient",
    "aten::_efficient_attention_backward": "efficient",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_fused_attention_overrideable_backward": "overrideable",
    "_Chunked": "chunked",  # the chunked backend's autograd.Function, recorded under its class name
    "_ChunkedBackward": "chunked",
}


def ran_backends(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> set[str]:
    """Which attention kernels ``fn(*args, **kwargs)`` actually ran, observed with ``torch.profiler``.

    Every PyTorch op call is recorded (CPU-side, so CUDA kernels are seen at their launch), including
    composite ones such as the math backend's, and the chunked backend's ``autograd.Function``. Nothing about
    the call changes: no torch function mode is pushed (which would make ``attention()`` take the
    ``F.scaled_dot_product_attention`` route). Cannot nest inside another active profiler.

    Kernels that are not an aten op (FlashAttention-4's CuTe kernels, a plug-in's Triton kernel) are seen by the
    names their backend declares (:attr:`Backend.PROFILER_NAMES <sdpa_flash.backends.Backend.PROFILER_NAMES>`),
    among the GPU kernels the profiler records on CUDA.

    Returns:
        A subset of ``{"flash", "cudnn", "efficient", "math", "chunked", "overrideable"}`` and of the registered
        backends that declare profiler names (``"fa4"``); empty when no attention kernel ran (e.g. ``fn`` raised
        before running one, which propagates).

    Example:
        >>> q = torch.randn(1, 2, 8, 16)
        >>> ran_backends(lambda: sdpa_flash.attention(q, q, q, policy="math"))  # doctest: +SKIP
        {'math'}
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..backends import BACKENDS

    # (the GPU trace costs each profile a CUPTI session: only where such a kernel can run at all)
    declared = {name: b.PROFILER_NAMES for name, b in BACKENDS.items()
                if b.PROFILER_NAMES and (b.PACKAGE is None or b.installed_version() is not None)}
    activities = [ProfilerActivity.CPU]
    if declared and torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn(*args, **kwargs)
    names = {e.name for e in prof.events()}
    ran = {_KERNEL_EVENTS[n] for n in names if n in _KERNEL_EVENTS}
    return ran | {b for b, subs in declared.items() if any(s in n for n in names for s in subs)}
