"""FlashAttention-4 inside PyTorch's own SDPA: ``F.scaled_dot_product_attention``'s FLASH backend runs FA4.

``sdpa_flash.attention`` calls FA4 itself and needs none of this. This is for code that calls
``torch.nn.functional.scaled_dot_product_attention`` directly, nested (jagged) tensors, and PyTorch layers that
intercept SDPA (context parallel): after :func:`activate`, PyTorch's FLASH backend — the aten flash ops, so also
``sdpa_flash``'s ``"flash"`` backend and its varlen op — is FA4, through the adapter PyTorch registers under the
name ``"FA4"`` (``torch.nn.attention.activate_flash_attention_impl``).

It is process-wide (the dispatcher's kernels are replaced) and not thread-safe, so it happens only on an
explicit call, once, at start-up; :func:`restore` puts PyTorch's FlashAttention-2 back.

Which torch gets what (flash-attn-4 4.0.0b36):

* torch >= 2.14.1: works; torch's adapter takes the five values FA4's forward returns.
* torch 2.10-2.14.0: the registry and an ``"FA4"`` entry exist, but the adapter unpacks exactly two values
  (``out, lse = ...``), and FA4 returns four since 4.0.0b19 and five in 4.0.0b36: every FLASH call fails with
  "too many values to unpack" (pytorch/pytorch#190212; measured on the H200 with torch 2.11). :func:`activate`
  checks this with one small call and, when it fails, restores FA2 and raises
  :class:`~sdpa_flash.BackendUnavailableError` saying so.
* older torch: no registry; :func:`activate` raises.

The check is behaviour, not a version number: a torch that fixes the adapter passes it whatever its version.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..errors import BackendUnavailableError

__all__ = ["activate", "active", "restore"]


def _registry() -> ModuleType:  # torch.nn.attention
    attn = torch.nn.attention
    needed = ("activate_flash_attention_impl", "restore_flash_attention_impl", "list_flash_attention_impls")
    if not all(hasattr(attn, n) for n in needed):
        raise BackendUnavailableError(f"torch {torch.__version__} has no flash attention registry "
                                      "(torch.nn.attention.activate_flash_attention_impl); it came with torch 2.10")
    if "FA4" not in attn.list_flash_attention_impls():
        raise BackendUnavailableError(f"torch {torch.__version__}'s flash attention registry has no 'FA4' entry "
                                      f"(it lists: {', '.join(attn.list_flash_attention_impls()) or 'nothing'})")
    return attn


def active() -> bool:
    """Whether PyTorch's FLASH backend is FA4 now."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    try:
        return current is not None and current() == "FA4"
    except Exception:  # a registry that cannot answer has nothing active
        return False


def _check(device: torch.device) -> None:
    """One small forward and backward through F.sdpa's FLASH backend, against the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    err = float((out.float() - ref).abs().max())
    if not err < 0.05 or q.grad is None or not torch.isfinite(q.grad).all():
        raise RuntimeError(f"FLASH output differs from math by {err:.3g} on a (1, 2, 256, 64) causal call")


def activate(device: torch.device | str | None = None) -> None:
    """Make PyTorch's FLASH backend FlashAttention-4, process-wide, after checking that it works here.

    Raises:
        BackendUnavailableError: no registry or no FA4 entry in this torch, FA4 not installed or not importable,
            no CUDA device, or torch's adapter fails with the installed FA4 (then FA2 is restored).
    """
    from .. import planner as _planner
    from ..backends import fa4
    from ..capability import _probe

    attn = _registry()
    try:
        fa4.load()
    except ImportError as exc:
        raise BackendUnavailableError(str(exc)) from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("FlashAttention-4 needs a CUDA GPU; none is visible")
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    attn.activate_flash_attention_impl("FA4")
    try:
        _check(dev)
    except Exception as exc:
        attn.restore_flash_attention_impl()
        raise BackendUnavailableError(
            f"torch {torch.__version__}'s FA4 adapter does not work with flash-attn-4 {fa4.installed_version()}: "
            f"{type(exc).__name__}: {exc}. Before torch 2.14.1 the adapter unpacks two values from FA4's forward, "
            "which returns five in 4.0.0b36 (pytorch/pytorch#190212). PyTorch's FlashAttention-2 is restored; "
            "sdpa_flash.attention() calls FA4 directly on any torch.") from None
    finally:
        _probe.cache_clear()  # Capabilities.flash_impl changed
        _planner._invalidate()


def restore() -> None:
    """Put PyTorch's own FlashAttention-2 back (a no-op when FA4 is not active)."""
    from .. import planner as _planner
    from ..capability import _probe

    if active():
        _registry().restore_flash_attention_impl()
    _probe.cache_clear()
    _planner._invalidate()
