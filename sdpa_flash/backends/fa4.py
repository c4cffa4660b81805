"""FlashAttention-4 (the ``flash-attn-4`` package, CuTe DSL kernels for Hopper and Blackwell): an optional backend.

Installed with ``pip install "sdpa_flash[fa4]"``; without it nothing changes and every plan says why
(``"flash-attn-4 is not installed (pip install 'sdpa_flash[fa4]')"``). Nothing here imports the package when
``sdpa_flash`` is imported: :func:`load` does, the first time a plan on a real GPU considers this backend (it
takes seconds: ``sdpa_flash.warmup`` moves that cost to start-up).

What the kernel is, as data (flash-attn-4 4.0.0b36, read from its ``flash_attn/cute/interface.py``):

* layout (B, S, H, D); (B, H, S, D) tensors are passed as ``transpose(1, 2)`` views, which it reads in place
  (strides stay multiples of 16 bytes), so neither layout costs a copy;
* float16 / bfloat16 only; head dims 8..256 in multiples of 8 on sm90, ``<= 128`` (or (192, 128), (256, 256))
  on sm100; value head dim may differ from the query's;
* causal masking aligned to the bottom-right corner when ``Sq != Sk`` (flash-attn's convention); GQA read in
  place; no dropout, no arbitrary ``attn_mask``; a deterministic backward when asked (passed through when
  ``torch.use_deterministic_algorithms(True)`` is on);
* no device guard: it launches on the *current* CUDA device (flash-attention#1782), so calls on another
  device run under ``torch.cuda.device``;
* not a torch custom op: a training call in eager mode is one ``autograd.Function`` of ours around FA4's
  ``_flash_attn_fwd`` / ``_flash_attn_bwd`` (the (B, S, H, D) views made inside it, so autograd records no
  transposes), an inference call FA4's forward alone; under ``torch.compile`` the call is the
  ``sdpa_flash::fa4_fwd`` / ``sdpa_flash::fa4_bwd`` custom ops defined here, so graphs have no break;
* each new configuration (dtype, head dims, causal, GQA ratio, window, training or not) JIT-compiles for
  seconds. Its on-disk compile cache (``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED``, read when the package is
  imported) is turned on here before the import, in ``~/.cache/sdpa_flash/fa4`` (``SDPA_FLASH_FA4_CACHE``:
  ``1`` (default), ``0`` to leave FA4's own default (off), or a directory); a setting of FA4's own variables is
  left as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import AttentionInputError
from ..spec import AttentionSpec
from ._base import (
    Backend,
    Device,
    KernelCall,
    KernelFn,
    KernelOptions,
    Prep,
    Requirements,
    Runner,
    make_runner,
    with_plain,
)

__all__ = ["DISTRIBUTION", "INSTALL_HINT", "CacheInfo", "FA4Backend", "cache_info", "installed_version", "load"]

DISTRIBUTION = "flash-attn-4"
"""The distribution name on the package index (its module is ``flash_attn.cute``)."""
INSTALL_HINT = "pip install 'sdpa_flash[fa4]'"
_MODULE = "flash_attn.cute.interface"
_CACHE_ENV = "SDPA_FLASH_FA4_CACHE"
_FA4_CACHE_ON = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
_FA4_CACHE_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


# ------------------------------------------------------------------------------------------- the package
_lock = threading.Lock()
_module: ModuleType | None = None
_import_error: str | None = None
import_seconds: float | None = None
"""How long importing the package took in this process (``None`` before it was imported)."""


def installed_version() -> str | None:
    """The installed ``flash-attn-4`` version (``"4.0.0b36"``), or ``None``; reads package metadata only.

    (``flash_attn.cute.__version__`` is always ``"0.0.0"`` in 4.0.0b36: it asks for a distribution named
    ``fa4``.)
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    # Its file list, not importlib.util.find_spec("flash_attn.cute"): finding a sub-package imports the parent,
    # and with flash-attn 2 also installed, flash_attn/__init__.py loads its CUDA extension.
    files = dist.files
    if files is not None and not any(str(f).replace("\\", "/").endswith("flash_attn/cute/interface.py")
                                     for f in files):
        return None
    return dist.version


