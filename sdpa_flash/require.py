"""``require()``: a startup check that fails a job early, with reasons, when a policy cannot run here."""

from __future__ import annotations

import torch

from .capability import capabilities
from .errors import AttentionInputError, BackendUnavailableError
from .planner import Plan, plan
from .policy import PolicyLike, resolve_policy
from .spec import FLOAT_DTYPES, AttentionSpec

__all__ = ["parse_device", "require"]

_DEVICE_DOC = "a torch.device, a device string such as 'cpu' or 'cuda:1', a CUDA ordinal or None"


def parse_device(device: torch.device | str | int | None) -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``: the current CUDA device, else the CPU).

    Raises:
        AttentionInputError: not a device (the message names the value).
        BackendUnavailableError: a CUDA device that this PyTorch or machine does not have.
    """
    if device is None or isinstance(device, torch.device):
        dev = device
    elif isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        dev = torch.device("cuda", device)
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise AttentionInputError(f"Expected device to be {_DEVICE_DOC}, but got {device!r} instead.") from None
    else:
        raise AttentionInputError(f"Expected device to be {_DEVICE_DOC}, but got {device!r} instead.")
    if dev is not None and dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"Expected a CUDA device, but CUDA is not available to this PyTorch "
                                          f"({torch.__version__}; CUDA build: {torch.version.cuda}); got {device!r}.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailableError(f"Expected a CUDA device index below {torch.cuda.device_count()} (the "
                                          f"visible GPUs), but got {device!r} instead.")
    return dev


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
    """Check that ``policy`` can run one typical attention call on ``device``; return the plan it would follow.

    A startup check: it is meant to fail a job that landed on the wrong machine, so ``device=None`` means the
    current CUDA GPU and raises where no CUDA GPU is visible, even though PyTorch has CPU kernels. Pass
    ``device="cpu"`` to check the CPU (``require("fused", "cpu")`` passes there: PyTorch's CPU flash kernel is
    fused, with O(N) memory).

    It checks exactly one call shape: query, key and value ``(1, heads, seqlen, head_dim)`` (``kv_heads`` key/value
    heads when given) in ``dtype`` (default: bfloat16 on GPUs that support it, float16 on older ones, float32 on
    the CPU), causal when ``causal``, with a backward when ``needs_grad`` — by default ``(1, 16, 1024, 128)``,
    causal, with a backward. Other calls may decide differently: on the CPU, PyTorch's flash kernel is
    denylisted for calls with fewer than 16 keys (8 in float64; pytorch/pytorch#141128) — ``"auto"`` reroutes
    them to math, ``"flash"`` refuses them — so ``require("flash", "cpu", seqlen=8)`` raises. Pass the
    parameters of the calls your job makes to check those.

    Example:
        >>> sdpa_flash.require("flash", "cpu", dtype=torch.float32).backend
        'flash'

    Raises:
        BackendUnavailableError: the policy cannot run such a call here (the message lists every backend
            tried and why), ``device`` is ``None`` and no CUDA GPU is visible, or the device does not exist.
    """
    pol = resolve_policy(policy)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise AttentionInputError("Expected dtype to be None or a floating-point torch.dtype (float16, bfloat16, "
                                  f"float32, float64), but got {dtype!r} instead.")
    for name, n in (("head_dim", head_dim), ("seqlen", seqlen), ("heads", heads)):
        if type(n) is not int or n <= 0:
            raise AttentionInputError(f"Expected {name} to be a positive int, but got {n!r} instead.")
    if kv_heads is not None and (type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads):
        raise AttentionInputError(f"Expected kv_heads to be None or a positive divisor of heads={heads} (GQA/MQA), "
                                  f"but got {kv_heads!r} instead.")
    if device is None and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"Expected a CUDA GPU for policy {pol} (device=None means the current CUDA GPU), but no CUDA GPU is "
            f"visible to this PyTorch ({torch.__version__}; CUDA build: {torch.version.cuda}) instead. To check "
            "the CPU, pass device='cpu' (on the command line: --device cpu).")
    try:
        dev = parse_device(device)
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(f"Policy {pol} was required on {device!r}: {exc}") from None
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
