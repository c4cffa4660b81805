"""``warmup()``: pay a kernel's one-time costs at start-up, not in the middle of the first training step.

Some kernels do work the first time they see a configuration: FlashAttention-4 JIT-compiles each new
(dtype, head dims, causal, GQA ratio, forward-only or training) combination for seconds (and imports its
package, seconds more), cuDNN builds an execution plan per shape. ``warmup`` runs the configurations a model
will use once, on small random inputs, and reports what that cost and what a second call costs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

from .errors import AttentionInputError

if TYPE_CHECKING:
    from .policy import PolicyLike
    from .varlen import VarlenBatch

__all__ = ["WarmupResult", "warmup"]


@dataclasses.dataclass(frozen=True)
class WarmupResult:
    """What one :func:`warmup` configuration cost.

    Attributes:
        backend: the backend that ran it (the varlen engine's packed kernel for ``varlen=True``).
        cold_seconds: wall time of the first call, forward (and backward with ``training=True``), synchronised.
        warm_seconds: the same call again: what is left once the one-time work is done.
        description: the configuration in words.
    """

    backend: str
    cold_seconds: float
    warm_seconds: float
    description: str

    def __str__(self) -> str:
        return (f"{self.description}: {self.backend}, first call {self.cold_seconds:.3f} s, then "
                f"{self.warm_seconds * 1e3:.2f} ms")


def _positive(name: str, value: object) -> int:
    if type(value) is not int or value <= 0:
        raise AttentionInputError(f"Expected {name} to be a positive int, but got {value!r} instead.")
    return value


def warmup(
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    kv_heads: int | None = None,
    head_dim_v: int | None = None,
    seqlen: int = 1024,
    seqlen_k: int | None = None,
    batch: int = 1,
    causal: bool | str = False,
    training: bool = True,
    varlen: bool = False,
    policy: PolicyLike | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: bool = False,
) -> WarmupResult:
    """Run one attention configuration once (forward, and backward with ``training``) so later calls are warm.

    Batch size and sequence lengths do not change which kernel FA4 compiles, except that a query that fits one
    tile (decode: ``seqlen=1``) gets its own kernel — warm that with ``seqlen=1, seqlen_k=...``.

    Args:
        heads, kv_heads: query heads and key/value heads (default: ``heads``; fewer for GQA).
        head_dim, head_dim_v: head dims (``head_dim_v`` defaults to ``head_dim``).
        dtype, device: as the model's (``device`` defaults to the current CUDA device).
        seqlen, seqlen_k, batch: the size of the warm-up call.
        causal: as for :func:`sdpa_flash.attention`.
        training: also run the backward (a separate compile for FA4).
        varlen: warm the packed path of :func:`sdpa_flash.varlen.varlen_attention` instead (two sequences of
            ``seqlen`` and ``seqlen // 2 + 1`` tokens).
        policy: the policy the model runs under (default: the one in force).
        window, softcap: as for :func:`sdpa_flash.attention`; sinks: pass (zero) sink logits, one per query head.
            Each is a configuration of its own for the kernels that take it (FA4's window and sinks, FlexAttention's
            softcap compile anew), so warm the ones the model uses.

    Returns:
        A :class:`WarmupResult`; ``str()`` of it is one line for a start-up log.

    Example::

        for hd, causal in ((128, True), (64, False)):
            print(sdpa_flash.warmup(heads=32, kv_heads=8, head_dim=hd, causal=causal))
    """
    from . import varlen as _varlen
    from .attention import attention, explain

    _positive("heads", heads)
    _positive("head_dim", head_dim)
    _positive("seqlen", seqlen)
    _positive("batch", batch)
    hkv = _positive("kv_heads", kv_heads) if kv_heads is not None else heads
    dv = _positive("head_dim_v", head_dim_v) if head_dim_v is not None else head_dim
    sk = _positive("seqlen_k", seqlen_k) if seqlen_k is not None else seqlen
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=dev, dtype=dtype).requires_grad_(training)

    variants: dict[str, Any] = {"window": window, "softcap": softcap,
                                "sinks": torch.zeros(heads, device=dev, requires_grad=training) if sinks else None}

    q: torch.Tensor | VarlenBatch  # (k, v likewise): packed batches with varlen, else dense tensors
    k: torch.Tensor | VarlenBatch
    v: torch.Tensor | VarlenBatch
    if varlen:
        lens_q = [seqlen, seqlen // 2 + 1]
        lens_k = [sk, sk // 2 + 1] if seqlen_k is not None else lens_q
        q = _varlen.pack([rand(n, heads, head_dim) for n in lens_q])
        k = _varlen.pack([rand(n, hkv, head_dim) for n in lens_k])
        v = _varlen.pack([rand(n, hkv, dv) for n in lens_k])
        vplan = _varlen.explain_varlen(q, k, v, causal=causal, policy=policy, **variants)
        backend = vplan.varlen_backend or vplan.backend

        def call() -> torch.Tensor:
            return _varlen.varlen_attention(q, k, v, causal=causal, policy=policy, **variants).values
        what = f"varlen {lens_q} Hq={heads} Hkv={hkv} D={head_dim}"
    else:
        q, k, v = rand(batch, heads, seqlen, head_dim), rand(batch, hkv, sk, head_dim), rand(batch, hkv, sk, dv)
        backend = explain(q, k, v, causal=causal, policy=policy, **variants).backend

        def call() -> torch.Tensor:
            return attention(q, k, v, causal=causal, policy=policy, **variants)
        what = f"({batch}, {heads}, {seqlen}, {head_dim}) x Sk={sk} Hkv={hkv}"
    what += f" {str(dtype).removeprefix('torch.')}, causal={causal}"
    what += "".join(f", {n}={'yes' if n == 'sinks' else x}" for n, x in variants.items() if x is not None)
    what += f", {'training' if training else 'forward only'}"

    def timed() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        out = call()
        if training:
            out.float().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    cold = timed()
    warm = timed()
    return WarmupResult(backend, cold, warm, what)
