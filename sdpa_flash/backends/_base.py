"""What every backend shares: requirements as data, one reasons function, and the runner builder.

A backend is a small class whose *data* (``REQUIREMENTS``, one :class:`Requirements` per device type) says
what its kernel accepts, and whose ``kernel()`` returns the function that calls it. Everything else — whether a
call is supported, why not, and which exact, cheap transformations (padding the head dim, repeating K/V for GQA,
cutting never-visible keys, materialising a causal mask) make it fit — is derived here from that data, once
per distinct call signature, so the per-call path is a single pre-built closure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch

from ..spec import AttentionSpec, causal_mask_tensor, dtype_name, format_cudnn_version, window_mask_tensor

__all__ = ["Backend", "Device", "KernelCall", "KernelFn", "KernelOptions", "Requirements", "Runner"]

Runner = Callable[..., torch.Tensor]
"""``run(q, k, v, attn_mask, dropout_p, scale[, sinks]) -> out``, all in (B, H, S, D) layout; ``sinks`` (the
``(Hq,)`` sink logits) is passed only to runners of calls whose spec has sinks."""

@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """What a kernel is told about one kind of call besides its tensors, decided once per call signature.

    Attributes:
        causal: ``False``; ``True`` for the kernel's own corner (:attr:`Requirements.kernel_causal`); or, for
            ``kernel_causal="any"``, ``"top_left"`` / ``"bottom_right"``.
        needs_lse: autograd will need a backward (kernels that keep the log-sum-exp only for it may skip it).
        window: the sliding window ``(left, right)`` for a kernel with :attr:`Requirements.window` (bottom-right
            aligned, ``None`` per side unbounded; see :data:`sdpa_flash.spec.Window`), else ``None``.
        softcap: the logit softcap for a kernel with :attr:`Requirements.softcap`, else ``None``.
    """

    causal: bool | str = False
    needs_lse: bool = False
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None


class KernelCall:
    """One call of a backend's kernel: the tensors, already adapted to its :class:`Requirements`, and the options.

    ``q`` ``(B, Hq, Sq, D)``, ``k`` ``(B, Hkv, Sk, D)``, ``v`` ``(B, Hkv, Sk, Dv)``: head dims padded and K/V repeated
    unless the requirements say ``native_gqa``. ``bias`` is ``None`` or an additive float mask broadcastable to
    ``(B, Hq, Sq, Sk)`` (only for backends with ``mask=True``). ``dropout_p``: the probability (0 unless the
    backend takes dropout). ``scale``: ``None`` means ``1 / sqrt(D)``. ``causal``, ``needs_lse``, ``window`` and
    ``softcap``: see :class:`KernelOptions`. ``sinks``: ``None`` or the ``(Hq,)`` sink logits (a kernel with
    :attr:`Requirements.sinks`). An option a backend's requirements do not declare is never set on its calls (the
    planner refuses such calls first), so a kernel reads only the attributes it knows.
    """

    __slots__ = ("bias", "causal", "dropout_p", "k", "needs_lse", "q", "scale", "sinks", "softcap", "v", "window")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float,
                 scale: float | None, options: KernelOptions, sinks: torch.Tensor | None = None) -> None:
        self.q, self.k, self.v, self.bias, self.dropout_p, self.scale = q, k, v, bias, dropout_p, scale
        self.causal, self.needs_lse = options.causal, options.needs_lse
        self.window, self.softcap, self.sinks = options.window, options.softcap, sinks


KernelFn = Callable[[KernelCall], torch.Tensor]
"""``kernel(call: KernelCall) -> out (B, Hq, Sq, Dv)``: one call of a backend's kernel. It must be differentiable
with respect to ``call.q``, ``call.k`` and ``call.v`` when the backend's requirements say ``backward=True``."""


