"""Variable-length batches: ``sdpa_flash.varlen`` against the ways a user can do without it.

Useful TFLOP/s count only real work, ``Σ 4·H·Lᵢ²·D`` (halved when causal; backward 2.5x, forward+backward 3.5x),
so padding shows up as lost throughput. Each path gets the same sequences in its own format, prepared outside
the timed region, and its output is checked against float64 math on the shortest, the longest and the first
sequence before it is timed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..attention import attention, explain
from ..testing import reference_attention
from ._cases import MODE_FLOPS, Case
from ._check import compare
from ._paths import Unavailable, first_line
from ._timing import Settings, Stats, Timed, cleanup, interleave, is_oom, stacked

__all__ = ["VARLEN_PATHS", "VarlenCase", "run_varlen", "varlen_cases", "varlen_unavailable"]


@dataclasses.dataclass(frozen=True)
class VarlenCase:
    """A batch of sequences of different lengths, each ``(L, H, D)``."""

    name: str
    lengths: tuple[int, ...]
    heads: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def label(self) -> str:
        return (f"{self.name}: {len(self.lengths)} seqs, {self.tokens:,} tokens, longest {max(self.lengths)}, "
                f"hd{self.head_dim} H={self.heads} {self.dtype}{' causal' if self.causal else ''}")

    def flops(self, mode: str = "fwd") -> float:
        f = sum(4.0 * self.heads * n * n * self.head_dim for n in self.lengths)
        return f / (2 if self.causal else 1) * MODE_FLOPS[mode]

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.name, "n_seqs": len(self.lengths), "tokens": self.tokens, "max_len": max(self.lengths),
                "h": self.heads, "d": self.head_dim, "dtype": self.dtype, "causal": self.causal,
                "lengths": list(self.lengths)}


def varlen_cases(device_type: str, *, causal: bool = False) -> list[VarlenCase]:
    """The BASELINE batches: 64 sequences, lognormal lengths (μ 6.5, σ 0.9, clamped to 16 … 8,192) and uniform
    in 1 … 4,096; hd128, 16 heads, bf16. On the CPU: 8 sequences, lognormal (4.5, 0.8) in 8 … 512 and uniform in
    1 … 256; hd32, 4 heads, float32."""
    gen = torch.Generator().manual_seed(0)
    if device_type == "cuda":
        n, mu, sigma, lo, hi, top, h, d, dt = 64, 6.5, 0.9, 16, 8192, 4096, 16, 128, "bfloat16"
    else:
        n, mu, sigma, lo, hi, top, h, d, dt = 8, 4.5, 0.8, 8, 512, 256, 4, 32, "float32"
    logn = torch.exp(mu + sigma * torch.randn(n, generator=gen)).clamp(lo, hi).long().tolist()
    unif = torch.randint(1, top + 1, (n,), generator=gen).tolist()
    return [VarlenCase("lognormal", tuple(logn), h, d, dt, causal),
            VarlenCase("uniform", tuple(unif), h, d, dt, causal)]


def varlen_unavailable() -> str:
    """Why the varlen preset cannot run here (``""`` when ``sdpa_flash.varlen`` is importable)."""
    try:
        mod = importlib.import_module("sdpa_flash.varlen")
    except ImportError as exc:
        return f"sdpa_flash.varlen is not importable ({first_line(exc)}); the preset runs once it lands"
    missing = [n for n in ("pack", "varlen_attention") if not hasattr(mod, n)]
    return f"sdpa_flash.varlen lacks {', '.join(missing)}" if missing else ""


@dataclasses.dataclass
class _Prepared:
    leaves: tuple[torch.Tensor, ...]
    run: Callable[[], Any]
    grad_out: Any
    to_list: Callable[[Any], list[torch.Tensor]]
    backend: str
    flops: float | None = None  # own FLOPs (the dense reference row); None = the batch's useful FLOPs
    checked: bool = True


def _packed_field(obj: Any, total: int) -> tuple[str, torch.Tensor] | None:
    """Find the packed ``(total, H, D)`` tensor inside a VarlenBatch-like object."""
    for name in ("values", "packed", "data", "tensor", "x"):
        val = getattr(obj, name, None)
        if callable(val) and not isinstance(val, torch.Tensor):
            try:
                val = val()
            except Exception:  # not an accessor
                continue
        if isinstance(val, torch.Tensor) and val.dim() == 3 and val.shape[0] == total:
            return name, val
    return None


def _with_leaf(obj: Any, name: str, leaf: torch.Tensor) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{name: leaf})
    new = copy.copy(obj)
    setattr(new, name, leaf)
    return new


def _prepare(path: str, vc: VarlenCase, qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
             dos: list[torch.Tensor], device: torch.device) -> _Prepared:
    lens = list(vc.lengths)
    total, causal = vc.tokens, vc.causal

    def split(packed: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(packed, lens, dim=0))

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs).detach().requires_grad_()

    if path == "varlen_attention":
        why = varlen_unavailable()
        if why:
            raise Unavailable(why)
        mod = importlib.import_module("sdpa_flash.varlen")
        batches = [mod.pack([t.detach() for t in xs]) for xs in (qs, ks, vs)]
        found = [_packed_field(b, total) for b in batches]
        if any(f is None for f in found):
            raise Unavailable(f"cannot find the packed (tokens, H, D) tensor in {type(batches[0]).__name__}")
        leaves = tuple(f[1].detach().requires_grad_() for f in found if f is not None)
        qb, kb, vb = (_with_leaf(b, f[0], leaf) for b, f, leaf in zip(batches, found, leaves, strict=True)
                      if f is not None)

        def as_tensor(out: Any) -> torch.Tensor:
            if isinstance(out, torch.Tensor):
                return out
            got = _packed_field(out, total)
            if got is None:
                raise TypeError(f"cannot read varlen_attention's output ({type(out).__name__})")
            return got[1]

        return _Prepared(leaves, lambda: as_tensor(mod.varlen_attention(qb, kb, vb, causal=causal)),
                         torch.cat(dos), split, "sdpa_flash.varlen")
    if path == "attention(auto) per sequence":
        leaves = tuple(t.detach().transpose(0, 1)[None].contiguous().requires_grad_() for t in (*qs, *ks, *vs))
        n = len(lens)
        lq, lk, lv = leaves[:n], leaves[n:2 * n], leaves[2 * n:]
        gout = [d.transpose(0, 1)[None] for d in dos]
        plan = explain(lq[0].detach(), lk[0].detach(), lv[0].detach(), causal=causal)

        def loop() -> list[torch.Tensor]:
            return [attention(a, b, c, causal=causal) for a, b, c in zip(lq, lk, lv, strict=True)]

        return _Prepared(leaves, loop, gout, lambda outs: [o[0].transpose(0, 1) for o in outs],
                         f"{plan.backend} x{n} calls")
    if path == "attention(auto) padded + key mask":
        longest = max(lens)
        h, d = vc.heads, vc.head_dim

        def pad(xs: list[torch.Tensor]) -> torch.Tensor:
            out = torch.zeros(len(xs), longest, h, d, device=device, dtype=xs[0].dtype)
            for i, x in enumerate(xs):
                out[i, : x.shape[0]] = x.detach()
            return out.transpose(1, 2)

        leaves = tuple(pad(xs).requires_grad_() for xs in (qs, ks, vs))
        keep = torch.arange(longest, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        mask = keep[:, None, None, :]
        plan = explain(leaves[0].detach(), leaves[1].detach(), leaves[2].detach(), attn_mask=mask, causal=causal)
        return _Prepared(leaves, lambda: attention(*leaves, attn_mask=mask, causal=causal), pad(dos),
                         lambda out: [out[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)],
                         f"{plan.backend}, padded to {longest}")
    if path == "sdpa nested (jagged)":
        if causal:
            raise Unavailable("PyTorch's nested-tensor SDPA does not support is_causal=True")
        offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
        leaves = tuple(cat(xs) for xs in (qs, ks, vs))

        def nt(values: torch.Tensor) -> torch.Tensor:
            return torch.nested.nested_tensor_from_jagged(values, offsets=offsets).transpose(1, 2)

        import torch.nn.functional as F

        return _Prepared(leaves, lambda: F.scaled_dot_product_attention(nt(leaves[0]), nt(leaves[1]), nt(leaves[2])),
                         nt(torch.cat(dos)), lambda out: split(out.transpose(1, 2).values()), "PyTorch dispatch")
    if path in ("flash varlen (aten)", "torch varlen_attn"):
        if device.type != "cuda":
            raise Unavailable("CUDA only (the flash varlen kernel has no CPU implementation)")
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
        leaves = tuple(cat(xs) for xs in (qs, ks, vs))
        longest = max(lens)
        if path == "torch varlen_attn":
            try:
                from torch.nn.attention.varlen import varlen_attn
            except ImportError as exc:
                raise Unavailable(f"torch.nn.attention.varlen is not importable: {first_line(exc)}") from None
            window = (-1, 0) if causal else (-1, -1)
            # *leaves is q, k, v (mypy cannot count a tuple[Tensor, ...])
            return _Prepared(
                leaves, lambda: varlen_attn(*leaves, cu, cu, longest, longest,  # type: ignore[misc, call-arg, arg-type]
                                            window_size=window),
                torch.cat(dos), split, "flash (varlen)")
        op = torch.ops.aten._flash_attention_forward
        return _Prepared(leaves, lambda: op(*leaves, cu, cu, longest, longest, 0.0, causal, False)[0],
                         torch.cat(dos), split, "flash (cu_seqlens)")
    if path == "attention(auto) dense, same tokens":
        s = 4096 if device.type == "cuda" else 256
        case = Case(max(1, round(total / s)), vc.heads, s, vc.head_dim, vc.dtype, causal)
        gen = torch.Generator(device=device).manual_seed(1)
        shape = (case.batch, case.heads, s, case.head_dim)
        leaves = tuple(torch.randn(shape, generator=gen, device=device, dtype=case.torch_dtype).requires_grad_()
                       for _ in range(3))
        plan = explain(leaves[0].detach(), leaves[1].detach(), leaves[2].detach(), causal=causal)
        return _Prepared(leaves, lambda: attention(*leaves, causal=causal), torch.randn_like(leaves[0]),
                         lambda out: [], f"{plan.backend}, {case.batch}x{s} (reference throughput)",
                         flops=case.flops("fwd"), checked=False)
    raise Unavailable(f"unknown varlen path {path!r}")


VARLEN_PATHS: tuple[str, ...] = (
    "varlen_attention", "attention(auto) per sequence", "attention(auto) padded + key mask", "sdpa nested (jagged)",
    "flash varlen (aten)", "torch varlen_attn", "attention(auto) dense, same tokens",
)


def run_varlen(cases: Sequence[VarlenCase], modes: Sequence[str], device: torch.device, settings: Settings, *,
               paths: Sequence[str] = VARLEN_PATHS, deadline: float | None = None) -> list[dict[str, Any]]:
    """Every varlen path on every batch, forward and/or forward+backward (the modes other than ``"bwd"``)."""
    rows: list[dict[str, Any]] = []
    modes = [m for m in modes if m != "bwd"]
    for ci, vc in enumerate(cases):
        gen = torch.Generator(device=device).manual_seed(100 + ci)
        dt = Case(1, 1, 1, 1, vc.dtype).torch_dtype
        seqs = [[torch.randn(n, vc.heads, vc.head_dim, generator=gen, device=device, dtype=dt) for n in vc.lengths]
                for _ in range(4)]
        qs, ks, vs, dos = seqs
        picks = sorted({0, vc.lengths.index(min(vc.lengths)), vc.lengths.index(max(vc.lengths))})
        refs = {}
        for i in picks:
            a, b, c = (x[i].transpose(0, 1)[None] for x in (qs, ks, vs))
            refs[i] = (reference_attention(a, b, c, causal=vc.causal)[0].transpose(0, 1),
                       reference_attention(a, b, c, causal=vc.causal, dtype=None)[0].transpose(0, 1))
        na: dict[tuple[str, str], str] = {}
        prepared: dict[str, _Prepared] = {}
        checks: dict[str, dict[str, float]] = {}
        prep: _Prepared | None  # (None below, for a path that could not be prepared)
        for path in paths:
            try:
                prep = _prepare(path, vc, qs, ks, vs, dos, device)
                if prep.checked:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        outs = prep.to_list(prep.run())
                    checks[path] = {}
                    for i in picks:
                        ratio, fail = compare(outs[i], refs[i][1], refs[i][0], name=f"seq {i} (L={vc.lengths[i]})")
                        checks[path][f"seq {i}"] = round(ratio, 4)
                        if fail:
                            raise Unavailable(f"wrong result: {fail}")
                prepared[path] = prep
            except Unavailable as exc:
                na.update({(path, m): str(exc) for m in modes})
            except Exception as exc:
                why = f"out of memory: {first_line(exc, 200)}" if is_oom(exc) else first_line(exc)
                na.update({(path, m): why for m in modes})
                if is_oom(exc):
                    cleanup(device)
        stats: dict[tuple[str, str], Stats] = {}
        for mode in modes:
            items = [Timed(p, _fn(prepared[p], mode), (lambda: stacked(torch.no_grad)) if mode == "fwd" else
                           contextlib.nullcontext) for p in paths if p in prepared and (p, mode) not in na]
            if deadline is not None and time.monotonic() > deadline:
                na.update({(str(t.key), mode): "not run: the time cap was reached" for t in items})
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = interleave(items, device, settings, deadline=deadline)
            for key, r in res.items():
                if isinstance(r, Stats):
                    stats[(str(key), mode)] = r
                else:
                    na[(str(key), mode)] = (f"out of memory: {first_line(r, 200)}" if is_oom(r) else first_line(r))
        for path in paths:
            prep = prepared.get(path)
            for mode in modes:
                row: dict[str, Any] = {"case": vc.label, **vc.as_dict(), "path": path, "mode": mode,
                                       "backend": prep.backend if prep else ""}
                st = stats.get((path, mode))
                flops = (prep.flops if prep and prep.flops is not None else vc.flops("fwd")) * MODE_FLOPS[mode]
                if st is not None and (path, mode) not in na:
                    row.update(status="ok", reason="", ms=st.median_ms, ms_q1=st.q1_ms, ms_q3=st.q3_ms,
                               spread=st.spread, rounds=len(st.samples_ms), calls_per_sample=st.calls_per_sample,
                               samples_ms=list(st.samples_ms), flops=flops, tflops=flops / st.median_ms / 1e9,
                               peak_bytes=st.peak_bytes)
                else:
                    row.update(status="n/a", reason=na.get((path, mode), "not measured"), flops=flops)
                if path in checks:
                    row["check"] = checks[path]
                rows.append(row)
        del seqs, qs, ks, vs, dos, prepared, refs
        cleanup(device)
    return rows


def _fn(prep: _Prepared, mode: str) -> Callable[[int], object]:
    if mode == "fwd":
        return lambda i: prep.run()

    def fwdbwd(i: int) -> object:
        return torch.autograd.grad(prep.run(), prep.leaves, prep.grad_out)

    return fwdbwd