def _cache_setting() -> tuple[bool, Path | None]:
    """``SDPA_FLASH_FA4_CACHE`` parsed: (turn FA4's disk cache on, directory or ``None`` for ours)."""
    raw = os.environ.get(_CACHE_ENV, "1").strip()
    if raw.lower() in ("1", "on", "true", "yes", ""):
        return True, None
    if raw.lower() in ("0", "off", "false", "no"):
        return False, None
    if raw.startswith(("/", "~", ".")):
        return True, Path(raw).expanduser()
    raise AttentionInputError(f"Expected {_CACHE_ENV} to be 1 (on, the default), 0 (off) or a directory path, but "
                              f"got {raw!r} instead.")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sdpa_flash/fa4`` (``~/.cache/sdpa_flash/fa4``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdpa_flash" / "fa4"


def _configure_cache() -> None:
    """Turn FA4's persistent compile cache on before its import (it reads the variables then), unless the user
    set FA4's own variables or ``SDPA_FLASH_FA4_CACHE=0``."""
    on, where = _cache_setting()
    if not on or _FA4_CACHE_ON in os.environ:
        return
    os.environ[_FA4_CACHE_ON] = "1"
    if _FA4_CACHE_DIR not in os.environ:
        os.environ[_FA4_CACHE_DIR] = str(where or default_cache_dir())


def load() -> ModuleType:
    """Import FA4's interface module (once; thread-safe) and return it.

    Raises:
        ImportError: the package is absent or fails to import (the message says which).
    """
    global _module, _import_error, import_seconds
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _import_error is not None:
            raise ImportError(_import_error)
        if installed_version() is None:
            raise ImportError(f"{DISTRIBUTION} is not installed ({INSTALL_HINT})")
        _configure_cache()
        start = time.perf_counter()
        try:
            mod = importlib.import_module(_MODULE)
            for name in ("flash_attn_func", "flash_attn_varlen_func", "_flash_attn_fwd", "_flash_attn_bwd"):
                if not hasattr(mod, name):
                    raise ImportError(f"{_MODULE} has no {name} (an unsupported flash-attn-4 release)")
        except Exception as exc:  # any failure at import is "cannot be used here", with the reason
            _import_error = f"{DISTRIBUTION} {installed_version()} failed to import: {type(exc).__name__}: {exc}"
            raise ImportError(_import_error) from exc
        import_seconds = time.perf_counter() - start
        _module = mod
        return mod


def import_error() -> str | None:
    """Why FA4 cannot be imported here, trying the import once if it has not been tried (``None``: it imports)."""
    if _module is not None:
        return None
    try:
        load()
    except ImportError as exc:
        return str(exc)
    return None


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """FA4's compile cache as this process sees it.

    Attributes:
        enabled: the persistent (on-disk) cache is on (FA4 reads this when it is imported).
        directory: where compiled kernels are kept (``None`` when the cache is off).
        entries: compiled kernels on disk (all FA4 source fingerprints).
        bytes: their size.
        in_memory: kernels compiled or loaded in this process, by entry point (``{"fwd": 3, "bwd": 2}``);
            empty until FA4 is imported.
    """

    enabled: bool
    directory: str | None
    entries: int
    bytes: int
    in_memory: dict[str, int]


def cache_info() -> CacheInfo:
    """What FA4's compile cache holds (does not import FA4)."""
    if _module is not None:
        cu = importlib.import_module("flash_attn.cute.cache_utils")
        enabled = bool(cu.CUTE_DSL_CACHE_ENABLED)
        directory = str(cu.get_cache_path()) if enabled else None
    else:
        on, where = _cache_setting()
        enabled = os.environ.get(_FA4_CACHE_ON, "1" if on else "0") == "1"
        directory = os.environ.get(_FA4_CACHE_DIR) or (str(where or default_cache_dir()) if enabled else None)
    entries = size = 0
    if directory and os.path.isdir(directory):
        for p in Path(directory).rglob("*.o"):
            entries += 1
            size += p.stat().st_size
    in_memory: dict[str, int] = {}
    if _module is not None:
        for name in ("_flash_attn_fwd", "_flash_attn_bwd"):
            cache: Any = getattr(getattr(_module, name, None), "compile_cache", None)  # FA4's, or None: len() decides
            try:
                in_memory[name.rsplit("_", 1)[1]] = len(cache)
            except TypeError:
                pass
    return CacheInfo(enabled, directory, entries, size, in_memory)


# ------------------------------------------------------------------------------------------ the backend
_SM90 = Requirements(
    dtypes=frozenset((torch.float16, torch.bfloat16)),
    min_cc=(9, 0),
    max_cc=(10, 3),
    max_head_dim=256,
    head_dim_multiple=8,
    native_gqa=True,
    kernel_causal="bottom_right",
    dropout=False,
    mask=False,
    contiguous_last_dim=True,
    # FA4's backward takes deterministic=True (an ordered dQ accumulation; SM90: flash-attention b664ea0c, GQA fix
    # #2510); the runner passes it whenever torch.use_deterministic_algorithms(True) is on.
    deterministic_backward=True,
    # window_size, softcap and learnable_sink are FA4's own arguments, forward and backward (the sink's gradient
    # too: SM90/100/110, interface.py:2297)
    window=True,
    softcap=True,
    sinks=True,
)


class FA4Backend(Backend):
    name = "fa4"
    MISSING_REASON = f"{DISTRIBUTION} is not installed ({INSTALL_HINT})"
    PACKAGE = DISTRIBUTION
    DIRECT_LABEL = "flash_attn.cute"
    ROUTE_REASON = ("FlashAttention-4's own function is called directly (no global flags change); (B, H, S, D) "
                    "inputs reach it as (B, S, H, D) views, without a copy")
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {"cuda": _SM90}
    # Its CuTe kernels are named after their module: kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90...
    PROFILER_NAMES = ("flash_attncute",)

    def installed_version(self) -> str | None:
        return installed_version()

    def missing_reason(self, device: torch.device) -> str | None:
        why = super().missing_reason(device)
        if why is None and device.type == "cuda" and not getattr(torch.version, "hip", None):
            cc = torch.cuda.get_device_capability(device)
            if _SM90.min_cc is not None and _SM90.max_cc is not None and _SM90.min_cc <= cc <= _SM90.max_cc:
                why = import_error()  # a GPU it can run on: import the package now (seconds), never while planning
        return why

    def extra_reasons(self, spec: AttentionSpec, caps: Device) -> list[str]:
        reasons = []
        cc = caps.compute_capability
        if caps.hip_version:
            reasons.append("FlashAttention-4's kernels are CUDA (NVIDIA) only")
        if cc is not None and cc[0] == 10:
            d, dv = spec.head_dim, spec.head_dim_v
            if not (max(d, dv) <= 128 or (d, dv) in ((192, 128), (256, 256))):
                reasons.append(f"head dims ({d}, {dv}) on {caps.arch} (supported: <= 128, (192, 128) or (256, 256))")
        return reasons

    def runner(self, spec: AttentionSpec, prep: Prep, *, traced: bool = False) -> Runner:
        if traced:
            return super().runner(spec, prep, traced=True)
        call = _eager_kernel(load(), _deterministic(spec), _multi_gpu())
        return make_runner(call, spec, prep, masked_value=self.MASKED_VALUE, zero_masked_rows=self.ZERO_MASKED_ROWS)

    def bshd_runner(self, spec: AttentionSpec, prep: Prep) -> Runner | None:
        if prep != Prep(kernel_causal=prep.kernel_causal):
            return None  # padding, truncation or a mask: the (B, H, S, D) runner
        return _plain(load(), bool(prep.kernel_causal), _deterministic(spec), _multi_gpu(), bhsd=False,
                      window=spec.window, softcap=spec.softcap)

    def kernel(self, device_type: str, *, traced: bool = False) -> KernelFn:
        return _TRACED

    # -------------------------------------------------------------------------------------------- varlen
    VARLEN = True

    def varlen(self) -> Any:
        fn = load().flash_attn_varlen_func
        guard = _multi_gpu()
        det = torch.are_deterministic_algorithms_enabled

        def run(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, dropout_p: float,
                causal: bool, scale: float | None, *, window: tuple[int | None, int | None] | None = None,
                softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
            # window_size (per sequence, bottom-right: FA4's own alignment), softcap and learnable_sink are FA4's
            # arguments; its varlen autograd.Function gives the sink's gradient (interface.py, FlashAttnVarlenFunc)
            with _on_device(q) if guard else _NULL:
                return fn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(max_q),
                          max_seqlen_k=int(max_k), softmax_scale=scale, causal=bool(causal),
                          window_size=(None, None) if window is None else window_arg(*window),
                          learnable_sink=None if sinks is None else sinks.float(), softcap=softcap or 0.0,
                          deterministic=det() and (q.requires_grad or (sinks is not None and sinks.requires_grad)))[0]

        return run


_NULL = contextlib.nullcontext()


def _multi_gpu() -> bool:
    """More than one CUDA device: calls then need a device guard (decided when a runner is built)."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 1


def _deterministic(spec: AttentionSpec) -> bool:
    """Pass FA4 ``deterministic=True`` for a backward under ``torch.use_deterministic_algorithms(True)``; the
    per-call cache of :func:`sdpa_flash.attention` keys on that mode, so reading it when a runner is built is
    enough."""
    return spec.needs_grad and torch.are_deterministic_algorithms_enabled()


def _on_device(t: Tensor) -> Any:
    """``torch.cuda.device(t.device)`` when that is not the current device (FA4 has no device guard)."""
    if t.device.index is None or t.device.index == torch.cuda.current_device():
        return _NULL
    return torch.cuda.device(t.device)


class _BHSDFunction(torch.autograd.Function):
    """FA4's forward and backward on (B, H, S, D) tensors as one autograd node.

    FA4 takes (B, S, H, D); the ``transpose(1, 2)`` views it gets are made in here, so autograd records one node
    per call instead of FA4's own node plus a ``TransposeBackward0`` for each of q, k, v and the output (four
    nodes cost ~0.19 ms of host time per training call on an H100, where a windowed gpt-oss layer is host-bound;
    benchmarks/results/session_h100_1208_night). The kernels and their arguments are those of FA4's
    ``FlashAttnFunc`` for a plain call: ``_flash_attn_fwd`` with the LSE kept, ``_flash_attn_bwd`` with it.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sink: Tensor | None, mod: ModuleType,
                args: tuple[float | None, bool, int | None, int | None, float], deterministic: bool,
                guard: bool) -> Tensor:
        scale, causal, left, right, softcap = args
        with _on_device(q) if guard else _NULL:
            out, lse = mod._flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           softmax_scale=scale, causal=causal, softcap=softcap,
                                           window_size_left=left, window_size_right=right, learnable_sink=sink,
                                           return_lse=True)[:2]
        ctx.save_for_backward(q, k, v, out, lse, sink)
        ctx.mod, ctx.args, ctx.deterministic, ctx.guard = mod, args, deterministic, guard
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, sink = ctx.saved_tensors
        scale, causal, left, right, softcap = ctx.args
        with _on_device(q) if ctx.guard else _NULL:
            # FA4 copies dout only when its layout is not one the kernel reads (its maybe_contiguous)
            grads = ctx.mod._flash_attn_bwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out,
                                            dout.transpose(1, 2), lse, softmax_scale=scale, causal=causal,
                                            softcap=softcap, window_size_left=left, window_size_right=right,
                                            deterministic=ctx.deterministic, learnable_sink=sink)
        dq, dk, dv = (g.transpose(1, 2) for g in grads[:3])
        dsink = grads[3] if sink is not None and len(grads) > 3 else None
        return dq, dk, dv, dsink, None, None, None, None


