"""The classes of calls a tuned table tells apart, and the grids of them that ``tune`` measures.

A class is what a :class:`~sdpa_flash.planner.RankingRule` distinguishes: dtype, the head-dim range, the query- and
key-length ranges, forward-only or training, causal or not, GQA or not, dense or packed, and, without causal
masking, whether the key length is a multiple of 128. The ranges are fixed and cover every size
(:data:`SEQLEN_CLASSES`, :data:`HEAD_DIM_CLASSES`), so a rule derived from one measured shape covers its whole
class. Each class is measured at one representative shape: by default the class's usual size (S=128 for "Sq
33-256", 8 less for the lengths that are not multiples of 128); with a seed, a shape drawn inside the class
(another seed measures other points of the same classes, a held-out check of the table).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._rules import KEY_ALIGN, RankingRule
from ..capability import Capabilities
from ..errors import AttentionInputError
from ..spec import CAUSAL_KINDS, FLOAT_DTYPES, AttentionSpec, dtype_name

__all__ = ["CONFIG_KEYS", "HEAD_DIM_CLASSES", "SEQLEN_CLASSES", "ShapeClass", "from_configs", "grid"]

MAX_LEN = 2**31 - 1
SEQLEN_CLASSES = ((1, 1), (2, 32), (33, 256), (257, 1024), (1025, 2048), (2049, 8192), (8193, MAX_LEN))
"""Query / key length ranges: decode (one query), then short to very long. 2-32 and 33-256 are apart because the
kernels' order differs between them: on an H100 (bf16, causal, forward, 16,384 tokens per call) PyTorch's flash
kernel ran S=8 to 24 2-7% faster than cuDNN, and cuDNN ran S=48 to 256 in 0.48-0.92x flash's time
(benchmarks/results/session_h100_1207_night)."""
HEAD_DIM_CLASSES = ((1, 32), (33, 64), (65, 96), (97, 128), (129, 256), (257, MAX_LEN))
"""Ranges of ``max(D, Dv)``. 65-96 and 97-128 are apart because the kernels' order differs between them: on an H100
(bf16, causal, training) FA4 ran head dim 96 at S=1888 14% faster than cuDNN (and at S=2048 2% faster), while cuDNN
ran 128 at S=2048 13% faster than FA4 (benchmarks/results/session_h100_1207_pm, session_h100_1207_eve). 1-32 and
33-64 likewise: cuDNN ran head dim 64 at S=4096 4% faster than FA4 (2.74 against 2.86 ms), while FA4 ran 32 at
S=2192 in 0.77x cuDNN's time (benchmarks/results/session_h100_1208_night)."""

CONFIG_KEYS = ("heads", "kv_heads", "head_dim", "head_dim_v", "seqlen", "seqlen_k", "batch", "causal", "training",
               "varlen", "dtype")
"""The keywords of a model configuration: those of :func:`sdpa_flash.warmup` but its variants (``window``,
``softcap``, ``sinks``), which only the kernels that take them run: tune ranks the plain call."""


