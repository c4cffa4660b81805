"""The dense attention paths a benchmark can put side by side, and how each is built for one :class:`Case`.

A path is a way a user can compute attention: PyTorch's default dispatch, SDPA with one backend forced, our
:func:`sdpa_flash.attention` under a policy, FlexAttention, the flash-attn-compatible API, or the naive formula.
Building a path for a case either returns a :class:`Built` (the call, the context it runs in, and which kernel
it lands on) or raises :class:`Unavailable` with the reason, which becomes the row's ``n/a: <reason>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import attention, explain
from ..backends import BACKENDS
from ..errors import BackendUnavailableError, SdpaFlashError
from ._cases import Case

__all__ = ["CATALOGUE", "Built", "PathDef", "Unavailable", "build", "catalogue", "select_paths"]

_SDP_NAMES = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
              "math": "MATH"}
_FROM_SDP = {v: k for k, v in _SDP_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class PathDef:
    """One path in the catalogue.

    Attributes:
        name: its name in tables, JSON and ``--paths`` (``"sdpa[flash]"``, ``"attention(auto)"``).
        family: ``"sdpa"`` (default dispatch), ``"forced"`` (one SDPA backend via ``sdpa_kernel``),
            ``"policy"`` (``sdpa_flash.attention`` under a policy), ``"flex"``, ``"compat"`` or ``"naive"``.
        arg: the backend (``forced``) or policy (``policy``) name.
        description: one line for ``--list``.
    """

    name: str
    family: str
    arg: str = ""
    description: str = ""

    @property
    def single_backend(self) -> bool:
        """Forced to one kernel: the candidates for "best single backend"."""
        return self.family == "forced" or (self.family == "policy" and self.arg not in ("auto", "fused"))


_BUILTIN_PATHS: tuple[PathDef, ...] = (
    PathDef("sdpa", "sdpa", description="F.scaled_dot_product_attention, PyTorch's default dispatch"),
    *(PathDef(f"sdpa[{b}]", "forced", b, f"F.scaled_dot_product_attention inside sdpa_kernel([{_SDP_NAMES[b]}])")
      for b in ("cudnn", "flash", "efficient", "math")),
    *(PathDef(f"attention({p})", "policy", p, f"sdpa_flash.attention(..., policy={p!r})")
      for p in ("auto", "fused", "cudnn", "flash", "efficient", "math", "chunked")),
    # FlashAttention-4 through the fa4 backend; without flash-attn-4 (or off sm90/sm100) every row is n/a with the
    # backend's own reason ("flash-attn-4 is not installed (pip install 'sdpa_flash[fa4]')"), as for any policy.
    PathDef("attention(fa4)", "policy", "fa4", "sdpa_flash.attention(..., policy='fa4'): FlashAttention-4 "
                                               "(flash-attn-4, sm90/sm100; n/a with the reason elsewhere)"),
    PathDef("attention(flex)", "policy", "flex", "sdpa_flash.attention(..., policy='flex'): FlexAttention through "
                                                 "the flex backend (CUDA sm80+; n/a with the reason elsewhere)"),
    PathDef("flex", "flex", description="FlexAttention, torch.compile(flex_attention, dynamic=False), block mask "
                                        "built once per shape (CUDA; on the CPU only when named)"),
    PathDef("compat", "compat", description="sdpa_flash.compat.flash_attn_func (flash-attn 2 API), when present"),
    PathDef("naive", "naive", description="softmax(q @ k.T * scale, float32) @ v in the input dtype, as written "
                                          "by hand (the reference formulation)"),
)


def catalogue() -> tuple[PathDef, ...]:
    """Every path: the built-in ones, then ``attention(NAME)`` for each backend added with
    :func:`sdpa_flash.register_backend` (read from the registry at each call, so a plug-in is benchmarked like the
    built-in backends)."""
    known = {p.arg for p in _BUILTIN_PATHS if p.family == "policy"}
    plugged = tuple(PathDef(f"attention({n})", "policy", n, f"sdpa_flash.attention(..., policy={n!r}): "
                            f"{type(b).__name__}, a registered plug-in")
                    for n, b in BACKENDS.items() if n not in known)
    if not plugged:
        return _BUILTIN_PATHS
    cut = max(i for i, p in enumerate(_BUILTIN_PATHS) if p.family == "policy") + 1
    return (*_BUILTIN_PATHS[:cut], *plugged, *_BUILTIN_PATHS[cut:])


CATALOGUE = _BUILTIN_PATHS
"""The built-in paths (:func:`catalogue` adds the registered plug-ins)."""


class Unavailable(Exception):
    """The path cannot run this case; ``str(exc)`` is the reason."""


def select_paths(spec: str | Sequence[str] | None, default: Sequence[str]) -> tuple[list[PathDef], set[str]]:
    """Resolve ``--paths``: names, globs (``"sdpa*"``), bare policy names (``"auto"`` = ``attention(auto)``), and
    ``+name`` / ``-name`` edits of the preset's default list.

    Returns:
        The selected paths in catalogue order, and the names given explicitly (not through a glob or a default).
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else (spec or [])) if s.strip()]
    edits = bool(items) and all(s[0] in "+-" for s in items)
    chosen: set[str] = set(_expand(default)) if (not items or edits) else set()
    explicit: set[str] = set()
    for raw in items:
        op, pat = (raw[0], raw[1:]) if raw[0] in "+-" else ("+", raw)
        names = _expand([pat])
        if not names:
            known = ", ".join(p.name for p in catalogue())
            raise ValueError(f"Expected path names or patterns among {known}, but got {pat!r} instead.")
        if op == "-":
            chosen -= set(names)
        else:
            chosen |= set(names)
            if len(names) == 1 and not any(ch in pat for ch in "*?["):
                explicit |= set(names)
    return [p for p in catalogue() if p.name in chosen], explicit


