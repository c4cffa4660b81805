"""``require()``: a startup check that fails a job early, with reasons, when a policy cannot run here."""

from __future__ import annotations

import torch

from .capability import capabilities
from .errors import BackendUnavailableError
from .policy import Plan, PolicyLike, plan, resolve_policy
from .spec import AttentionSpec

__all__ = ["require"]


def require(
    policy: PolicyLike = "auto",
    device: torch.device | str | int | None = None,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int = 128,
    seqlen: int = 1024,
    heads: int = 16,
    kv_heads: int | None = None,
    causal: bool = True,
    needs_grad: bool = True,
) -> Plan:
    """Check that ``policy`` can run a typical attention call on ``device``; return the plan it would follow.

    The call checked is ``(1, heads, seqlen, head_dim)`` in ``dtype`` (default: bfloat16 on GPUs that support
    it, float16 on older ones, float32 on the CPU), causal, with a backward, unless told otherwise.

    Example:
        >>> sdpa_flash.require("flash", "cpu", dtype=torch.float32).backend
        'flash'

    Raises:
        BackendUnavailableError: the policy cannot run such a call here (the message lists every backend
            tried and why), or the device does not exist.
    """
    pol = resolve_policy(policy)
    dev = torch.device(device) if isinstance(device, str) else device
    if isinstance(dev, int) or (isinstance(dev, torch.device) and dev.type == "cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"Policy {pol} was required on {dev}, but CUDA is not available to this PyTorch "
                f"({torch.__version__}; CUDA build: {torch.version.cuda})."
            )
    caps = capabilities(dev)
    if dtype is None:
        if caps.device_type == "cuda":
            dtype = torch.bfloat16 if (caps.compute_capability or (0, 0)) >= (8, 0) else torch.float16
        else:
            dtype = torch.float32
    spec = AttentionSpec(
        device_type=caps.device_type, dtype=dtype, batch=1, heads_q=heads, heads_kv=kv_heads or heads,
        seqlen_q=seqlen, seqlen_k=seqlen, head_dim=head_dim, head_dim_v=head_dim,
        causal="top_left" if causal else None, needs_grad=needs_grad,
    )
    return plan(spec, caps, pol)