def class_of(value: int, classes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The range of ``classes`` that holds ``value``."""
    for lo, hi in classes:
        if lo <= value <= hi:
            return lo, hi
    raise AttentionInputError(f"Expected a size of at least 1, but got {value} instead.")


@dataclasses.dataclass(frozen=True)
class ShapeClass:
    """One class of calls and the shape measured for it.

    The class's ranges follow from the shape (each is the range of :data:`SEQLEN_CLASSES` or
    :data:`HEAD_DIM_CLASSES` that holds it).

    Attributes:
        dtype, training, entry: the dtype; forward+backward or forward only; ``"dense"`` or ``"packed"``.
        causal: ``None``, ``"top_left"`` or ``"bottom_right"`` (packed calls: bottom-right, per sequence).
        batch, heads, kv_heads, sq, sk, d, dv: the call measured, (B, Hq, Hkv, Sq, Sk, D, Dv); for a packed class
            B is the number of sequences and Sq / Sk the longest.
        lengths, lengths_k: a packed class's query and key lengths per sequence (``None`` for a dense class).
    """

    dtype: torch.dtype
    training: bool
    causal: str | None
    batch: int
    heads: int
    kv_heads: int
    sq: int
    sk: int
    d: int
    dv: int
    entry: str = "dense"
    lengths: tuple[int, ...] | None = None
    lengths_k: tuple[int, ...] | None = None

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    @property
    def ranges(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The class's head-dim, query-length and key-length ranges."""
        return (class_of(max(self.d, self.dv), HEAD_DIM_CLASSES), class_of(self.sq, SEQLEN_CLASSES),
                class_of(self.sk, SEQLEN_CLASSES))

    @property
    def aligned(self) -> bool | None:
        """Whether the key length is a multiple of :data:`~sdpa_flash._rules.KEY_ALIGN`, for a dense class without
        causal masking (``None`` for the others: with causal masking the kernels mask the last tile anyway, and
        their order did not change with it)."""
        return None if self.causal is not None or self.entry != "dense" else self.sk % KEY_ALIGN == 0

    @property
    def key(self) -> tuple[Any, ...]:
        """What tells classes apart (two configurations with the same key are one class)."""
        return (self.dtype, self.ranges, self.training, self.causal is not None, self.gqa, self.entry, self.aligned)

    def rule(self, caps: Capabilities, order: tuple[str, ...], evidence: str,
             failed: Mapping[str, str] | None = None) -> RankingRule:
        """The ranking rule for this class on ``caps``."""
        hd, sq, sk = self.ranges
        return RankingRule(caps.device_type, order, evidence, rocm=bool(caps.hip_version), head_dim=hd, seqlen_q=sq,
                           seqlen_k=sk, training=self.training, gqa=self.gqa, causal=self.causal is not None,
                           dtype=self.dtype, entry=self.entry, failed=tuple(sorted((failed or {}).items())),
                           aligned=self.aligned)

    def describe(self) -> str:
        """The class in words: ``"bfloat16, head dim 97-128, Sq 257-1024, Sk 257-1024, training, no GQA, causal"``."""
        return self.rule(Capabilities.synthetic("cpu"), ("math",), "").describe()

    def spec(self, device_type: str) -> AttentionSpec:
        """The call as the planner sees it (a packed class: its longest sequence, causal bottom-right)."""
        return AttentionSpec(device_type, self.dtype, 1 if self.entry == "packed" else self.batch, self.heads,
                             self.kv_heads, self.sq, self.sk, self.d, self.dv, self.causal, needs_grad=self.training)

    def shape_text(self) -> str:
        """``"(8, 16, 1024, 128) bfloat16 causal fwd+bwd"``: the measured call, (B, H, S, D) with what differs."""
        if self.entry == "packed":
            lengths = self.lengths or (self.sq,)
            text = f"packed {len(lengths)} sequences of {min(lengths)}-{self.sq}, H={self.heads}"
        else:
            text = f"({self.batch}, {self.heads}, {self.sq}, {self.d})"
        if self.sk != self.sq and self.entry == "dense":
            text += f" Sk={self.sk}"
        if self.gqa:
            text += f" Hkv={self.kv_heads}"
        if self.dv != self.d:
            text += f" Dv={self.dv}"
        if self.entry == "packed":
            text += f", D={self.d}"
        text += f" {dtype_name(self.dtype)}"
        if self.causal:
            text += " causal" if self.causal == "top_left" or self.sq == self.sk else f" causal={self.causal}"
        return text + (" fwd+bwd" if self.training else " fwd")


# ----------------------------------------------------------------------------------------------- the grids
@dataclasses.dataclass(frozen=True)
class _Budget:
    """The size of a grid's calls on one device: tokens per call, and heads x head dim."""

    tokens: int
    width: int
    max_len: int
    decode_batch: int


_CUDA = _Budget(tokens=16384, width=2048, max_len=16384, decode_batch=16)
_CPU = _Budget(tokens=1024, width=256, max_len=512, decode_batch=4)