class Device(Protocol):
    """What a backend reads of the device it is asked about: :class:`sdpa_flash.Capabilities` is one.

    (The capability probe stands above the backends — it asks each registered backend what it finds — so the
    backends name only this much of it.)
    """

    @property
    def device_type(self) -> str: ...
    @property
    def compute_capability(self) -> tuple[int, int] | None: ...
    @property
    def arch(self) -> str: ...
    @property
    def backends(self) -> frozenset[str]: ...
    @property
    def torch_version(self) -> str: ...
    @property
    def cudnn_version(self) -> int | None: ...
    @property
    def hip_version(self) -> str | None: ...
    @property
    def probed(self) -> bool: ...
    def missing_reason(self, backend: str) -> str | None: ...


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What one backend's kernel accepts on one device type.

    Attributes:
        dtypes: accepted dtypes of q, k and v.
        min_cc: lowest CUDA compute capability, inclusive.
        max_cc: highest CUDA compute capability, inclusive (``None``: no known limit).
        bf16_min_cc: lowest compute capability for bfloat16 (``None``: as ``min_cc``).
        max_head_dim: largest head dimension (q/k and v).
        head_dim_multiple: the kernel needs head dims that are multiples of this; other sizes are
            zero-padded (exact: zeros add nothing to q·k and give zero columns that are cut off).
        same_head_dim_v: the value head dim must equal the query/key head dim.
        mask: an explicit ``attn_mask`` (bool or additive float) is accepted.
        dropout: ``dropout_p > 0`` is accepted.
        native_gqa: fewer key/value heads than query heads are read in place (otherwise K/V are repeated).
        kernel_causal: the corner the kernel's causal flag is aligned to when ``Sq != Sk``; ``None`` when
            that is not established (then non-square causal calls are made square or given a mask); ``"any"``
            when the kernel takes the corner itself.
        mask_with_causal: the kernel takes a mask and its causal flag together (otherwise the causal part is
            folded into the mask).
        backward: the kernel has a backward.
        min_cudnn: lowest cuDNN version (integer form, ``90000`` = 9.0.0).
        min_torch: lowest torch release with this kernel behaving as described.
        contiguous_last_dim: the kernel needs the head dim of q, k and v contiguous (stride 1): PyTorch's CPU
            flash kernel reads it so without checking, the CUDA kernels refuse other strides. Inputs whose last
            dim has another stride are copied first (``explain()`` says so).
        mask_grad: the backward gives the gradient of a float ``attn_mask`` that requires grad (a learned bias).
        window: the kernel takes a sliding window itself (:attr:`KernelCall.window`). Otherwise only a backend that
            materialises the scores anyway (``fused=False`` with ``mask=True``: math) gets the window as a mask;
            fused kernels are refused, so a window never costs O(Sq * Sk) memory on a fast path.
        softcap: the kernel applies ``softcap * tanh(score / softcap)`` itself (:attr:`KernelCall.softcap`).
        sinks: the kernel adds one sink logit per query head to each row's softmax (:attr:`KernelCall.sinks`), with
            its gradient when ``backward`` is set.
        deterministic_backward: the backward gives bitwise-identical gradients run to run when
            ``torch.use_deterministic_algorithms(True)`` is set (``None``: not established, treated as no).
    """

    dtypes: frozenset[torch.dtype]
    min_cc: tuple[int, int] | None = None
    max_cc: tuple[int, int] | None = None
    bf16_min_cc: tuple[int, int] | None = None
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    same_head_dim_v: bool = False
    mask: bool = False
    dropout: bool = True
    native_gqa: bool = False
    kernel_causal: str | None = "top_left"
    mask_with_causal: bool = False
    backward: bool = True
    min_cudnn: int | None = None
    min_torch: str | None = None
    contiguous_last_dim: bool = False
    deterministic_backward: bool | None = None
    mask_grad: bool = False
    window: bool = False
    softcap: bool = False
    sinks: bool = False


@dataclasses.dataclass(frozen=True)
class Prep:
    """The exact transformations that make one call fit one kernel (decided once per spec)."""

    repeat_kv: int = 1
    pad_qk_to: int | None = None
    pad_v_to: int | None = None
    truncate_keys: bool = False
    causal_mask: str | None = None
    kernel_causal: bool | str = False  # True: the kernel's own corner; a corner name for kernels taking "any"
    float_bias: bool = False  # the private aten ops add a boolean mask as 0/1 numbers: always pass a float bias
    window_mask: tuple[int | None, int | None] | None = None  # a window materialised as a mask (math only)

    def notes(self, spec: AttentionSpec) -> tuple[str, ...]:
        out = []
        if self.repeat_kv > 1:
            out.append(f"K/V repeated {self.repeat_kv}x for GQA (no native GQA in this kernel)")
        if self.pad_qk_to or self.pad_v_to:
            out.append(
                f"head dim zero-padded {spec.head_dim}->{self.pad_qk_to or spec.head_dim}"
                + (f" (v {spec.head_dim_v}->{self.pad_v_to})" if self.pad_v_to and spec.head_dim_v != spec.head_dim
                   else "")
            )
        if self.truncate_keys:
            out.append(
                f"top-left causal with Sq={spec.seqlen_q} < Sk={spec.seqlen_k}: keys past Sq are never visible,"
                " so a square causal call runs on the first Sq keys"
            )
        if self.causal_mask:
            out.append(f"{self.causal_mask.replace('_', '-')} causal materialised as a ({spec.seqlen_q}, "
                       f"{spec.seqlen_k}) boolean mask")
        if self.window_mask is not None:
            out.append(f"window {self.window_mask} materialised as a ({spec.seqlen_q}, {spec.seqlen_k}) boolean mask")
        if self.float_bias and spec.mask == "bool":
            out.append("boolean attn_mask converted to an additive float bias")
        return tuple(out)


class _StderrCapture:
    """Capture what C++ code writes to file descriptor 2 (PyTorch prints the can_use_* debug reasons there)."""

    text = ""

    def __enter__(self) -> _StderrCapture:
        import sys
        import tempfile

        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()


def _torch_warning_lines(text: str) -> list[str]:
    """``[W... sdp_utils.cpp:123] Warning: Flash attention requires ... (function operator())`` -> the message."""
    out = []
    for line in text.splitlines():
        if "Warning:" in line:
            msg = line.split("Warning:", 1)[1]
            out.append(msg.split(" (function ", 1)[0])
        elif line.strip():
            out.append(line)
    return out


def _fmt_cc(cc: tuple[int, int] | None) -> str:
    return "none" if cc is None else f"({cc[0]}, {cc[1]})"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class Backend:
    """One SDPA backend: requirements as data, reasons, and a runner for the direct route."""

    name: ClassVar[str]
    fused: ClassVar[bool] = True
    """A fused kernel: O(N) memory, never the O(N^2) reference (``policy="fused"`` takes only these)."""
    memory: ClassVar[str] = "O(N)"
    REQUIREMENTS: ClassVar[dict[str, Requirements]]
    DIRECT_LABEL: ClassVar[str] = "direct aten op"
    ROUTE_REASON: ClassVar[str] = "the chosen kernel's aten op is called directly: exact, and no global flags change"
    """How the direct route reaches the kernel (``explain()``'s ``route:`` line)."""
    MISSING_REASON: ClassVar[str | None] = None
    """Why the backend is absent when ``caps.backends`` lacks it (default: not built into this PyTorch)."""
    PACKAGE: ClassVar[str | None] = None
    """The distribution a backend installed as its own package comes from (``"flash-attn-4"``): its version is
    probed into :attr:`Capabilities.kernels` and ranged by ``DenylistEntry(kernel=...)``. ``None``: part of torch."""
    ADAPTED: ClassVar[frozenset[str]] = frozenset()
    """The variants (``"window"``, ``"softcap"``, ``"sinks"``) its :class:`Requirements` accept by an exact
    adaptation around the kernel rather than in it (the flash backend's sinks: from the kernel's log-sum-exp); what
    ``python -m sdpa_flash`` reports as ``adapted``."""
    TUNED: ClassVar[bool] = True
    """``python -m sdpa_flash tune`` times it on every shape class it can run, and ``python -m sdpa_flash``'s
    self-check runs it (``False``: a kernel ranked by what it alone can run, such as FlexAttention, which each
    class would compile afresh)."""
    PROFILER_NAMES: ClassVar[tuple[str, ...]] = ()
    """Substrings of ``torch.profiler`` event names (CPU ops, or GPU kernel names on CUDA) that show this backend's
    kernel ran, for :func:`sdpa_flash.testing.ran_backends`; needed by kernels that are not an aten op (a CuTe or
    Triton kernel: its GPU kernel's name). PyTorch's own attention ops are known already."""

    # ----------------------------------------------------------------------------------------- probing
    def installed_version(self) -> str | None:
        """The installed version of :attr:`PACKAGE` (package metadata only, nothing imported); ``None`` when it
        is absent or the backend is part of torch."""
        if self.PACKAGE is None:
            return None
        import importlib.metadata

        try:
            return importlib.metadata.version(self.PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            return None

    def missing_reason(self, device: torch.device) -> str | None:
        """Why this build or install has no kernel of this backend for ``device`` (``None``: it has one).

        Asked once per device by :func:`sdpa_flash.capabilities` — the probe is where a backend may import its
        package or try a call; planning only reads the answer. Default: it has requirements for the device type,
        and its package (if any) is installed.
        """
        if device.type not in self.REQUIREMENTS:
            return f"no kernel for device type {device.type!r}"
        if self.PACKAGE is not None and self.installed_version() is None:
            return self.MISSING_REASON or f"{self.PACKAGE} is not installed"
        return None
    TORCH_CHECK: ClassVar[str | None] = None
    """Name of ``torch.backends.cuda.can_use_*_attention`` consulted on a real CUDA device."""
    MASKED_VALUE: ClassVar[float] = float("-inf")
    """What a False entry of a boolean mask becomes in the additive bias this kernel receives."""
    ZERO_MASKED_ROWS: ClassVar[bool] = False
    """The kernel does not give 0 for query rows that see no key (a finite MASKED_VALUE), so the runner zeroes
    them, matching PyTorch's math backend."""

    # ----------------------------------------------------------------------------------------- deciding
    def requirements(self, device_type: str) -> Requirements | None:
        return self.REQUIREMENTS.get(device_type)

    def not_supported_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        """Every reason this backend cannot run ``spec`` on ``caps``; empty when it can."""
        req = self.requirements(caps.device_type)
        if req is None:
            have = ", ".join(sorted(self.REQUIREMENTS)) or "none"
            return [f"not available on device type {caps.device_type!r} (has kernels for: {have})"]
        reasons: list[str] = []
        if self.name not in caps.backends:
            reasons.append(caps.missing_reason(self.name) or self.MISSING_REASON
                           or f"not built into this PyTorch ({caps.torch_version}) for {caps.arch}")
        cc = caps.compute_capability
        if cc is not None:
            if req.min_cc is not None and cc < req.min_cc:
                reasons.append(f"requires compute capability >= {_fmt_cc(req.min_cc)}, this GPU has {_fmt_cc(cc)}")
            if req.max_cc is not None and cc > req.max_cc:
                reasons.append(f"requires compute capability <= {_fmt_cc(req.max_cc)}, this GPU has {_fmt_cc(cc)}")
        if req.min_cudnn is not None and (caps.cudnn_version or 0) < req.min_cudnn:
            reasons.append(f"requires cuDNN >= {format_cudnn_version(req.min_cudnn)}, this build has "
                           f"{format_cudnn_version(caps.cudnn_version)}")
        if spec.dtype not in req.dtypes:
            names = ", ".join(sorted(dtype_name(d) for d in req.dtypes))
            reasons.append(f"dtype={dtype_name(spec.dtype)} (supported: {names})")
        elif spec.dtype == torch.bfloat16 and req.bf16_min_cc is not None and cc is not None and cc < req.bf16_min_cc:
            reasons.append(f"bfloat16 requires compute capability >= {_fmt_cc(req.bf16_min_cc)}, this GPU has "
                           f"{_fmt_cc(cc)}; use float16")
        if req.max_head_dim is not None:
            big = max(spec.head_dim, spec.head_dim_v)
            if _round_up(big, req.head_dim_multiple) > req.max_head_dim:
                reasons.append(f"head_dim={big} (supported: <= {req.max_head_dim})")
        if req.same_head_dim_v and spec.head_dim != spec.head_dim_v:
            reasons.append(f"value head_dim={spec.head_dim_v} differs from query/key head_dim={spec.head_dim} "
                           "(this kernel needs them equal)")
        if spec.mask is not None and not req.mask:
            reasons.append("attn_mask is not supported (pass causal=... for causal masks; a key-padding mask "
                           "belongs on the varlen path)")
        if spec.mask_grad and req.mask and not req.mask_grad:
            reasons.append("attn_mask requires grad, and this kernel gives no gradient for it (detach the mask, or "
                           "policy='math' for a learned bias)")
        if spec.dropout and not req.dropout:
            reasons.append("dropout_p > 0 is not supported")
        if spec.needs_grad and not req.backward:
            reasons.append("has no backward, and the inputs require grad")
        if spec.window is not None and not req.window and (self.fused or not req.mask):
            reasons.append("has no sliding window of its own" + (
                " (a fused kernel is never given an O(Sq*Sk) window mask)" if self.fused else
                ", and takes no mask to express it"))
        if spec.softcap is not None and not req.softcap:
            reasons.append("has no logit softcap (a non-linear function of the scores: no mask expresses it)")
        if spec.sinks and not req.sinks:
            reasons.append("has no attention sinks")
        _, why = self._causal_strategy(spec, req)
        if why:
            reasons.append(why)
        reasons.extend(self.extra_reasons(spec, caps))
        if req.min_torch is not None:
            from packaging.version import Version

            if Version(caps.torch_version) < Version(req.min_torch):
                reasons.append(f"requires torch >= {req.min_torch}, this is {caps.torch_version}")
        return reasons

    def extra_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        """Backend-specific limits that do not fit the :class:`Requirements` fields (default: none)."""
        return []

    @staticmethod
    def _causal_strategy(spec: AttentionSpec, req: Requirements) -> tuple[str, str | None]:
        """How causal masking is realised: ``none``, ``kernel``, ``truncate_keys`` or ``mask``."""
        kind = spec.effective_causal
        if kind is None:
            return "none", None
        if (kind == "top_left" and spec.seqlen_q == spec.seqlen_k) or kind == req.kernel_causal or (
            req.kernel_causal == "any"
        ):
            if spec.mask is not None and not req.mask_with_causal:
                return "mask", None
            return "kernel", None
        if kind == "top_left" and spec.seqlen_q < spec.seqlen_k:
            if spec.window is None or not req.window:
                return "truncate_keys", None
            # the keys past Sq could be cut, but the kernel would then place the window (bottom-right aligned to
            # the whole key range) on the cut range's corner: another band
            if not req.mask:
                return "none", (
                    f"causal=top_left with seqlen_q={spec.seqlen_q} < seqlen_k={spec.seqlen_k} and a window: the "
                    "window is aligned to the bottom-right corner, which this kernel can only have with its causal "
                    "flag there too (pass causal='bottom_right' for flash-attn's convention)")
        if req.mask:
            return "mask", None
        corner = f"aligns causal to the {req.kernel_causal.replace('_', '-')} corner" if req.kernel_causal else (
            "has no established causal alignment for Sq != Sk")
        fix = " (pass causal='bottom_right' for flash-attn's convention)" if kind == "top_left" else ""
        return "none", (
            f"causal={kind} with seqlen_q={spec.seqlen_q} > seqlen_k={spec.seqlen_k}: this kernel {corner} "
            f"and takes no mask{fix}"
        )

    def prep(self, spec: AttentionSpec, device_type: str) -> Prep:
        """The transformations that make ``spec`` fit this kernel (assumes it is supported)."""
        req = self.REQUIREMENTS[device_type]
        strategy, _ = self._causal_strategy(spec, req)
        m = req.head_dim_multiple
        pad_qk = _round_up(spec.head_dim, m) if spec.head_dim % m else None
        pad_v = _round_up(spec.head_dim_v, m) if spec.head_dim_v % m else None
        if req.same_head_dim_v:
            pad_v = pad_qk
        window_mask = spec.window if spec.window is not None and not req.window else None
        if window_mask is not None and strategy == "kernel" and not req.mask_with_causal:
            strategy = "mask"  # the window arrives as a mask, which this kernel takes only without its causal flag
        has_mask = spec.mask is not None or strategy == "mask" or window_mask is not None
        return Prep(
            repeat_kv=1 if req.native_gqa or not spec.heads_kv else spec.heads_q // spec.heads_kv,
            pad_qk_to=pad_qk,
            pad_v_to=pad_v,
            truncate_keys=strategy == "truncate_keys",
            causal_mask=spec.effective_causal if strategy == "mask" else None,
            kernel_causal=(spec.effective_causal or False) if req.kernel_causal == "any" and strategy == "kernel"
            else strategy in ("kernel", "truncate_keys"),
            float_bias=has_mask,
            window_mask=window_mask,
        )

    def torch_reasons(self, spec: AttentionSpec, prep: Prep, device: torch.device) -> list[str]:
        """PyTorch's own verdict for the kernel call we would make, on a real CUDA device."""
        check = getattr(torch.backends.cuda, self.TORCH_CHECK or "", None)
        params_cls = getattr(torch.backends.cuda, "SDPAParams", None)
        if check is None or params_cls is None or device.type != "cuda":
            return []
        d = prep.pad_qk_to or spec.head_dim
        dv = prep.pad_v_to or spec.head_dim_v
        sk = spec.seqlen_q if prep.truncate_keys else spec.seqlen_k
        hkv = spec.heads_kv * prep.repeat_kv
        base = torch.empty(max(d, dv, sk), device=device, dtype=spec.dtype)
        q = base.as_strided((spec.batch, spec.heads_q, spec.seqlen_q, d), (0, 0, 0, 1))
        k = base.as_strided((spec.batch, hkv, sk, d), (0, 0, 0, 1))
        v = base.as_strided((spec.batch, hkv, sk, dv), (0, 0, 0, 1))
        mask = None
        if spec.mask is not None or prep.causal_mask is not None or prep.window_mask is not None:
            mask = base.as_strided((spec.batch, spec.heads_q, spec.seqlen_q, sk), (0, 0, 0, 1))
        # Ask about the call we make: a kernel-native bottom-right causal call is one PyTorch's check would
        # refuse only because it assumes top-left semantics for is_causal with Sq != Sk.
        native_corner = prep.kernel_causal and sk != spec.seqlen_q
        args = (q, k, v, mask, 0.5 if spec.dropout else 0.0, prep.kernel_causal and not native_corner)
        try:
            params = params_cls(*args, hkv != spec.heads_q)
        except TypeError:  # torch < 2.5: no enable_gqa field
            params = params_cls(*args)
        if check(params, False):  # the common answer, asked quietly: nothing printed, nothing to capture
            return []
        # Declined: ask again with PyTorch's debug reasons, which C++ prints to stderr (and the warnings module).
        with warnings.catch_warnings(record=True) as caught, _StderrCapture() as err:
            warnings.simplefilter("always")
            check(params, True)
        msgs = [str(w.message) for w in caught] + _torch_warning_lines(err.text)
        msgs = [m.strip().rstrip(".") for m in msgs if m.strip()]
        if not spec.needs_grad:
            # PyTorch declines cuDNN under torch.use_deterministic_algorithms(True) for any call, but only its
            # backward is non-deterministic; sdpa_flash applies that rule (with its own reason) to backwards.
            msgs = [m for m in msgs if "not deterministic" not in m]
            if not msgs:
                return []
        return [f"PyTorch: {m}" for m in dict.fromkeys(msgs)] or ["PyTorch's can_use check declined these inputs"]

    # --------------------------------------------------------------------------------------------- varlen
    VARLEN: ClassVar[bool] = False
    """The backend has a packed (``cu_seqlens``) entry point: :meth:`varlen_reasons` and :meth:`varlen`."""

    def varlen_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        """Why one packed call cannot run a ragged batch whose longest query and key give ``spec`` (causal, if
        any, bottom-right; a window, softcap and sinks as the batch has them, the window aligned per sequence):
        the dense reasons, less those about the causal corner (a packed kernel aligns causal per sequence). The
        variants are the :class:`Requirements` data (``window``, ``softcap``, ``sinks``), as for dense calls; a
        backend whose packed kernel differs from its dense one there overrides this."""
        if not self.VARLEN:
            return ["has no packed (cu_seqlens) kernel"]
        return [r for r in self.not_supported_reasons(spec, caps) if "causal" not in r] + self.unpadded_reasons(spec,
                                                                                                               caps)

    def unpadded_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        """Why the kernel cannot take ``spec``'s head dims as they are: for callers that hand it tensors without
        the dense runner's zero-padding (the packed call)."""
        req = self.REQUIREMENTS.get(caps.device_type)
        m = req.head_dim_multiple if req is not None else 1
        if spec.head_dim % m or spec.head_dim_v % m:
            return [f"head dims {spec.head_dim}/{spec.head_dim_v}: the kernel takes multiples of {m} (only the dense "
                    "runner zero-pads them)"]
        return []

    def varlen(self) -> Callable[..., torch.Tensor]:
        """``run(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale) -> out``, packed (T, H, D) in and
        out, ``cu_*`` int32 on the device, causal aligned bottom-right per sequence.

        Batches with variants add keywords, each only when the batch has it (so a kernel whose
        :meth:`varlen_reasons` refuses a variant never sees its keyword): ``window=(left, right)`` (bottom-right
        per sequence, ``None`` per side unbounded; see :data:`sdpa_flash.spec.Window`), ``softcap=c`` and
        ``sinks=`` the ``(Hq,)`` sink logits (differentiable: the kernel gives their gradient)."""
        raise NotImplementedError(f"{self.name} has no packed (cu_seqlens) kernel")

    # ------------------------------------------------------------------------------------------- doing
    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        """The function calling this backend's kernel on ``device_type`` (see :data:`KernelFn`): what a backend
        must provide. Everything else — padding head dims, repeating K/V, causal corners, masks as biases — is
        done around it from the :class:`Requirements` data.

        ``traced=True`` gives the variant for ``torch.compile``: it calls the aten op overload, which dynamo
        traces, where the eager variant calls PyTorch's faster Python binding of the same op. A backend whose
        kernel dynamo cannot trace returns a ``torch.library.custom_op`` here.
        """
        raise NotImplementedError(f"the {self.name} backend defines no kernel()")

    def autograd_ops(self, device_type: str) -> tuple[Callable[..., object], Callable[..., object]] | None:
        """The kernel's forward and backward as separate functions, for callers that build one autograd node over
        many kernel calls (the varlen engine's grouped path): ``forward(q, k, v, is_causal, scale, needs_lse) ->
        (out, saved)`` and ``backward(grad_out, q, k, v, out, saved, is_causal, scale) -> (dq, dk, dv)``, all
        (B, H, S, D), no mask, no dropout. ``None`` (default): such callers go through the kernel's own autograd."""
        return None

    def bshd_runner(self, spec: AttentionSpec, prep: Prep) -> Runner | None:
        """A runner taking (B, S, H, D) tensors directly, for kernels whose own layout that is (``None``: wrap the
        (B, H, S, D) runner in transposes)."""
        return None

    def runner(self, spec: AttentionSpec, prep: Prep, *, traced: bool = False) -> Runner:
        """A closure that runs this kernel on (B, H, S, D) inputs with ``prep`` applied (``traced``: the variant
        for ``torch.compile``, see :meth:`kernel`)."""
        return make_runner(self.kernel(spec.device_type, traced=traced), spec, prep, masked_value=self.MASKED_VALUE,
                           zero_masked_rows=self.ZERO_MASKED_ROWS)


def make_runner(kernel: KernelFn, spec: AttentionSpec, prep: Prep, *, masked_value: float,
                zero_masked_rows: bool) -> Runner:
    """Build ``run(q, k, v, attn_mask, dropout_p, scale)`` for one kernel, one kind of call and its adaptations.

    ``masked_value`` is what a boolean mask's False becomes in the additive bias; ``zero_masked_rows``: rows that
    see no key are zeroed (kernels that give NaN there).
    """
    window_mask = prep.window_mask
    options = KernelOptions(causal=prep.kernel_causal, needs_lse=spec.needs_grad,
                            window=spec.window if window_mask is None else None, softcap=spec.softcap)
    head_dim, head_dim_v, seqlen_q = spec.head_dim, spec.head_dim_v, spec.seqlen_q
    repeat_kv, pad_qk_to, pad_v_to = prep.repeat_kv, prep.pad_qk_to, prep.pad_v_to
    truncate_keys, causal_mask, float_bias = prep.truncate_keys, prep.causal_mask, prep.float_bias
    if (repeat_kv, pad_qk_to, pad_v_to, truncate_keys, causal_mask, window_mask) == (1, None, None, False, None, None):
        if not float_bias:
            # The common case: nothing to adapt, one kernel call (kernels may supply a flatter closure; unless it
            # says it takes them, sinks go through the kernel function).
            plain: Callable[[KernelOptions], Runner] | None = getattr(kernel, "plain", None)
            if plain is not None and (not spec.sinks or getattr(kernel, "plain_takes_sinks", False)):
                return plain(options)

            def run_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                          dropout_p: float, scale: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
                return kernel(KernelCall(q, k, v, None, dropout_p, scale, options, sinks))

            return run_plain

        def run_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                       dropout_p: float, scale: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
            # float_bias is set only for specs with a mask (Prep.float_bias=has_mask): attn_mask is never None here
            bias = _as_float_bias(attn_mask, q.dtype, masked_value)  # type: ignore[arg-type]
            out = kernel(KernelCall(q, k, v, bias, dropout_p, scale, options, sinks))
            return out * _rows_alive(attn_mask) if zero_masked_rows else out  # type: ignore[arg-type]

        return run_masked

    default_scale = 1.0 / math.sqrt(head_dim)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
            scale: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        if truncate_keys:
            k, v = k[:, :, :seqlen_q], v[:, :, :seqlen_q]
            if attn_mask is not None and attn_mask.shape[-1] != 1:
                attn_mask = attn_mask[..., :seqlen_q]
        if repeat_kv > 1:
            k = k.repeat_interleave(repeat_kv, dim=1)
            v = v.repeat_interleave(repeat_kv, dim=1)
        if pad_qk_to is not None:
            if scale is None:
                scale = default_scale
            q = torch.nn.functional.pad(q, (0, pad_qk_to - head_dim))
            k = torch.nn.functional.pad(k, (0, pad_qk_to - head_dim))
        if pad_v_to is not None:
            v = torch.nn.functional.pad(v, (0, pad_v_to - head_dim_v))
        if causal_mask is not None:
            attn_mask = merge_causal(attn_mask, causal_mask, q.shape[-2], k.shape[-2], q.device)
        if window_mask is not None:
            attn_mask = merge_mask(attn_mask, window_mask_tensor(window_mask, q.shape[-2], k.shape[-2], q.device))
        alive = _rows_alive(attn_mask) if zero_masked_rows and attn_mask is not None else None
        if float_bias and attn_mask is not None:
            attn_mask = _as_float_bias(attn_mask, q.dtype, masked_value)
        out = kernel(KernelCall(q, k, v, attn_mask, dropout_p, scale, options, sinks))
        if alive is not None:
            out = out * alive
        if pad_v_to is not None:
            out = out[..., :head_dim_v]
        return out

    return run


def with_plain(kernel: Callable[[KernelCall], torch.Tensor], plain: Callable[[KernelOptions], Runner], *,
               takes_sinks: bool = False) -> KernelFn:
    """Attach ``plain(options) -> Runner``, a one-frame runner for calls that need no adaptation; ``takes_sinks``:
    its runner takes the sinks as a seventh argument (``run(q, k, v, mask, dropout_p, scale, sinks)``), so calls
    with sinks get it too."""
    kernel.plain = plain  # type: ignore[attr-defined]  # a function attribute, read back with getattr()
    kernel.plain_takes_sinks = takes_sinks  # type: ignore[attr-defined]  # (the same)
    return kernel


def merge_causal(mask: torch.Tensor | None, kind: str, sq: int, sk: int, device: torch.device) -> torch.Tensor:
    return merge_mask(mask, causal_mask_tensor(kind, sq, sk, device))


def merge_mask(mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool or additive float, or ``None``) with the keys outside the boolean ``keep`` hidden too."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def _rows_alive(mask: torch.Tensor) -> torch.Tensor:
    """(..., Sq, 1) of 1 where a query row sees at least one key under ``mask``, else 0 (in the mask's dtype
    family: bool masks give bool, float masks compare against -inf)."""
    keep = mask if mask.dtype == torch.bool else mask != float("-inf")
    return keep.any(-1, keepdim=True)


def _as_float_bias(mask: torch.Tensor, dtype: torch.dtype, masked_value: float) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, masked_value)
    return mask if mask.dtype == dtype else mask.to(dtype)