def _expand(patterns: Sequence[str]) -> list[str]:
    paths = catalogue()
    names = {p.name for p in paths}
    out: list[str] = []
    for pat in patterns:
        if pat in names:
            out.append(pat)
        elif f"attention({pat})" in names:
            out.append(f"attention({pat})")
        else:
            out += [p.name for p in paths if fnmatch.fnmatchcase(p.name, pat)]
    return out


@dataclasses.dataclass
class Built:
    """A path ready to run one case.

    Attributes:
        call: ``call(q, k, v) -> out`` in (B, H, S, D).
        context: entered around every call (e.g. ``sdpa_kernel``).
        backend: ``backend(needs_grad)``: the kernel it lands on, for the row.
        unavailable_modes: modes this path cannot run here, with the reason.
        explain_failure: turns an exception from a call into the row's reason.
    """

    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    backend: Callable[[bool], str] = lambda needs_grad: ""
    unavailable_modes: dict[str, str] = dataclasses.field(default_factory=dict)
    explain_failure: Callable[[BaseException], str] = lambda exc: first_line(exc)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"``, shortened to ``limit`` characters."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reasons_text(exc: BackendUnavailableError, only: str | None = None) -> str:
    """The reasons carried by a :class:`BackendUnavailableError`, on one line (``only``: that backend's)."""
    items = {only: exc.reasons[only]} if only and only in exc.reasons else exc.reasons
    if not items:
        return first_line(exc)
    if len(items) == 1:
        return "; ".join(next(iter(items.values())))
    return " | ".join(f"{name}: {'; '.join(rs)}" for name, rs in items.items())


def build(path: PathDef, case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
          explicit: bool = False) -> Built:
    """Build ``path`` for ``case``, given one copy of the inputs (leaves that require grad).

    Raises:
        Unavailable: the path cannot run this case; the message is the reason.
    """
    gqa = case.hkv != case.heads
    causal = case.causal
    if path.family in ("sdpa", "forced"):
        kwargs: dict[str, Any] = {"is_causal": causal}
        if gqa:
            kwargs["enable_gqa"] = True

        def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

        if path.family == "sdpa":
            return Built(sdpa_call, backend=functools.partial(_default_choice, q, k, v, causal, gqa))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdp = getattr(SDPBackend, _SDP_NAMES[path.arg])
        return Built(sdpa_call, context=lambda: sdpa_kernel([sdp]), backend=lambda needs_grad: path.arg,
                     explain_failure=functools.partial(_forced_failure, path.arg, q, k, v, causal))
    if path.family == "policy":
        pol = path.arg
        modes: dict[str, str] = {}
        try:
            explain(q.detach(), k.detach(), v.detach(), causal=causal, policy=pol)
        except BackendUnavailableError as exc:
            raise Unavailable(reasons_text(exc, pol)) from None
        try:
            explain(q, k, v, causal=causal, policy=pol)
        except BackendUnavailableError as exc:
            modes = {"bwd": reasons_text(exc, pol), "fwdbwd": reasons_text(exc, pol)}

        def policy_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q, k, v, causal=causal, policy=pol)

        return Built(policy_call, backend=functools.partial(_plan_backend, q, k, v, causal, pol),
                     unavailable_modes=modes)
    if path.family == "flex":
        return _build_flex(case, q, explicit=explicit)
    if path.family == "compat":
        return _build_compat(case)
    if path.family == "naive":
        return _build_naive(case, q)
    raise Unavailable(f"unknown path family {path.family!r}")


