"""The rules the planner reads as data: :class:`RankingRule` (which backend ``auto`` tries first, per device and
class of call) and :class:`DenylistEntry` (a backend vetoed where a known bug bites).

They sit below the data modules that use them (``_ranking.py``, ``_denylist.py``) and the planner
(:mod:`sdpa_flash.planner`), which reads both; they know the backends only by their registered names.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from .backends import BACKENDS
from .capability import Capabilities
from .errors import AttentionInputError
from .spec import AttentionSpec, cudnn_release, dtype_name

__all__ = ["KEY_ALIGN", "DenylistEntry", "RankingRule"]

KEY_ALIGN = 128
"""The key length a kernel's tiles divide evenly (:attr:`RankingRule.aligned`)."""


@dataclasses.dataclass(frozen=True)
class RankingRule:
    """The preferred backend order for a range of devices — and optionally a class of calls — with its evidence.

    Rules are tried in order; the first that matches the device and the call decides. A rule without a shape
    class (``head_dim``, ``seqlen_q``, ``seqlen_k``, ``training``, ``gqa``, ``causal``, ``dtype`` all ``None``) is
    the device's general rule; a rule with one carries the measurement that made it differ from the general rule.
    Tables tuned on a machine (``python -m sdpa_flash tune``) are rules too, one per measured class.

    Attributes:
        device_type, min_cc, below_cc, rocm: the devices it applies to.
        order: the backends, fastest first.
        evidence: the measurement it rests on.
        head_dim: inclusive range of ``max(D, Dv)``.
        seqlen_q / seqlen_k: inclusive ranges of the query / key length.
        training: ``True``: calls that need a backward; ``False``: forward-only calls.
        gqa: ``True``: fewer key/value heads than query heads; ``False``: as many.
        causal: ``True``: causal calls (either corner); ``False``: calls without causal masking.
        dtype: the dtype of the inputs (``torch.bfloat16``).
        entry: ``"dense"`` (a dense call) or ``"packed"`` (the packed ``cu_seqlens`` kernel of a ragged batch;
            ``plan(..., entry="packed")``).
        failed: ``(backend, error)`` for each backend that raised on this class when it was tuned: the planner
            refuses it there with that reason.
        aligned: ``True``: calls whose key length is a multiple of :data:`KEY_ALIGN` (128); ``False``: the others.
            Tuned tables set it on classes without causal masking, where the kernels' order depends on it (on an
            H100, cuDNN's non-causal forward took 1.09-1.11x FA4's time at key lengths off a multiple of 128, and
            0.93-1.03x at the multiples: benchmarks/results/session_h100_1207_night).
    """

    device_type: str
    order: tuple[str, ...]
    evidence: str
    min_cc: tuple[int, int] | None = None
    below_cc: tuple[int, int] | None = None
    rocm: bool = False
    head_dim: tuple[int, int] | None = None
    seqlen_q: tuple[int, int] | None = None
    seqlen_k: tuple[int, int] | None = None
    training: bool | None = None
    gqa: bool | None = None
    causal: bool | None = None
    dtype: torch.dtype | None = None
    entry: str = "dense"
    failed: tuple[tuple[str, str], ...] = ()
    aligned: bool | None = None

    @property
    def shape_class(self) -> bool:
        """Whether the rule applies to a class of calls rather than to every call on its devices."""
        return (self.head_dim, self.seqlen_q, self.seqlen_k, self.training, self.gqa, self.causal, self.dtype,
                self.aligned) != (None,) * 8

    def matches(self, caps: Capabilities, spec: AttentionSpec | None = None, entry: str = "dense") -> bool:
        """Whether the rule applies on ``caps`` to the call ``spec`` made through ``entry`` (``"dense"`` or
        ``"packed"``); without ``spec``, only a rule without a shape class matches."""
        if entry != self.entry:
            return False
        if caps.device_type != self.device_type or self.rocm != bool(caps.hip_version):
            return False
        cc = caps.compute_capability
        if self.min_cc is not None and (cc is None or cc < self.min_cc):
            return False
        if self.below_cc is not None and (cc is None or cc >= self.below_cc):
            return False
        if not self.shape_class:
            return True
        if spec is None:
            return False

        def within(value: int, bounds: tuple[int, int] | None) -> bool:
            return bounds is None or bounds[0] <= value <= bounds[1]

        return (within(max(spec.head_dim, spec.head_dim_v), self.head_dim) and within(spec.seqlen_q, self.seqlen_q)
                and within(spec.seqlen_k, self.seqlen_k)
                and (self.training is None or self.training == spec.needs_grad)
                and (self.gqa is None or self.gqa == spec.gqa)
                and (self.causal is None or self.causal == (spec.causal is not None))
                and (self.dtype is None or self.dtype == spec.dtype)
                and (self.aligned is None or self.aligned == (spec.seqlen_k % KEY_ALIGN == 0)))

    def describe(self) -> str:
        """The shape class in words (empty for a device-wide rule)."""
        bits = ["packed"] if self.entry == "packed" else []
        if self.dtype is not None:
            bits.append(dtype_name(self.dtype))
        if self.head_dim is not None:
            bits.append(f"head dim {self.head_dim[0]}-{self.head_dim[1]}")
        if self.seqlen_q is not None:
            bits.append(f"Sq {self.seqlen_q[0]}-{self.seqlen_q[1]}")
        if self.seqlen_k is not None:
            bits.append(f"Sk {self.seqlen_k[0]}-{self.seqlen_k[1]}")
        if self.aligned is not None:
            bits.append(f"Sk {'' if self.aligned else 'not '}a multiple of {KEY_ALIGN}")
        if self.training is not None:
            bits.append("training" if self.training else "forward only")
        if self.gqa is not None:
            bits.append("GQA" if self.gqa else "no GQA")
        if self.causal is not None:
            bits.append("causal" if self.causal else "not causal")
        return ", ".join(bits)