def _plain(mod: ModuleType, causal: bool, deterministic: bool, guard: bool, *, bhsd: bool,
           window: tuple[int | None, int | None] | None = None, softcap: float | None = None) -> Runner:
    """One FA4 call with nothing to adapt: ``run(q, k, v, attn_mask, dropout_p, scale[, sinks])`` on (B, H, S, D)
    tensors (passed to FA4 as (B, S, H, D) views, in one autograd node: :class:`_BHSDFunction`) or, with
    ``bhsd=False``, on (B, S, H, D) tensors as they are, through FA4's ``flash_attn_func``.
    ``window`` (bottom-right, ``None`` per side unbounded: FA4's own convention) and ``softcap`` are FA4's."""
    # FA4's own defaults when off (window (None, None), softcap 0.0, no sink): explicit keywords, no dict per call
    ws = (None, None) if window is None else window_arg(*window)
    cap = 0.0 if softcap is None else softcap
    if bhsd:
        fwd = mod._flash_attn_fwd
        apply = _BHSDFunction.apply
        grad_enabled = torch.is_grad_enabled

        def run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, scale: float | None,
                sinks: Tensor | None = None) -> Tensor:
            sink = None if sinks is None else sinks.float()
            if grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                   or (sink is not None and sink.requires_grad)):
                return apply(q, k, v, sink, mod, (scale, causal, ws[0], ws[1], cap), deterministic, guard)
            with _on_device(q) if guard else _NULL:  # inference: no autograd node at all
                return fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                           causal=causal, softcap=cap, window_size_left=ws[0], window_size_right=ws[1],
                           learnable_sink=sink)[0].transpose(1, 2)

        return run

    fn = mod.flash_attn_func

    def run_bshd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, scale: float | None,
                 sinks: Tensor | None = None) -> Tensor:
        return fn(q, k, v, softmax_scale=scale, causal=causal, deterministic=deterministic, window_size=ws,
                  softcap=cap, learnable_sink=None if sinks is None else sinks.float())[0]

    if not guard:
        return run_bshd

    def run_guarded(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, scale: float | None,
                    sinks: Tensor | None = None) -> Tensor:
        with _on_device(q):
            return run_bshd(q, k, v, attn_mask, dropout_p, scale, sinks)

    return run_guarded