def _default_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, gqa: bool,
                    needs_grad: bool) -> str:
    """The kernel PyTorch's default dispatch picks (``torch._fused_sdp_choice``, the dispatcher's own choice)."""
    from torch.nn.attention import SDPBackend

    if not needs_grad:
        q, k, v = q.detach(), k.detach(), v.detach()
    try:
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, causal, scale=None, enable_gqa=gqa)
        return _FROM_SDP.get(SDPBackend(choice).name, SDPBackend(choice).name.lower())
    except Exception:  # a private helper: absent or changed in some torch version
        return "?"


def _plan_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, pol: str,
                  needs_grad: bool) -> str:
    if not needs_grad:
        q, k, v = q.detach(), k.detach(), v.detach()
    try:
        p = explain(q, k, v, causal=causal, policy=pol)
    except SdpaFlashError:
        return "n/a"
    name = p.backend + (" [fallback]" if p.fallback else "")
    return name if p.route == "direct" else f"{name} via F.sdpa"


def _forced_failure(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    exc: BaseException) -> str:
    """Why a forced SDPA backend failed: sdpa_flash's reasons for that backend when it has some, else torch's."""
    try:
        explain(q, k, v, causal=causal, policy=backend)
    except BackendUnavailableError as err:
        return reasons_text(err, backend)
    except SdpaFlashError:
        pass
    return first_line(exc)


# ------------------------------------------------------------------------------------------------ flex
@functools.cache
def _flex_compiled() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _causal_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


def _build_flex(case: Case, q: torch.Tensor, *, explicit: bool) -> Built:
    if q.device.type != "cuda" and not explicit:
        raise Unavailable("FlexAttention is timed on CUDA only: on the CPU it compiles a C++ kernel per shape "
                          "(~10 s) and has no backward (name 'flex' in --paths to run it anyway)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        flex = _flex_compiled()
    except Exception as exc:
        raise Unavailable(f"torch.nn.attention.flex_attention is not usable here: {first_line(exc)}") from None
    block_mask = None
    if case.causal:
        block_mask = create_block_mask(_causal_mod, None, None, case.seqlen, case.seqlen, device=q.device)
    gqa = case.hkv != case.heads
    modes = {}
    if q.device.type == "cpu":
        modes = {m: "FlexAttention has no backward on the CPU" for m in ("bwd", "fwdbwd")}

    def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    kind = "triton" if q.device.type == "cuda" else q.device.type
    return Built(flex_call, backend=lambda needs_grad: f"flex ({kind})", unavailable_modes=modes)


def _build_compat(case: Case) -> Built:
    try:
        compat = importlib.import_module("sdpa_flash.compat")
        fn = compat.flash_attn_func
    except (ImportError, AttributeError) as exc:
        raise Unavailable(f"sdpa_flash.compat.flash_attn_func is not available: {first_line(exc)}") from None
    causal = case.causal

    def compat_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

    return Built(compat_call, backend=lambda needs_grad: "compat")


def _build_naive(case: Case, q: torch.Tensor) -> Built:
    rep = case.heads // case.hkv
    scale = case.head_dim ** -0.5
    hide = None
    if case.causal:
        s = case.seqlen
        hide = torch.ones(s, s, dtype=torch.bool, device=q.device).triu_(1)

    def naive_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        if hide is not None:
            scores = scores.masked_fill(hide, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    return Built(naive_call, backend=lambda needs_grad: "naive")
