"""The ranking's shape classes at their edges: each rule of ``sdpa_flash/_ranking.py`` one step inside and one step
outside every bound it has (and on both sides of its training / GQA condition and of its devices).

Moving a bound by one (queries <= 256 read as <= 255) passes every other test. Two checks, meant to stay when the
tables are tuned:

* ``DECISIONS``: literal expectations through the public planner, ``plan(spec, caps, policy)``, on constructed
  sm90 profiles with FlashAttention-4 installed on paper (the only device where the shape classes change the order);
  the expected first candidate and backend are written by hand from the measurements the rules cite.
* ``rule_edges``: the edge values of any rule, derived from its fields, with ``RankingRule.matches`` checked on both
  sides; and every bound of every shape-class rule must have a literal row on each side in ``DECISIONS``, so a new
  or moved bound needs its expectations written down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sdpa_flash import AttentionSpec, Capabilities, plan
from sdpa_flash._ranking import RANKING
from sdpa_flash.planner import RankingRule
from sdpa_flash.policy import resolve_policy

FA4_B36 = {"fa4": "4.0.0b36"}  # flash-attn-4 4.0.0b36 installed, on paper (Capabilities.kernels)

AUTO = resolve_policy("auto")
_RANGES = ("head_dim", "seqlen_q", "seqlen_k")


def _spec(**kw: Any) -> AttentionSpec:
    """A long training call (4096 queries and keys, head dim 128, no GQA): past every shape class, FA4 first."""
    base: dict[str, Any] = dict(
        device_type="cuda", dtype=torch.bfloat16, batch=1, heads_q=16, heads_kv=16, seqlen_q=4096, seqlen_k=4096,
        head_dim=128, head_dim_v=128, causal="top_left", mask=None, dropout=False, needs_grad=True,
    )
    base.update(kw)
    return AttentionSpec(**base)


def _hd(d: int, dv: int | None = None) -> dict[str, int]:
    return {"head_dim": d, "head_dim_v": d if dv is None else dv}


def _s(n: int) -> dict[str, int]:
    return {"seqlen_q": n, "seqlen_k": n}


_FWD = {"needs_grad": False}
_GQA = {"heads_kv": 4}
_SM90 = {"compute_capability": (9, 0), "kernels": FA4_B36}

# (what it shows, profile, call, first candidate, backend that runs)
DECISIONS: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("general", _SM90, {}, "fa4", "fa4"),
    # short queries: seqlen_q 0-256, any keys, forward or training
    ("sq=256", _SM90, {"seqlen_q": 256}, "cudnn", "cudnn"),
    ("sq=257", _SM90, {"seqlen_q": 257}, "fa4", "fa4"),
    ("sq=1-decode", _SM90, {"seqlen_q": 1, "causal": None, **_GQA, **_FWD}, "cudnn", "cudnn"),
    # one query, top-left causal: it sees key 0 alone, a Sk=1 call cuDNN does not take (PyTorch's check refused it on
    # the H200); the next in the rule runs it
    ("sq=1-top-left", _SM90, {"seqlen_q": 1, **_GQA, **_FWD}, "cudnn", "fa4"),
    ("sq=256-fwd", _SM90, {"seqlen_q": 256, **_FWD}, "cudnn", "cudnn"),
    ("sq=257-fwd", _SM90, {"seqlen_q": 257, **_FWD}, "fa4", "fa4"),
    # head dim 129-256 (max of D and Dv), training
    ("hd=128-train", _SM90, _hd(128), "fa4", "fa4"),
    ("hd=129-train", _SM90, _hd(129), "cudnn", "cudnn"),
    ("hd=128/dv=129-train", _SM90, _hd(128, 129), "cudnn", "cudnn"),
    ("hd=256-train", _SM90, _hd(256), "cudnn", "cudnn"),
    ("hd=257-train", _SM90, _hd(257), "fa4", "efficient"),  # past the class: FA4 first, but neither FA4 nor cuDNN
    ("hd=129-fwd", _SM90, {**_hd(129), **_FWD}, "fa4", "fa4"),  # takes D > 256
    ("hd=256-fwd", _SM90, {**_hd(256), **_FWD}, "fa4", "fa4"),
    # training up to 1024 keys
    ("s=1024-train", _SM90, _s(1024), "cudnn", "cudnn"),
    ("s=1025-train", _SM90, _s(1025), "fa4", "fa4"),
    ("sq=4096/sk=1024-train", _SM90, {"seqlen_k": 1024, "causal": "bottom_right"}, "cudnn", "cudnn"),
    ("sq=4096/sk=1025-train", _SM90, {"seqlen_k": 1025, "causal": "bottom_right"}, "fa4", "fa4"),
    # training with GQA up to 2048 keys
    ("s=2048-train-gqa", _SM90, {**_s(2048), **_GQA}, "cudnn", "cudnn"),
    ("s=2049-train-gqa", _SM90, {**_s(2049), **_GQA}, "fa4", "fa4"),
    ("s=2048-train", _SM90, _s(2048), "fa4", "fa4"),
    # forward only up to 2048 keys
    ("s=2048-fwd", _SM90, {**_s(2048), **_FWD}, "cudnn", "cudnn"),
    ("s=2049-fwd", _SM90, {**_s(2049), **_FWD}, "fa4", "fa4"),
    ("s=2048-fwd-gqa", _SM90, {**_s(2048), **_GQA, **_FWD}, "cudnn", "cudnn"),
    # the classes are Hopper's: the devices either side keep their general order
    ("sm89-sq=256", {"compute_capability": (8, 9), "kernels": FA4_B36}, {"seqlen_q": 256}, "flash", "flash"),
    ("sm89-s=2049", {"compute_capability": (8, 9)}, _s(2049), "flash", "flash"),
    ("sm100-s=4096", {"compute_capability": (10, 0), "kernels": FA4_B36}, {}, "cudnn", "cudnn"),
    ("sm100-sq=256", {"compute_capability": (10, 0), "kernels": FA4_B36}, {"seqlen_q": 256}, "cudnn", "cudnn"),
    ("sm80", {"compute_capability": (8, 0)}, {}, "flash", "flash"),
    ("sm75", {"compute_capability": (7, 5)}, {"dtype": torch.float16}, "efficient", "efficient"),
    # without FA4 installed the order is the same and cuDNN runs on both sides of every class
    ("sm90-no-fa4-s=4096", {"compute_capability": (9, 0)}, {}, "fa4", "cudnn"),
    ("sm90-no-fa4-sq=256", {"compute_capability": (9, 0)}, {"seqlen_q": 256}, "cudnn", "cudnn"),
]


@pytest.mark.parametrize(("profile", "call", "first", "backend"), [r[1:] for r in DECISIONS],
                         ids=[r[0] for r in DECISIONS])
def test_ranking_decision_at_the_edges(profile: dict[str, Any], call: dict[str, Any], first: str,
                                       backend: str) -> None:
    profile = dict(profile)
    caps = Capabilities.synthetic("cuda", profile.pop("compute_capability"), **profile)
    p = plan(_spec(**call), caps, AUTO)
    assert (p.order[0], p.backend) == (first, backend), p.explain()


# ------------------------------------------------------------------------------ edges derived from a rule
def _inside(rule: RankingRule) -> dict[str, Any]:
    """A call inside every condition of ``rule`` (its lowest positive value in each range)."""
    call: dict[str, Any] = {"needs_grad": True if rule.training is None else rule.training}
    if rule.gqa:
        call["heads_kv"] = 4
    for field in _RANGES:
        bounds = getattr(rule, field)
        if bounds is not None:
            call[field] = max(bounds[0], 1)
    if "head_dim" in call:
        call["head_dim_v"] = call["head_dim"]
    return call


def rule_edges(rule: RankingRule) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """``(label, call, inside)`` one step either side of each bound and condition of a shape-class rule, the rest
    of the call inside it: ``lo - 1`` (when ``lo > 0``), ``lo``, ``hi``, ``hi + 1`` of each range (the head dim
    through D and through Dv alone), and both values of ``training`` and ``gqa`` where the rule sets them."""
    inside = _inside(rule)
    for field in _RANGES:
        bounds = getattr(rule, field)
        if bounds is None:
            continue
        lo, hi = bounds
        values = ([lo - 1] if lo > 0 else []) + [lo, hi, hi + 1]
        for value in values:
            ok = lo <= value <= hi
            if field == "head_dim":
                yield f"D=Dv={value}", {**inside, "head_dim": value, "head_dim_v": value}, ok
                yield f"D=1/Dv={value}", {**inside, "head_dim": 1, "head_dim_v": value}, ok  # max(D, Dv) decides
            else:
                yield f"{field}={value}", {**inside, field: value}, ok
    if rule.training is not None:
        yield "training flipped", {**inside, "needs_grad": not rule.training}, False
    if rule.gqa is not None:
        yield "gqa flipped", {**inside, "heads_kv": 16 if rule.gqa else 4}, False


def _rule_caps(rule: RankingRule) -> Capabilities:
    if rule.device_type != "cuda":
        return Capabilities.synthetic(rule.device_type)
    cc = rule.min_cc or (rule.below_cc and (rule.below_cc[0] - 1, 0)) or (8, 0)
    caps = Capabilities.synthetic("cuda", cc)
    return dataclasses.replace(caps, hip_version="6.2") if rule.rocm else caps


_SHAPE_RULES = [r for r in RANKING if r.shape_class]


@pytest.mark.parametrize("rule", _SHAPE_RULES, ids=[r.describe() for r in _SHAPE_RULES])
def test_rule_matches_exactly_up_to_its_bounds(rule: RankingRule) -> None:
    caps = _rule_caps(rule)
    assert rule.matches(caps, _spec(**_inside(rule)))
    edges = list(rule_edges(rule))
    assert any(not ok for _, _, ok in edges)  # every shape-class rule has an outside
    for label, call, ok in edges:
        assert rule.matches(caps, _spec(**call)) == ok, (rule.describe(), label)


def test_every_bound_has_literal_decisions_on_both_sides() -> None:
    """Each bound of each shape-class rule (its upper end, and its lower end when above 0) appears in DECISIONS on
    the device's profile with a value on it and a value one step outside it."""
    def seen(field: str, value: int) -> bool:
        for _, profile, call, _, _ in DECISIONS:
            if profile.get("compute_capability") != (9, 0):
                continue
            spec = _spec(**call)
            got = max(spec.head_dim, spec.head_dim_v) if field == "head_dim" else getattr(spec, field)
            if got == value:
                return True
        return False

    for rule in _SHAPE_RULES:
        assert rule.min_cc == (9, 0), "a shape class off Hopper: give DECISIONS rows for its device"
        for field in _RANGES:
            bounds = getattr(rule, field)
            if bounds is None:
                continue
            lo, hi = bounds
            pairs = [(hi, hi + 1)] + ([(lo - 1, lo)] if lo > 0 else [])
            for a, b in pairs:
                assert seen(field, a) and seen(field, b), f"{rule.describe()}: no DECISIONS row at {field}={a}/{b}"