class _Draw:
    """The representative sizes: each class's usual one, or (with a seed) one drawn inside the class."""

    def __init__(self, seed: int | None, budget: _Budget) -> None:
        self.seed, self.budget, self.n = seed, budget, 0

    def rng(self) -> random.Random:
        self.n += 1
        return random.Random(f"{self.seed}/{self.n}")  # a str seed: the same draws in every process

    def seqlen(self, usual: int, aligned: bool | None = None) -> int:
        """A length of ``usual``'s class: ``usual`` itself, or (with a seed) one drawn log-uniformly, a multiple of
        8; ``aligned`` keeps it a multiple of :data:`KEY_ALIGN` (``True``) or not one (``False``) where the class
        has both."""
        lo, hi = class_of(usual, SEQLEN_CLASSES)
        hi = min(2 * lo if hi == MAX_LEN else hi, self.budget.max_len)
        if self.seed is None or lo == hi:
            s = min(usual, hi)
        else:
            s = round(math.exp(self.rng().uniform(math.log(lo), math.log(hi))))
            s = max(lo, min(hi, -(-s // 8) * 8))
        multiples = [m for m in (s // KEY_ALIGN * KEY_ALIGN, -(-s // KEY_ALIGN) * KEY_ALIGN) if lo <= m <= hi]
        if aligned and multiples and s % KEY_ALIGN:
            return min(multiples, key=lambda m: abs(m - s))
        if aligned is False and multiples and s % KEY_ALIGN == 0:
            return s - 8 if s - 8 >= lo else s + 8
        return s

    def head_dim(self, usual: int) -> int:
        lo, hi = class_of(usual, HEAD_DIM_CLASSES)
        if self.seed is None:
            return usual
        return self.rng().choice([d for d in range(16, min(hi, 256) + 1, 16) if d >= lo] or [usual])


def _gqa_heads(heads: int) -> int:
    """``heads`` rounded down to a multiple of 4 (at least 4): GQA classes share each K/V head among 4 query heads,
    and a drawn head dim (96: 2048 // 96 = 21 heads) must still give whole groups."""
    return max(4, heads // 4 * 4)


def _dense(draw: _Draw, dtype: torch.dtype, s: int, d: int, *, training: bool, causal: bool = True,
           gqa: bool = False, aligned: bool | None = None) -> ShapeClass:
    b = draw.budget
    s, d = draw.seqlen(s, aligned), draw.head_dim(d)
    heads = _gqa_heads(b.width // d) if gqa else max(1, b.width // d)
    kv = heads // 4 if gqa else heads
    return ShapeClass(dtype, training, "top_left" if causal else None, max(1, b.tokens // s), heads, kv, s, s, d, d)


def _decode(draw: _Draw, dtype: torch.dtype, sk: int, d: int, aligned: bool | None = None) -> ShapeClass:
    b = draw.budget
    sk, d = draw.seqlen(sk, aligned), draw.head_dim(d)
    heads = _gqa_heads(b.width // d)
    return ShapeClass(dtype, False, None, b.decode_batch, heads, heads // 4, 1, sk, d, d)


def _packed(draw: _Draw, dtype: torch.dtype, s: int, d: int, *, training: bool) -> ShapeClass:
    b = draw.budget
    s, d = draw.seqlen(s), draw.head_dim(d)
    rng = random.Random(f"{draw.seed}/packed/{s}")
    lengths = [s]
    while sum(lengths) + s // 2 <= b.tokens:
        lengths.append(rng.randint(max(1, s // 2), s))
    heads = max(1, b.width // d)
    return ShapeClass(dtype, training, "bottom_right", len(lengths), heads, heads, s, s, d, d, entry="packed",
                      lengths=tuple(lengths), lengths_k=tuple(lengths))


def default_dtypes(caps: Capabilities, quick: bool) -> tuple[torch.dtype, ...]:
    """bfloat16 on a GPU that has it (and float16 too in a full run); float16 on older GPUs; float32 elsewhere."""
    if caps.device_type != "cuda":
        return (torch.float32,)
    if (caps.compute_capability or (0, 0)) < (8, 0) or caps.hip_version:
        return (torch.float16,)
    return (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)


def grid(caps: Capabilities, *, quick: bool, seed: int | None = None,
         dtypes: Sequence[torch.dtype] | None = None) -> list[ShapeClass]:
    """The classes a quick or full run measures on ``caps``, in ``dtypes`` (default: :func:`default_dtypes`).

    On a GPU the quick grid is 20 classes in one dtype (head dim 128 forward and training, causal, at four lengths;
    decode; non-causal; GQA; head dims 64, 96 and 256; two packed classes; then a short forward, decode and
    non-causal again at a key length that is not a multiple of 128, and head dim 32), the full grid 110 per dtype.
    On a CPU, small float32 calls (sequences up to 512) so that a run takes seconds. Classes without causal masking
    are measured twice, at a key length that is a multiple of 128 and at one that is not
    (:attr:`ShapeClass.aligned`).
    """
    cuda = caps.device_type == "cuda"
    draw = _Draw(seed, _CUDA if cuda else _CPU)
    out: list[ShapeClass] = []
    for dt in dtypes or default_dtypes(caps, quick):
        if cuda and quick:
            for training in (False, True):
                out += [_dense(draw, dt, s, 128, training=training) for s in (128, 512, 2048, 4096)]
            out += [_decode(draw, dt, 4096, 128, aligned=True),
                    _dense(draw, dt, 4096, 128, training=False, causal=False, aligned=True),
                    _dense(draw, dt, 2048, 128, training=True, gqa=True),
                    _dense(draw, dt, 4096, 64, training=True), _dense(draw, dt, 4096, 256, training=True),
                    _packed(draw, dt, 4096, 128, training=True), _packed(draw, dt, 4096, 128, training=False),
                    _dense(draw, dt, 2048, 96, training=True)]  # appended: earlier classes keep their seeded draws
            out += [_dense(draw, dt, 16, 128, training=False), _decode(draw, dt, 4088, 128, aligned=False),
                    _dense(draw, dt, 4088, 128, training=False, causal=False, aligned=False),
                    _dense(draw, dt, 4096, 32, training=True)]
        elif cuda:
            lengths = (16, 128, 512, 2048, 4096, 16384)
            for training in (False, True):
                out += [_dense(draw, dt, s, d, training=training) for d in (32, 64, 96, 128, 256) for s in lengths]
                out += [_dense(draw, dt, s, 128, training=training, causal=False, aligned=aligned)
                        for s in lengths for aligned in ((True, False) if s >= KEY_ALIGN else (False,))]
                out += [_dense(draw, dt, s, 128, training=training, gqa=True) for s in lengths]
                out += [_packed(draw, dt, s, 128, training=training) for s in (512, 2048, 4096, 16384)]
            out += [_decode(draw, dt, sk, 128, aligned=aligned) for sk in (512, 2048, 4096, 16384)
                    for aligned in (True, False)]
        else:
            for training in (False, True):
                out += [_dense(draw, dt, s, 64, training=training) for s in (128, 512)]
            out += [_dense(draw, dt, 512, 64, training=False, causal=False), _decode(draw, dt, 512, 64),
                    _packed(draw, dt, 512, 64, training=True)]
            if not quick:
                for training in (False, True):
                    out += [_dense(draw, dt, s, 128, training=training) for s in (128, 512)]
                    out += [_dense(draw, dt, s, 64, training=training, gqa=True) for s in (128, 512)]
                out += [_dense(draw, dt, 128, 64, training=False, causal=False),
                        _dense(draw, dt, 512, 64, training=True, causal=False), _packed(draw, dt, 512, 64,
                                                                                         training=False)]
    return _unique(out)


def _unique(classes: Sequence[ShapeClass]) -> list[ShapeClass]:
    """The first of each class (a later shape of the same class would never decide: the first rule does)."""
    seen: dict[tuple[Any, ...], ShapeClass] = {}
    for c in classes:
        seen.setdefault(c.key, c)
    return list(seen.values())


# --------------------------------------------------------------------------------------- model configurations
def _positive(cfg: Mapping[str, Any], name: str, where: str, default: int | None = None) -> int:
    value = cfg.get(name, default)
    if type(value) is not int or value <= 0:
        raise AttentionInputError(f"Expected {where}.{name} to be a positive int, but got {value!r} instead.")
    return value


_DTYPE_NAMES = {**{dtype_name(d): d for d in FLOAT_DTYPES}, "bf16": torch.bfloat16, "fp16": torch.float16,
                "half": torch.float16, "fp32": torch.float32, "float": torch.float32, "fp64": torch.float64}


def parse_dtype(value: object, what: str) -> torch.dtype:
    """A floating-point ``torch.dtype``, or its name (``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"``); ``what``
    names the argument in the error."""
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES:
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.removeprefix("torch.")]
    raise AttentionInputError(f"Expected {what} to be a float dtype ({', '.join(map(dtype_name, FLOAT_DTYPES))}"
                              f" or bf16 / fp16 / fp32), but got {value!r} instead.")


def from_configs(configs: Sequence[Mapping[str, Any]], caps: Capabilities) -> list[ShapeClass]:
    """One class per model configuration, measured at exactly that configuration.

    A configuration takes :func:`sdpa_flash.warmup`'s keywords (:data:`CONFIG_KEYS`): ``heads`` and ``head_dim``
    (required), ``kv_heads``, ``head_dim_v``, ``seqlen`` (default 1024), ``seqlen_k``, ``batch`` (default: as many
    sequences as make the grid's tokens per call: 16,384 on a GPU, 1,024 on a CPU), ``causal``, ``training``
    (default ``True``), ``varlen`` (a packed batch of two sequences, ``seqlen`` and ``seqlen // 2 + 1``, as
    ``warmup`` makes) and ``dtype`` (a name such as ``"bfloat16"`` or a ``torch.dtype``; default: bfloat16 on a GPU
    that has it, float32 on a CPU).

    The rule a configuration writes covers its own class only. For a dense call without a causal mask that includes
    the key length's side of :data:`~sdpa_flash._rules.KEY_ALIGN`: a model tuned at ``seqlen_k=4096`` decides calls
    whose key length is a multiple of 128, and calls at 4,000 keys fall to the next table (the shipped one, or the
    built-in rules), because cuDNN's time steps there and that side was not measured. Give a second configuration
    at an unaligned length to tune both.

    Raises:
        AttentionInputError: not a list of objects, an unknown key, or a bad value.
    """
    if isinstance(configs, (str, bytes, Mapping)) or not isinstance(configs, Sequence) or not configs:
        raise AttentionInputError(f"Expected configs to be a non-empty list of configurations (dicts of "
                                  f"{', '.join(CONFIG_KEYS)}), but got {configs!r} instead.")
    budget = _CUDA if caps.device_type == "cuda" else _CPU
    out = []
    for i, cfg in enumerate(configs):
        where = f"configs[{i}]"
        if not isinstance(cfg, Mapping):
            raise AttentionInputError(f"Expected {where} to be a dict of {', '.join(CONFIG_KEYS)}, but got {cfg!r} "
                                      "instead.")
        unknown = sorted(set(cfg) - set(CONFIG_KEYS))
        if unknown:
            variant = " (windows, softcap and sinks run on the kernels that take them: tune ranks the plain call)" \
                if unknown[0] in ("window", "softcap", "sinks") else ""
            raise AttentionInputError(f"Expected the keys of {where} to be among {', '.join(CONFIG_KEYS)} (those of "
                                      f"sdpa_flash.warmup), but got {unknown[0]!r} instead{variant}.")
        heads, d = _positive(cfg, "heads", where), _positive(cfg, "head_dim", where)
        kv = _positive(cfg, "kv_heads", where, heads)
        if heads % kv:
            raise AttentionInputError(f"Expected {where}.heads ({heads}) to be a multiple of kv_heads, but got "
                                      f"kv_heads={kv} instead.")
        dv = _positive(cfg, "head_dim_v", where, d)
        s = _positive(cfg, "seqlen", where, 1024)
        sk = _positive(cfg, "seqlen_k", where, s)
        causal_value = cfg.get("causal", False)
        if not isinstance(causal_value, (bool, str)) or causal_value not in CAUSAL_KINDS:
            raise AttentionInputError(f"Expected {where}.causal to be a bool, 'top_left' or 'bottom_right', but got "
                                      f"{causal_value!r} instead.")
        training, varlen = cfg.get("training", True), cfg.get("varlen", False)
        for name, flag in (("training", training), ("varlen", varlen)):
            if not isinstance(flag, bool):
                raise AttentionInputError(f"Expected {where}.{name} to be a bool, but got {flag!r} instead.")
        dt = default_dtypes(caps, True)[0] if cfg.get("dtype") is None else parse_dtype(cfg["dtype"], f"{where}.dtype")
        causal = CAUSAL_KINDS[causal_value]
        if varlen:
            lq, lk = (s, s // 2 + 1), (sk, sk // 2 + 1)
            out.append(ShapeClass(dt, training, "bottom_right" if causal else None, 2, heads, kv, s, sk, d, dv,
                                  entry="packed", lengths=lq, lengths_k=lk))
        else:
            batch = _positive(cfg, "batch", where, max(1, budget.tokens // s))
            out.append(ShapeClass(dt, training, causal, batch, heads, kv, s, sk, d, dv))
    return _unique(out)