_DEVICE_TYPES = ("cuda", "cpu", "mps", "xpu")


@dataclasses.dataclass(frozen=True)
class DenylistEntry:
    """A known-bad configuration: ``backend`` is vetoed where every given condition holds.

    Attributes:
        backend: the vetoed backend's name.
        reason: one line stating the problem, shown in ``explain()`` and errors.
        source: where it is documented (an issue URL or number).
        device_type: the device type it applies to.
        min_cc: lowest compute capability affected, inclusive (``None``: any).
        max_cc: highest compute capability affected, inclusive (``None``: any).
        torch: a PEP 440 specifier of affected torch versions (``"<2.5.1"``), ``None`` for any; nightlies and vendor
            pre-release builds count as the release they lead to.
        cudnn: a specifier of affected cuDNN versions as ``major.minor.patch`` (``">=9.1,<9.3"``).
        kernel: a specifier of affected versions of the backend's own package, for a backend installed as one
            (``fa4``: ``flash-attn-4``, e.g. ``"<=4.0.0b36"``); pre-releases match. ``None`` for any.
        when: an extra condition on the call, e.g. ``lambda s: s.needs_grad and s.head_dim > 128``.
        reroute: the entry moves calls to the next backend without it counting as a fallback (no warning, and no
            error under ``fallback="error"``): for known-bad kernel behaviour on shapes where the next backend is
            exact and the cost is negligible. A policy that names only the vetoed backend still refuses the call,
            with the entry as the reason.
    """

    backend: str
    reason: str
    source: str = ""
    device_type: str = "cuda"
    min_cc: tuple[int, int] | None = None
    max_cc: tuple[int, int] | None = None
    torch: str | None = None
    cudnn: str | None = None
    kernel: str | None = None
    when: Callable[[AttentionSpec], bool] | None = None
    reroute: bool = False

    def __post_init__(self) -> None:  # checked here, so a bad entry fails where it is written, not in plan()
        def fail(field: str, expected: str, value: object) -> AttentionInputError:
            return AttentionInputError(f"Expected DenylistEntry.{field} to be {expected}, but got {value!r} instead.")

        if self.backend not in BACKENDS:
            raise fail("backend", f"one of {', '.join(sorted(BACKENDS))}", self.backend)
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise fail("reason", "a non-empty string", self.reason)
        if not isinstance(self.device_type, str) or self.device_type not in _DEVICE_TYPES:
            raise fail("device_type", f"a device type ({', '.join(_DEVICE_TYPES)})", self.device_type)
        for field in ("min_cc", "max_cc"):
            cc = getattr(self, field)
            if cc is not None and not (isinstance(cc, tuple) and len(cc) == 2
                                       and all(type(x) is int and x >= 0 for x in cc)):
                raise fail(field, "None or a (major, minor) tuple of ints such as (9, 0)", cc)
        if self.kernel is not None and BACKENDS[self.backend].PACKAGE is None:
            packaged = ", ".join(sorted(n for n, b in BACKENDS.items() if b.PACKAGE)) or "none"
            raise fail("kernel", f"None for {self.backend!r}, which is part of torch (kernel= is for backends "
                       f"installed as their own package: {packaged})", self.kernel)
        for field in ("torch", "cudnn", "kernel"):
            text = getattr(self, field)
            if text is not None:
                try:
                    SpecifierSet(text)
                except (InvalidSpecifier, TypeError):
                    raise fail(field, "None or a PEP 440 version specifier such as '>=2.5,<2.6'", text) from None
        if self.when is not None and not callable(self.when):
            raise fail("when", "None or a callable taking an AttentionSpec", self.when)
        if not isinstance(self.reroute, bool):
            raise fail("reroute", "a bool", self.reroute)

    def matches(self, spec: AttentionSpec, caps: Capabilities) -> bool:
        if caps.device_type != self.device_type:
            return False
        cc = caps.compute_capability
        if self.min_cc is not None and (cc is None or cc < self.min_cc):
            return False
        if self.max_cc is not None and (cc is None or cc > self.max_cc):
            return False
        if self.torch is not None and not _version_in(caps.torch_version, self.torch, release=True):
            return False
        if self.cudnn is not None:
            if caps.cudnn_version is None:
                return False
            if not _version_in(cudnn_release(caps.cudnn_version), self.cudnn):
                return False
        if self.kernel is not None:
            installed = caps.kernel_version(self.backend)
            if installed is None or not _version_in(installed, self.kernel):
                return False
        return self.when is None or bool(self.when(spec))

    def describe(self) -> str:
        return f"denylisted: {self.reason}" + (f" [{self.source}]" if self.source else "")


@functools.lru_cache(maxsize=256)
def _version_in(version: str, specifier: str, release: bool = False) -> bool:
    """``version`` satisfies the PEP 440 ``specifier`` (parsed once per pair: plan() asks for every candidate).
    Pre-releases match (FA4 ships as ``4.0.0b…``). With ``release`` (torch's), the version counts as the release it
    leads to: a nightly ``2.12.0.dev…`` or a vendor build ``2.11.0a0+….nv26.01`` is 2.12.0 / 2.11.0."""
    v = Version(version)
    return SpecifierSet(specifier).contains(Version(v.base_version) if release else v, prereleases=True)
