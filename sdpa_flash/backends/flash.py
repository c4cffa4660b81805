"""``SDPBackend.FLASH_ATTENTION``: FlashAttention-2 on CUDA, PyTorch's own flash kernel on the CPU."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..spec import AttentionSpec
from ._base import Backend, Device, KernelCall, KernelFn, KernelOptions, Requirements, Runner, with_plain

__all__ = ["FlashBackend"]


class FlashBackend(Backend):
    name = "flash"
    TORCH_CHECK = "can_use_flash_attention"
    ADAPTED = frozenset({"sinks"})  # O * sigmoid(lse - sink) around the op (_Sinks)
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {
        # PyTorch's CUDA flash kernel is flash-attn 2: causal is aligned bottom-right when Sq != Sk (which is
        # why PyTorch's own check refuses is_causal there), no masks, GQA read in place, q/k/v head dims equal.
        "cuda": Requirements(
            dtypes=frozenset((torch.float16, torch.bfloat16)),
            min_cc=(8, 0),
            max_head_dim=256,
            head_dim_multiple=8,
            same_head_dim_v=True,
            native_gqa=True,
            kernel_causal="bottom_right",
            contiguous_last_dim=True,
            # PyTorch passes deterministic=True to FlashAttention-2's backward under deterministic mode.
            deterministic_backward=True,
            # FlashAttention-2's own window (aten._flash_attention_forward/_backward's window_size_left/right, where
            # this torch's schemas have them: extra_reasons says when they do not), bottom-right aligned like ours.
            window=True,
            # Sinks by an exact adaptation of the same op's log-sum-exp, forward and backward (_Sinks), without
            # dropout (extra_reasons refuses the two together).
            sinks=True,
        ),
        # The CPU kernel: blocked online softmax; masks yes, dropout no, any head dim, top-left causal. Dropout: torch
        # 2.13's aten._scaled_dot_product_flash_attention_for_cpu raises "Currently do not support dropout > 0"
        # (checked), so CPU dropout calls run on math (a fallback under "auto", with its warning).
        "cpu": Requirements(
            dtypes=frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64)),
            same_head_dim_v=True,
            mask=True,
            dropout=False,
            native_gqa=True,
            kernel_causal="top_left",
            contiguous_last_dim=True,  # it reads the head dim at stride 1 whatever the tensor's stride
            # One thread owns each (batch, head)'s gradients, in a fixed loop order: no atomics, and the same
            # bits whatever the thread count (measured, torch 2.13).
            deterministic_backward=True,
        ),
    }

    def extra_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        cc = caps.compute_capability
        if spec.window is not None and caps.device_type == "cuda" and not packed_window_args():
            return [f"this PyTorch's flash ops (aten._flash_attention_forward/_backward, torch {torch.__version__}) "
                    "take no window_size_left/right; a newer torch has them"]
        if spec.sinks and caps.device_type == "cuda":
            if spec.dropout:
                return ["sinks with dropout_p > 0: the flash op's sink adaptation runs without dropout"]
            if _PACKED_FWD is None or _PACKED_BWD is None:
                return [f"this PyTorch ({torch.__version__}) has no aten._flash_attention_forward/_backward, through "
                        "which sinks are adapted"]
        # sm86-sm89 (and sm120/121) lack the shared memory for the large-head-dim backward kernels.
        if cc is not None and spec.needs_grad and ((8, 6) <= cc <= (8, 9) or (12, 0) <= cc <= (12, 1)):
            if (spec.head_dim > 224 and spec.dropout) or 192 < spec.head_dim <= 224:
                return [f"backward with head_dim={spec.head_dim} needs more shared memory than {caps.arch} has"]
        return []

    def missing_reason(self, device: torch.device) -> str | None:
        check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        if device.type == "cuda" and check is not None and not check():
            return f"this PyTorch ({torch.__version__}) was built without its CUDA flash kernel"
        return super().missing_reason(device)

    def autograd_ops(self, device_type: str) -> tuple[Callable[..., object], Callable[..., object]] | None:
        return {"cuda": (_cuda_forward, _cuda_backward), "cpu": (_cpu_forward, _cpu_backward)}.get(device_type)

    VARLEN = True

    def varlen_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        """The dense reasons: the packed op is the same op (``aten._flash_attention_forward``), which takes the window
        itself and the sinks through the same exact adaptation (:class:`_Sinks`); CUDA only."""
        if caps.device_type != "cuda":
            return [f"the flash varlen kernel is CUDA only (this is {caps.device_type})"]
        return super().varlen_reasons(spec, caps)

    def varlen(self) -> Callable[..., torch.Tensor]:
        return _flash_varlen

    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        if device_type == "cpu":
            return _CPU_TRACED if traced else _CPU
        return _CUDA_TRACED if traced else _CUDA


def _cuda_kernel(op: Callable[..., Any]) -> KernelFn:
    def call(c: KernelCall) -> torch.Tensor:
        if c.sinks is not None:  # (dropout is refused with sinks: see FlashBackend.extra_reasons)
            return _sinks_dense(c.q, c.k, c.v, c.sinks, c.causal, c.scale, _window_kwargs(c.window))
        if c.window is not None:
            return _windowed(c.q, c.k, c.v, c.dropout_p, c.causal, c.scale, _window_kwargs(c.window))
        return op(c.q, c.k, c.v, c.dropout_p, c.causal, False, scale=c.scale)[0]

    def plain(options: KernelOptions) -> Runner:
        is_causal = options.causal
        if options.window is not None:
            kw = _window_kwargs(options.window)

            def run_windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                             dropout_p: float, scale: float | None) -> torch.Tensor:
                return _windowed(q, k, v, dropout_p, is_causal, scale, kw)

            return run_windowed

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                dropout_p: float, scale: float | None) -> torch.Tensor:
            return op(q, k, v, dropout_p, is_causal, False, scale=scale)[0]

        return run

    return with_plain(call, plain)


def _cpu_kernel(op: Callable[..., Any]) -> KernelFn:
    def call(c: KernelCall) -> torch.Tensor:
        bias = c.bias
        if bias is not None and bias.dim() not in (2, 4):  # the kernel takes 2-D or 4-D masks only
            bias = bias[(None,) * (4 - bias.dim())]
        return op(c.q, c.k, c.v, c.dropout_p, c.causal, attn_mask=bias, scale=c.scale)[0]

    def plain(options: KernelOptions) -> Runner:
        is_causal = options.causal

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                dropout_p: float, scale: float | None) -> torch.Tensor:
            return op(q, k, v, dropout_p, is_causal, scale=scale)[0]

        return run

    return with_plain(call, plain)


# ----------------------------------------------------------------------------------- the packed (varlen) op
# The ops, looked up when called (module globals: a test stands a CPU model of them in; no CUDA is touched here).
_PACKED_FWD: Any = getattr(torch.ops.aten, "_flash_attention_forward", None)
_PACKED_BWD: Any = getattr(torch.ops.aten, "_flash_attention_backward", None)


@functools.cache
def packed_window_args() -> bool:
    """Whether this torch's packed flash ops take a window: ``window_size_left`` and ``window_size_right`` in the
    schemas of both ``aten._flash_attention_forward`` and ``aten._flash_attention_backward`` (read once; no CUDA)."""
    wanted = {"window_size_left", "window_size_right"}
    try:
        ops = (torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward)
        return all(wanted <= {a.name for a in op.default._schema.arguments} for op in ops)
    except (AttributeError, RuntimeError):  # a build without the ops
        return False


def _window_kwargs(window: tuple[int | None, int | None] | None) -> dict[str, int]:
    """FlashAttention-2's window: ``-1`` per unbounded side; aligned bottom-right per sequence like ours."""
    if window is None:
        return {}
    left, right = window
    return {"window_size_left": -1 if left is None else left, "window_size_right": -1 if right is None else right}


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool | str,
              scale: float | None, window: dict[str, int]) -> torch.Tensor:
    """A dense call with a sliding window: FlashAttention-2's op on the (B, S, H, D) views of (B, H, S, D) tensors
    (no copy; the op's own autograd formula passes the window to its backward), the output back as (B, H, S, D)."""
    out = _PACKED_FWD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, q.shape[2], k.shape[2],
                      dropout_p, bool(causal), False, scale=scale, **window)[0]
    return out.transpose(1, 2)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int, dropout_p: float, causal: bool, scale: float | None, *,
                  window: tuple[int | None, int | None] | None = None, sinks: torch.Tensor | None = None
                  ) -> torch.Tensor:
    kw = _window_kwargs(window)
    if sinks is not None:  # (dropout is refused with sinks: see FlashBackend.varlen_reasons)
        out: torch.Tensor = _Sinks.apply(q, k, v, sinks, cu_q, cu_k, max_q, max_k, causal, scale, kw)
        return out
    return _PACKED_FWD(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, False, scale=scale, **kw)[0]


