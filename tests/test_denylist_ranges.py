"""The built-in denylist's version ranges, each on both sides of its bounds, and the cuDNN version decoding.

A range read one version off, or a version integer decoded wrongly (cuDNN's 91900 read as 9.9.0 falls inside
``cudnn<=9.15.0``), vetoes a backend on machines the entry does not concern, or misses the ones it does; nothing
else in the suite would notice, because every other test runs one matching version. Expectations here are
literal: the versions are the bounds written in ``sdpa_flash/_denylist.py`` and the issues they cite, read by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sdpa_flash import AttentionSpec, Capabilities, DenylistEntry, denylist, plan
from sdpa_flash.capability import cudnn_version_tuple
from sdpa_flash.policy import resolve_policy

FA4_B36 = {"fa4": "4.0.0b36"}  # flash-attn-4 4.0.0b36 installed, on paper (Capabilities.kernels)


@pytest.mark.parametrize(
    ("encoded", "version"),
    [
        (7605, (7, 6, 5)),  # cuDNN <= 8: major * 1000 + minor * 100 + patch
        (8600, (8, 6, 0)),
        (8907, (8, 9, 7)),
        (90000, (9, 0, 0)),  # cuDNN >= 9: major * 10000 + minor * 100 + patch
        (90100, (9, 1, 0)),
        (90501, (9, 5, 1)),
        (91500, (9, 15, 0)),
        (91501, (9, 15, 1)),
        (91900, (9, 19, 0)),
        (92400, (9, 24, 0)),
    ],
)
def test_cudnn_version_decoding(encoded: int, version: tuple[int, int, int]) -> None:
    assert cudnn_version_tuple(encoded) == version


def _spec(device_type: str = "cuda", **kw: Any) -> AttentionSpec:
    base: dict[str, Any] = dict(
        device_type=device_type, dtype=torch.bfloat16 if device_type == "cuda" else torch.float32, batch=2,
        heads_q=16, heads_kv=16, seqlen_q=1024, seqlen_k=1024, head_dim=64, head_dim_v=64, causal="top_left",
        mask=None, dropout=False, needs_grad=True,
    )
    base.update(kw)
    return AttentionSpec(**base)


_FWD = {"needs_grad": False}
_CPU = {"device_type": "cpu", "compute_capability": None}

# (the entry's source, the backend it vetoes, the profile (Capabilities.synthetic arguments), the call, vetoed?)
# Every row but the bound's own is one version (or one step of the call's condition) outside it.
RANGE_EDGES: list[tuple[str, str, dict[str, Any], dict[str, Any], bool]] = [
    # pytorch/pytorch#139298: torch ==2.5.0, training
    ("pytorch/pytorch#139298", "cudnn", {"torch_version": "2.4.1"}, {}, False),
    ("pytorch/pytorch#139298", "cudnn", {"torch_version": "2.5.0"}, {}, True),
    ("pytorch/pytorch#139298", "cudnn", {"torch_version": "2.5.1"}, {}, False),
    ("pytorch/pytorch#139298", "cudnn", {"torch_version": "2.5.0"}, _FWD, False),
    # pytorch/pytorch#138529: torch <2.6, a sequence of length 1 (a decode call: no causal flag, which with one
    # top-left query would leave it key 0 alone, a call cuDNN refuses anyway)
    ("pytorch/pytorch#138529", "cudnn", {"torch_version": "2.5.1"}, {"seqlen_q": 1, "causal": None, **_FWD}, True),
    ("pytorch/pytorch#138529", "cudnn", {"torch_version": "2.6.0"}, {"seqlen_q": 1, "causal": None, **_FWD}, False),
    ("pytorch/pytorch#138529", "cudnn", {"torch_version": "2.5.1"}, {"seqlen_q": 2, "causal": None, **_FWD}, False),
    # pytorch/pytorch#166211: sm90 only, torch ==2.9.0, training
    ("pytorch/pytorch#166211", "cudnn", {"torch_version": "2.8.0"}, {}, False),
    ("pytorch/pytorch#166211", "cudnn", {"torch_version": "2.9.0"}, {}, True),
    ("pytorch/pytorch#166211", "cudnn", {"torch_version": "2.9.1"}, {}, False),
    ("pytorch/pytorch#166211", "cudnn", {"torch_version": "2.9.0", "compute_capability": (8, 9)}, {}, False),
    ("pytorch/pytorch#166211", "cudnn", {"torch_version": "2.9.0", "compute_capability": (10, 0)}, {}, False),
    # pytorch/pytorch#169849: cuDNN <=9.15.0, training, seqlen_q not a multiple of 128
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 8907}, {"seqlen_q": 1000}, True),  # 8.9.7
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 90100}, {"seqlen_q": 1000}, True),  # 9.1.0
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 91500}, {"seqlen_q": 1000}, True),  # 9.15.0
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 91501}, {"seqlen_q": 1000}, False),  # 9.15.1
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 91600}, {"seqlen_q": 1000}, False),  # 9.16.0
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 91900}, {"seqlen_q": 1000}, False),  # 9.19.0: the H200
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 92400}, {"seqlen_q": 1000}, False),  # 9.24.0
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 91500}, {"seqlen_q": 1024}, False),
    ("pytorch/pytorch#169849", "cudnn", {"cudnn_version": 91500}, {"seqlen_q": 1000, **_FWD}, False),
    # pytorch/pytorch#196678: sm90, torch >=2.11, training with a mask, a length 64 mod 128
    ("pytorch/pytorch#196678", "cudnn", {"torch_version": "2.10.1"}, {"mask": "bool", "seqlen_q": 1088}, False),
    ("pytorch/pytorch#196678", "cudnn", {"torch_version": "2.11.0"}, {"mask": "bool", "seqlen_q": 1088}, True),
    ("pytorch/pytorch#196678", "cudnn", {"torch_version": "2.11.0"}, {"mask": "bool", "seqlen_k": 1088}, True),
    ("pytorch/pytorch#196678", "cudnn", {"torch_version": "2.11.0"}, {"mask": "bool", "seqlen_q": 1089}, False),
    ("pytorch/pytorch#196678", "cudnn", {"torch_version": "2.11.0", "compute_capability": (10, 0)},
     {"mask": "bool", "seqlen_q": 1088}, False),
    # pytorch/pytorch#193893: sm100, torch >=2.11, GQA with fewer than 8 key/value heads
    ("pytorch/pytorch#193893", "cudnn", {"torch_version": "2.10.1", "compute_capability": (10, 0)},
     {"heads_kv": 4}, False),
    ("pytorch/pytorch#193893", "cudnn", {"torch_version": "2.11.0", "compute_capability": (10, 0)},
     {"heads_kv": 4}, True),
    ("pytorch/pytorch#193893", "cudnn", {"torch_version": "2.11.0", "compute_capability": (10, 0)},
     {"heads_kv": 8}, False),
    ("pytorch/pytorch#193893", "cudnn", {"torch_version": "2.11.0", "compute_capability": (9, 0)},
     {"heads_kv": 4}, False),
    ("pytorch/pytorch#193893", "cudnn", {"torch_version": "2.11.0", "compute_capability": (12, 0)},
     {"heads_kv": 4}, False),
    # pytorch/pytorch#141128: the CPU flash kernel, torch >=2.11, no mask, fewer than 16 keys (8 in float64)
    ("pytorch/pytorch#141128", "flash", {"torch_version": "2.10.1", **_CPU}, {"seqlen_k": 15, **_FWD}, False),
    ("pytorch/pytorch#141128", "flash", {"torch_version": "2.11.0", **_CPU}, {"seqlen_k": 15, **_FWD}, True),
    ("pytorch/pytorch#141128", "flash", {"torch_version": "2.11.0", **_CPU}, {"seqlen_k": 16, **_FWD}, False),
    ("pytorch/pytorch#141128", "flash", {"torch_version": "2.11.0", **_CPU},
     {"seqlen_k": 7, "dtype": torch.float64, **_FWD}, True),
    ("pytorch/pytorch#141128", "flash", {"torch_version": "2.11.0", **_CPU},
     {"seqlen_k": 8, "dtype": torch.float64, **_FWD}, False),
    # Dao-AILab/flash-attention#2896: FA4 (kernel= range <4.1, pre-releases in range) on sm90, training, head dim 80
    ("Dao-AILab/flash-attention#2896", "fa4", {"kernels": FA4_B36}, {"head_dim": 80, "head_dim_v": 80}, True),
    ("Dao-AILab/flash-attention#2896", "fa4", {"kernels": {"fa4": "4.0.5"}}, {"head_dim": 80, "head_dim_v": 80}, True),
    ("Dao-AILab/flash-attention#2896", "fa4", {"kernels": {"fa4": "4.1.0"}}, {"head_dim": 80, "head_dim_v": 80}, False),
    ("Dao-AILab/flash-attention#2896", "fa4", {"kernels": FA4_B36, "compute_capability": (10, 0)},
     {"head_dim": 80, "head_dim_v": 80}, False),
    ("Dao-AILab/flash-attention#2896", "fa4", {"kernels": FA4_B36}, {"head_dim": 64, "head_dim_v": 64}, False),
]


def _edge_id(row: tuple[str, str, dict[str, Any], dict[str, Any], bool]) -> str:
    source, _, profile, call, vetoed = row
    shown = {k: v for k, v in profile.items() if v is not None and k != "device_type"}
    bits = [source.rsplit("#", 1)[-1], *(f"{k}={v}" for k, v in {**shown, **call}.items()),
            "vetoed" if vetoed else "runs"]
    return "-".join(str(b).replace(" ", "") for b in bits)


@pytest.mark.parametrize(("source", "backend", "profile", "call", "vetoed"), RANGE_EDGES,
                         ids=[_edge_id(r) for r in RANGE_EDGES])
def test_denylist_entry_at_its_bounds(
    source: str, backend: str, profile: dict[str, Any], call: dict[str, Any], vetoed: bool
) -> None:
    profile = dict(profile)
    caps = Capabilities.synthetic(profile.pop("device_type", "cuda"), profile.pop("compute_capability", (9, 0)),
                                  **profile)
    p = plan(_spec(caps.device_type, **call), caps, resolve_policy([backend, "math"]))
    reasons = p.reasons.get(backend, ())
    if vetoed:
        assert any(source in r for r in reasons), (caps, reasons)
    else:  # outside the range the backend runs the call (nothing else declines it)
        assert p.backend == backend, (caps, reasons)


def test_every_ranged_builtin_entry_is_tested_on_both_sides() -> None:
    """A new version-ranged entry needs rows above, or it is one no test would notice going wrong."""
    ranged = {e.source for e in denylist() if e.torch or e.cudnn or e.kernel}
    for source in ranged:
        outcomes = {vetoed for s, _, _, _, vetoed in RANGE_EDGES if s == source or s in source.split(", ")}
        assert outcomes == {True, False}, f"{source}: no row inside and outside its range in RANGE_EDGES"


def test_a_cudnn_range_is_compared_with_the_decoded_version() -> None:
    """An entry for cuDNN 8.9 concerns 8907 (8.9.7) and neither 8600 (8.6.0) nor 90000 (9.0.0)."""
    entry = DenylistEntry("cudnn", "test: cuDNN 8.9 only", cudnn=">=8.9,<9")
    s = _spec()
    assert entry.matches(s, Capabilities.synthetic(cudnn_version=8907))
    assert not entry.matches(s, Capabilities.synthetic(cudnn_version=8600))
    assert not entry.matches(s, Capabilities.synthetic(cudnn_version=90000))