def _eager_kernel(mod: ModuleType, deterministic: bool, guard: bool) -> KernelFn:
    """The eager kernel for :func:`make_runner` (a :data:`~sdpa_flash.backends.KernelFn`): :func:`_plain`'s
    (B, H, S, D) call, for calls with an adaptation around them and for those with none."""
    def plain(options: KernelOptions) -> Runner:
        return _plain(mod, bool(options.causal), deterministic, guard, bhsd=True, window=options.window,
                      softcap=options.softcap)

    def call(c: KernelCall) -> Tensor:
        run = _plain(mod, bool(c.causal), deterministic, guard, bhsd=True, window=c.window, softcap=c.softcap)
        return run(c.q, c.k, c.v, None, c.dropout_p, c.scale, c.sinks)

    return with_plain(call, plain, takes_sinks=True)


# ------------------------------------------------------------------------------ torch.compile: custom ops
def window_arg(left: int | None, right: int | None) -> tuple[int | None, int | None]:
    """flash-attn 2's window (``-1`` = unbounded on that side) as FA4 takes it: ``None`` per side.

    FA4 4.0.0b36 resets a side to unbounded only when *both* are negative, so ``(-1, 0)`` would become an empty
    band (all-zero output); each negative side is mapped to ``None`` on its own, as torch's FA4 adapter does.
    """
    return (None if left is None or left < 0 else int(left), None if right is None or right < 0 else int(right))