class _Sinks(torch.autograd.Function):
    """The flash op with one sink logit per query head, exactly: packed (``cu_seqlens``, ``(T, H, D)`` tensors, a
    log-sum-exp of ``(H, T)``) or dense (``cu_seqlens`` ``None``, ``(B, S, H, D)`` tensors, ``(B, H, S)``).

    A sink is one more softmax column with no value, so with the op's own output ``O`` and log-sum-exp ``lse`` (of
    the scores alone) the result is ``O * sigmoid(lse - sink)`` row by row. The backward is the op's own backward
    run on that result with ``lse' = logaddexp(lse, sink)``: its recomputed probabilities ``exp(S - lse')`` are then
    the sink softmax's, and its ``rowsum(dO * O)`` the sink output's, which is the exact gradient of q, k and v. The
    sinks' own gradient is ``-sum_rows sigmoid(sink - lse) * rowsum(dO * O)``. A row that sees no key gives 0 (the
    op's ``lse`` there is infinite: ``sigmoid`` gives 1 or 0, never NaN), as the dense convention says.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int, max_k: int, causal: bool,
                scale: float | None, window: dict[str, int]) -> torch.Tensor:
        out, lse, rng, unused, _ = _PACKED_FWD(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale,
                                               **window)
        dense = cu_q is None
        want = (q.shape[0], q.shape[2], q.shape[1]) if dense else (q.shape[1], q.shape[0])
        if tuple(lse.shape) != want:  # (a kernel failure, not an input error: auto records it and moves on)
            raise RuntimeError(f"the flash op returned a log-sum-exp of shape {tuple(lse.shape)}, not "
                               f"{'(B, H, S)' if dense else '(H, T)'} = {want}: this torch ({torch.__version__}) "
                               "lays it out otherwise, so its sinks cannot be applied; pass policy='chunked' (or "
                               "'fa4')")
        sink = _per_row(sinks.detach().float(), dense)
        out = (out.float() * _like_out(torch.sigmoid(lse - sink), dense)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, torch.logaddexp(lse, sink), rng, unused, cu_q, cu_k, sinks)
        ctx.args = (max_q, max_k, causal, scale, window, dense)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op's own backward
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse_sink, rng, unused, cu_q, cu_k, sinks = ctx.saved_tensors
        max_q, max_k, causal, scale, window, dense = ctx.args
        grad = grad.contiguous()
        dq, dk, dv = _PACKED_BWD(grad, q, k, v, out, lse_sink, cu_q, cu_k, max_q, max_k, 0.0, causal, rng, unused,
                                 scale=scale, **window)
        p_sink = torch.exp(_per_row(sinks.detach().float(), dense) - lse_sink)  # sigmoid(sink - lse), lse's layout
        rowsum = (grad.float() * out.float()).sum(-1)  # (B, S, H) or (T, H)
        rowsum = rowsum.transpose(1, 2) if dense else rowsum.t()
        dsink = -(p_sink * rowsum).sum((0, 2) if dense else 1)
        return dq, dk, dv, dsink.to(sinks.dtype), None, None, None, None, None, None, None


def _per_row(sinks: torch.Tensor, dense: bool) -> torch.Tensor:
    """The (H,) sinks broadcast against the log-sum-exp: ``(1, H, 1)`` dense, ``(H, 1)`` packed."""
    return sinks[None, :, None] if dense else sinks[:, None]


def _like_out(x: torch.Tensor, dense: bool) -> torch.Tensor:
    """A per-row factor in the log-sum-exp's layout, broadcast against the output: ``(B, S, H, 1)`` / ``(T, H, 1)``."""
    return (x.transpose(1, 2) if dense else x.t())[..., None]


def _sinks_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, causal: bool | str,
                 scale: float | None, window: dict[str, int]) -> torch.Tensor:
    """A dense call with sinks: the flash op on the (B, S, H, D) views of (B, H, S, D) tensors, adapted exactly
    (:class:`_Sinks`), the output back as (B, H, S, D)."""
    out: torch.Tensor = _Sinks.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sinks, None, None,
                                     q.shape[2], k.shape[2], bool(causal), scale, window)
    return out.transpose(1, 2)


_CUDA = _cuda_kernel(torch._scaled_dot_product_flash_attention)
_CUDA_TRACED = _cuda_kernel(torch.ops.aten._scaled_dot_product_flash_attention.default)
_CPU = _cpu_kernel(torch._scaled_dot_product_flash_attention_for_cpu)
_CPU_TRACED = _cpu_kernel(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)


def _cuda_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
                  lse: bool) -> tuple[torch.Tensor, tuple[Any, ...]]:
    r = torch._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    return r[0], r[1:8]


def _cuda_backward(go: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   saved: tuple[Any, ...], is_causal: bool, scale: float | None) -> tuple[torch.Tensor, ...]:
    lse, cum_q, cum_k, max_q, max_k, seed, offset = saved
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        go, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset, scale=scale)


def _cpu_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None,
                 lse: bool) -> tuple[torch.Tensor, tuple[Any, ...]]:
    r = torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return r[0], (r[1],)


def _cpu_backward(go: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  saved: tuple[Any, ...], is_causal: bool, scale: float | None) -> tuple[torch.Tensor, ...]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        go, q, k, v, out, saved[0], 0.0, is_causal, scale=scale)