@torch.library.custom_op("sdpa_flash::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float | None, causal: bool, window_left: int,
            window_right: int, softcap: float, sink: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FA4's forward on (B, S, H, D) inputs -> ``(out (B, Sq, H, Dv), lse (B, H, Sq) float32)``; a negative window
    side is unbounded; ``sink``: FA4's ``learnable_sink`` (H,) float32, or ``None``."""
    wl, wr = window_arg(window_left, window_right)
    extra = {} if sink is None else {"learnable_sink": sink}
    with _on_device(q):
        res = load()._flash_attn_fwd(q, k, v, softmax_scale=scale, causal=causal, softcap=softcap,
                                     window_size_left=wl, window_size_right=wr, return_lse=True, **extra)
    return res[0], res[1]


@fa4_fwd.register_fake
def _fa4_fwd_fake(q: Tensor, k: Tensor, v: Tensor, scale: float | None, causal: bool, window_left: int,
                  window_right: int, softcap: float, sink: Tensor | None = None) -> tuple[Tensor, Tensor]:
    b, sq, h, _ = q.shape
    return (q.new_empty(b, sq, h, v.shape[-1]), q.new_empty(b, h, sq, dtype=torch.float32))


@torch.library.custom_op("sdpa_flash::fa4_bwd", mutates_args=())
def fa4_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float | None,
            causal: bool, window_left: int, window_right: int, softcap: float, deterministic: bool,
            sink: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FA4's backward: ``(dq, dk, dv, dsink)`` in the inputs' shapes (``dsink`` empty without a sink)."""
    wl, wr = window_arg(window_left, window_right)
    extra = {} if sink is None else {"learnable_sink": sink}
    with _on_device(q):  # dout as it comes: FA4 copies it only when the kernel cannot read its layout
        res = load()._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=causal,
                                     softcap=softcap, window_size_left=wl, window_size_right=wr,
                                     deterministic=deterministic, **extra)
    dsink = res[3] if sink is not None and len(res) > 3 and res[3] is not None else q.new_empty(0)
    return res[0], res[1], res[2], dsink


@fa4_bwd.register_fake
def _fa4_bwd_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float | None,
                  causal: bool, window_left: int, window_right: int, softcap: float, deterministic: bool,
                  sink: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dsink = q.new_empty(0) if sink is None else torch.empty_like(sink)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsink


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, scale, causal, wl, wr, softcap, *rest = inputs
    sink = rest[0] if rest else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sink)
    ctx.args = (scale, causal, wl, wr, softcap)
    ctx.deterministic = torch.are_deterministic_algorithms_enabled()


def _backward(ctx: Any, dout: Tensor, dlse: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, sink = ctx.saved_tensors
    dq, dk, dv, dsink = fa4_bwd(dout, q, k, v, out, lse, *ctx.args, ctx.deterministic, sink)
    return dq, dk, dv, None, None, None, None, None, (dsink if sink is not None else None)


fa4_fwd.register_autograd(_backward, setup_context=_setup)


def _traced_call(c: KernelCall) -> Tensor:
    left, right = c.window if c.window is not None else (None, None)
    sink = None if c.sinks is None else c.sinks.float()
    out = fa4_fwd(c.q.transpose(1, 2), c.k.transpose(1, 2), c.v.transpose(1, 2), c.scale, bool(c.causal),
                  -1 if left is None else left, -1 if right is None else right, c.softcap or 0.0, sink)[0]
    return out.transpose(1, 2)


_TRACED = _traced_call
