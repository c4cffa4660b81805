"""Tuned ranking tables (``sdpa_flash.tune``, ``python -m sdpa_flash tune``): measured on the CPU end to end, the
file format and its validation, which table is in force (this machine's > the shipped one for this GPU > the
built-in rules), a recorded failure as a planner reason, and concurrent writers and readers.

GPU-keyed cases use constructed profiles (``Capabilities.synthetic``) with tables built by hand and written through
the writer. Nothing here asserts a time: a table is what the machine measured.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

import sdpa_flash
from sdpa_flash import AttentionSpec, Capabilities, _caches, plan
from sdpa_flash.__main__ import main, report
from sdpa_flash.errors import AttentionInputError, BackendUnavailableError, TunedTableError, TunedTableWarning
from sdpa_flash.planner import RankingRule, ranking, ranking_source
from sdpa_flash.tuning import TunedTable, _table, read_table, tables_for
from sdpa_flash.tuning._grid import HEAD_DIM_CLASSES, SEQLEN_CLASSES, from_configs, grid
from sdpa_flash.tuning._table import FORMAT, machine_key, table_filename

ROOT = pathlib.Path(__file__).resolve().parent.parent
H200 = Capabilities.synthetic("cuda", (9, 0), name="NVIDIA H200", torch_version="2.13.0")
H100 = Capabilities.synthetic("cuda", (9, 0), name="NVIDIA H100 80GB HBM3", torch_version="2.13.0")
# (2, 16, 512, 128) bfloat16, causal, forward: the class "head dim 65-128, Sq/Sk 257-1024, forward only, causal"
SPEC = AttentionSpec("cuda", torch.bfloat16, 2, 16, 16, 512, 512, 128, 128, "top_left")
TINY = [{"heads": 2, "head_dim": 16, "seqlen": 64, "causal": True, "dtype": "float32", "training": False},
        {"heads": 4, "kv_heads": 2, "head_dim": 32, "seqlen": 300, "batch": 1, "training": True}]


@pytest.fixture
def tune_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """An empty tune directory and an empty shipped-tables directory (``tmp_path / "shipped"``); plans made afresh
    before and after."""
    monkeypatch.setenv(_table.ENV_DIR, str(tmp_path / "tuned"))
    monkeypatch.setattr(_table, "SHIPPED_DIR", tmp_path / "shipped")
    _caches.clear_all()
    yield tmp_path / "tuned"
    _caches.clear_all()


def _rule(order: tuple[str, ...], evidence: str = "tuned by hand: flash 0.2 ms, cudnn 0.3 ms at (2, 16, 512, 128)",
          **fields: Any) -> RankingRule:
    """A rule of SPEC's class (fields override it)."""
    cls: dict[str, Any] = dict(head_dim=(65, 128), seqlen_q=(257, 1024), seqlen_k=(257, 1024), training=False,
                               gqa=False, causal=True, dtype=torch.bfloat16)
    return RankingRule("cuda", order, evidence, **{**cls, **fields})


def _table_for(caps: Capabilities, *rules: RankingRule, **key: Any) -> TunedTable:
    """A hand-built, valid table keyed for ``caps`` (``key`` overrides fields: another torch, another GPU)."""
    run = {"command": "by hand", "mode": "quick", "seed": None, "rounds": 1, "date": "2026-12-07T00:00:00Z",
           "duration_s": 1.0, "host": "test"}
    row = {"class": "bfloat16, head dim 65-128", "backend": "flash", "status": "measured", "reason": None,
           "shape": [2, 16, 16, 512, 512, 128, 128], "lengths": None, "dtype": "bfloat16", "causal": True,
           "training": False, "entry": "dense", "median_ms": 0.2, "min_ms": 0.19, "max_ms": 0.22,
           "samples_ms": [0.19, 0.2, 0.22], "calls_per_sample": 10, "first_call_s": 0.5}
    return TunedTable({**machine_key(caps), **key}, run, rules, tuple({} for _ in rules), (row,))


def _write(table: TunedTable, directory: pathlib.Path, name: str | None = None) -> pathlib.Path:
    path = directory / (name or table_filename(table.key))
    table.write(path)
    return path


FLASH_FIRST = ("flash", "cudnn", "efficient", "math", "chunked")
CUDNN_FIRST = ("cudnn", "flash", "efficient", "math", "chunked")


# ------------------------------------------------------------------------------------------ the rule's fields
def test_rule_matches_causal_dtype_and_entry() -> None:
    rule = _rule(FLASH_FIRST)
    assert rule.matches(H200, SPEC)
    assert not rule.matches(H200, SPEC, entry="packed")  # a dense rule: not for the packed kernel
    assert rule.matches(H200, AttentionSpec(**{**SPEC.__dict__, "causal": "bottom_right"}))  # either corner
    assert not rule.matches(H200, AttentionSpec(**{**SPEC.__dict__, "causal": None}))
    assert not rule.matches(H200, AttentionSpec(**{**SPEC.__dict__, "dtype": torch.float16}))
    packed = _rule(FLASH_FIRST, entry="packed")
    assert packed.matches(H200, SPEC, entry="packed") and not packed.matches(H200, SPEC)
    assert packed.describe() == ("packed, bfloat16, head dim 65-128, Sq 257-1024, Sk 257-1024, forward only, no GQA, "
                                 "causal")
    assert RankingRule("cuda", FLASH_FIRST, "x", causal=False).shape_class  # causal alone is a class
    # the built-in rules are unchanged: no causal or dtype condition, dense calls
    from sdpa_flash._ranking import RANKING

    assert all(r.causal is None and r.dtype is None and r.entry == "dense" and not r.failed for r in RANKING)


# --------------------------------------------------------------------------------------- on the CPU, end to end
def test_tune_on_the_cpu_writes_a_table_that_auto_then_uses(tune_dir: pathlib.Path) -> None:
    lines: list[str] = []
    table = sdpa_flash.tune(configs=TINY, rounds=2, device="cpu", progress=lines.append)
    assert table.path is not None and pathlib.Path(table.path).parent == tune_dir
    assert pathlib.Path(table.path).name == table_filename(table.key)
    assert table.run["mode"] == "model" and table.run["rounds"] == 2 and table.run["seed"] is None
    assert table.run["command"].startswith("sdpa_flash.tune(configs=")
    assert len(lines) == 2 and len(table.rules) == 2  # one class per configuration

    back = read_table(table.path)  # what was written reads back, field for field
    assert back.to_dict() == table.to_dict()
    measured = [r for r in back.measurements if r["status"] == "measured"]
    assert {r["backend"] for r in measured} == {"flash", "math", "chunked"}  # every backend the CPU has
    for r in measured:
        assert len(r["samples_ms"]) in (2, 6)  # 2 rounds; 6 where a near tie was timed again (below)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["first_call_s"] is not None  # timed on its own, before the rounds
    refused = {r["backend"]: r["reason"] for r in back.measurements if r["status"] == "refused"}
    assert "not available on device type 'cpu'" in refused["cudnn"]
    for rule, why in zip(back.rules, back.refused, strict=True):
        assert rule.order[0] == "flash"  # the fused kernel first (math and chunked are not fused)
        assert set(rule.order) == {"flash", "math", "chunked"} and set(why) == {"fa4", "cudnn", "efficient"}
        assert rule.evidence.startswith("tuned ") and " ms" in rule.evidence

    # the planner uses it: the first configuration's class, on this CPU
    caps = sdpa_flash.capabilities("cpu")
    q = torch.randn(3, 2, 100, 16)
    rule, source = ranking_source(caps, sdpa_flash.explain(q, q, q, causal=True).spec)
    assert rule == back.rules[0] and source.startswith(f"tuned table {table.path} (measured on this machine")
    text = sdpa_flash.explain(q, q, q, causal=True).explain()
    assert f"table:   tuned table {table.path}" in text and back.rules[0].evidence in text
    # a call of a class the table did not measure: the built-in rules
    q = torch.randn(1, 2, 2000, 16)
    assert "table:   built-in rules" in sdpa_flash.explain(q, q, q).explain()


def test_a_near_tie_is_timed_again_and_ranked_on_all_its_samples(tune_dir: pathlib.Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The two fastest within ``CLOSE``: those two (only) are timed again for twice the rounds, and the class is
    ranked on all their samples. The timings are made up here (``interleave`` replaced); the loop is real."""
    from sdpa_flash.bench._timing import Stats
    from sdpa_flash.tuning import _measure

    runs: list[tuple[list[str], int]] = []
    first = {"flash": 1.00, "math": 1.02, "chunked": 3.0}  # flash and math 2% apart
    again = {"flash": 1.01, "math": 1.00}  # the second look puts math ahead

    def fake(items: list[Any], device: torch.device, settings: Any, **kw: Any) -> dict[str, Stats]:
        keys = [str(i.key) for i in items]
        runs.append((keys, settings.rounds))
        times = first if len(runs) == 1 else again
        return {k: Stats((times[k],) * settings.rounds, 1) for k in keys}

    monkeypatch.setattr(_measure, "interleave", fake)
    table = sdpa_flash.tune(configs=TINY[:1], rounds=2, device="cpu", write=False)
    assert runs == [(["flash", "math", "chunked"], 2), (["flash", "math"], 4)]
    rows = {r["backend"]: r for r in table.measurements if r["status"] == "measured"}
    assert rows["flash"]["samples_ms"] == [1.00, 1.00] + [1.01] * 4 and rows["flash"]["median_ms"] == 1.01
    assert rows["math"]["samples_ms"] == [1.02, 1.02] + [1.00] * 4 and rows["math"]["median_ms"] == 1.00
    assert len(rows["chunked"]["samples_ms"]) == 2
    (rule,) = table.rules
    assert "math and flash within 1.0% over 6 and 6 rounds" in rule.evidence
    assert rule.order[:2] == ("flash", "math")  # the fused kernel still first (math is not fused)

    runs.clear()
    first, again = {"flash": 1.00, "math": 1.04, "chunked": 3.0}, {}  # 4% apart: one look decides
    table = sdpa_flash.tune(configs=TINY[:1], rounds=2, device="cpu", write=False)
    assert runs == [(["flash", "math", "chunked"], 2)] and "within" not in table.rules[0].evidence


def test_model_mode_measures_exactly_the_configurations(tune_dir: pathlib.Path) -> None:
    classes = from_configs(TINY, sdpa_flash.capabilities("cpu"))
    assert [(c.batch, c.heads, c.kv_heads, c.sq, c.d, c.dtype, c.training) for c in classes] == [
        (16, 2, 2, 64, 16, torch.float32, False), (1, 4, 2, 300, 32, torch.float32, True)]
    assert classes[1].gqa and classes[1].causal is None
    table = sdpa_flash.tune(configs=[*TINY, {"heads": 2, "head_dim": 16, "seqlen": 64, "varlen": True}], rounds=1,
                            device="cpu", write=False)
    assert table.path is None and not list(tune_dir.parent.glob("tuned/*"))  # write=False writes nothing
    assert [(r.head_dim, r.seqlen_q, r.training, r.gqa, r.causal, r.aligned) for r in table.rules] == [
        ((1, 32), (33, 256), False, False, True, None), ((1, 32), (257, 1024), True, True, False, False)]
    # the packed configuration: no backend has a packed kernel on a CPU, skipped with every reason, no rule
    (skipped, reasons), = table.skipped.items()
    assert skipped.startswith("packed, float32") and "CUDA only" in reasons["flash"]


class _PackedCpu(sdpa_flash.Backend):
    """A plug-in with a packed (cu_seqlens) kernel on the CPU (per-sequence SDPA): what the packed classes measure
    on a GPU (flash's and FA4's packed kernels), here where none of the built-in backends has one."""

    name = "packedcpu"
    VARLEN = True
    REQUIREMENTS: ClassVar[dict[str, sdpa_flash.Requirements]] = {
        "cpu": sdpa_flash.Requirements(dtypes=frozenset((torch.float32, torch.float64)))}

    def kernel(self, device_type: str, *, traced: bool = False) -> Any:
        return lambda c: F.scaled_dot_product_attention(c.q, c.k, c.v, is_causal=bool(c.causal), scale=c.scale)

    def varlen(self) -> Any:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                max_q: int, max_k: int, dropout_p: float, causal: bool, scale: float | None) -> torch.Tensor:
            outs = []
            for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(),
                                  strict=True):  # equal query and key lengths here: either causal corner
                qs, ks, vs = (t.transpose(0, 1) for t in (q[a:b], k[c:d], v[c:d]))
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
            return torch.cat(outs)

        return run


class _Broken(sdpa_flash.Backend):
    """A plug-in whose kernel raises, as a JIT compile error would."""

    name = "broken"
    REQUIREMENTS: ClassVar[dict[str, sdpa_flash.Requirements]] = {
        "cpu": sdpa_flash.Requirements(dtypes=frozenset((torch.float32,)))}

    def kernel(self, device_type: str, *, traced: bool = False) -> Any:
        def fail(c: sdpa_flash.KernelCall) -> torch.Tensor:
            raise RuntimeError("no kernel for this tile")

        return fail


def test_packed_kernels_and_failures_are_measured(tune_dir: pathlib.Path) -> None:
    sdpa_flash.register_backend(_PackedCpu(), before="flash")
    sdpa_flash.register_backend(_Broken(), before="flash")
    try:
        packed_cfg = {"heads": 2, "head_dim": 16, "seqlen": 64, "causal": True, "varlen": True}
        table = sdpa_flash.tune(configs=[packed_cfg, TINY[0]], rounds=2, device="cpu")
        packed, dense = table.rules
        assert packed.entry == "packed" and packed.order[0] == "packedcpu" and not table.skipped
        rows = {(r["entry"], r["backend"]): r for r in table.measurements}
        measured = rows["packed", "packedcpu"]
        assert measured["lengths"] == [64, 33] and measured["training"] and len(measured["samples_ms"]) == 2
        assert rows["packed", "flash"]["reason"] == "the flash varlen kernel is CUDA only (this is cpu)"
        assert rows["packed", "broken"]["reason"] == "has no packed (cu_seqlens) kernel"
        # the plug-in that raised: recorded with its error, ranked after every backend that ran
        assert rows["dense", "broken"]["status"] == "failed"
        assert dict(dense.failed) == {"broken": "RuntimeError: no kernel for this tile"}
        # (the two that ran, in the order this machine measured: which is faster is not the test's business)
        assert set(dense.order[:2]) == {"packedcpu", "flash"} and "failed: broken (RuntimeError)" in dense.evidence
        assert dense.order.index("broken") > 1

        caps = sdpa_flash.capabilities("cpu")
        q = torch.randn(16, 2, 64, 16)
        auto = sdpa_flash.explain(q, q, q, causal=True)
        # auto runs what this machine measured fastest (either of the two that ran); the one that raised says why
        assert auto.backend == dense.order[0] and "RuntimeError: no kernel for this tile" in auto.reasons["broken"][0]
        p = sdpa_flash.explain(q, q, q, causal=True, policy=["broken", "flash"])  # even where a policy names it
        assert p.backend == "flash"
        assert p.reasons["broken"][0].startswith("raised on this class of calls when tuned: RuntimeError: no kernel "
                                                 f"for this tile [tuned table {table.path}")
        spec = AttentionSpec("cpu", torch.float32, 1, 2, 2, 64, 64, 16, 16, "bottom_right", needs_grad=True)
        p = plan(spec, caps, entry="packed")  # the packed kernel the ragged batch would run, by the packed rule
        assert p.backend == "packedcpu" and p.evidence.startswith(packed.describe())
    finally:
        sdpa_flash.unregister_backend("broken")
        sdpa_flash.unregister_backend("packedcpu")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(AttentionInputError, match="among heads, kv_heads"):
        sdpa_flash.tune(configs=[{"heads": 2, "head_dim": 16, "seq": 64}], write=False)
    with pytest.raises(AttentionInputError, match="either quick=True or configs"):
        sdpa_flash.tune(quick=True, configs=TINY, write=False)
    with pytest.raises(AttentionInputError, match="rounds"):
        sdpa_flash.tune(rounds=0, write=False)
    with pytest.raises(AttentionInputError, match="dtype"):
        from_configs([{"heads": 2, "head_dim": 16, "dtype": "int8"}], H200)


def test_command_line_tune_quick(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "cpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "SDPA_FLASH_TUNE_DIR": str(tmp_path / "dir")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    proc = subprocess.run([sys.executable, "-m", "sdpa_flash", "tune", "--quick", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = read_table(out)
    assert table.run["command"] == f"python -m sdpa_flash tune --quick --rounds 1 --out {out}"
    assert table.run["mode"] == "quick" and table.rules
    assert f"wrote {out}: {len(table.rules)} rules" in proc.stdout
    assert "skipped 1 classes that no backend can run here" in proc.stdout  # the packed class, said, not silent
    assert "the flash varlen kernel is CUDA only" in proc.stdout
    assert "not in force here" in proc.stdout and f"SDPA_FLASH_TABLE={out}" in proc.stdout


# --------------------------------------------------------------------------------------------------- the grids
def test_grids_cover_their_classes_and_seeds_move_the_points() -> None:
    quick, full = grid(H200, quick=True), grid(H200, quick=False)
    # FA4 compiles per class: --quick stays small (19 classes took 94 s on an H100)
    assert 10 <= len(quick) <= 20 and {c.dtype for c in quick} == {torch.bfloat16}
    assert {c.dtype for c in full} == {torch.bfloat16, torch.float16} and len(full) > 2 * len(quick)
    assert any(c.entry == "packed" for c in quick) and any(c.sq == 1 for c in quick)
    cpu = grid(sdpa_flash.capabilities("cpu"), quick=False)
    assert all(c.dtype == torch.float32 and c.sq <= 512 and c.sk <= 512 for c in cpu)
    assert [c.sq for c in quick[:4]] == [128, 512, 2048, 4096]  # no seed: each class's usual shape
    a, b = grid(H200, quick=True, seed=1), grid(H200, quick=True, seed=2)
    assert [c.key for c in a] == [c.key for c in quick] == [c.key for c in b]  # the same classes ...
    assert [(c.sq, c.d) for c in a] != [(c.sq, c.d) for c in b]  # ... measured at other points
    assert [(c.sq, c.d) for c in a] == [(c.sq, c.d) for c in grid(H200, quick=True, seed=1)]
    for seed in range(40):  # every drawn shape is a valid call: whole GQA groups at any drawn head dim
        assert all(c.heads % c.kv_heads == 0 for c in grid(H200, quick=False, seed=seed))
    for c in a + b:
        hd, sq, sk = c.ranges
        assert hd[0] <= max(c.d, c.dv) <= hd[1] and sq[0] <= c.sq <= sq[1] and sk[0] <= c.sk <= sk[1]
        assert c.aligned is None or c.aligned == (c.sk % 128 == 0)
    for g in (quick, full, a, b):  # without causal masking, a class at a multiple of 128 and one beside it
        twins: dict[tuple[object, ...], list[bool]] = {}
        for c in g:
            if c.aligned is not None:
                twins.setdefault(c.key[:-1], []).append(c.aligned)
        short = [c.key[:-1] for c in g if c.aligned is not None and c.ranges[2][1] < 128]  # no multiple there
        assert all(sorted(v) == [False, True] or k in short for k, v in twins.items()), twins
        assert len(twins) >= 2
    for classes in (SEQLEN_CLASSES, HEAD_DIM_CLASSES):  # contiguous and covering
        assert classes[0][0] == 1 and classes[-1][1] == 2**31 - 1
        assert all(hi + 1 == lo for (_, hi), (lo, _) in itertools.pairwise(classes))


def test_a_run_can_be_limited_to_the_dtypes_a_model_uses(tmp_path: pathlib.Path) -> None:
    bf16 = grid(H200, quick=False, dtypes=(torch.bfloat16,))
    assert {c.dtype for c in bf16} == {torch.bfloat16} and len(bf16) * 2 == len(grid(H200, quick=False))
    table = sdpa_flash.tune(quick=True, device="cpu", rounds=1, dtypes=["fp64"], out=tmp_path / "t.json")
    assert table.measurements and all("float64" in m["class"] and "float32" not in m["class"]
                                      for m in table.measurements)
    assert "dtypes=['fp64']" in table.run["command"]
    for bad, match in ((["int8"], r"Expected dtypes\[0\] to be a float dtype"), ([], "at least one")):
        with pytest.raises(sdpa_flash.AttentionInputError, match=match):
            sdpa_flash.tune(quick=True, device="cpu", dtypes=bad, write=False)
    with pytest.raises(sdpa_flash.AttentionInputError, match="either dtypes"):
        sdpa_flash.tune(configs=[{"heads": 2, "head_dim": 8, "seqlen": 8}], device="cpu", dtypes=["float32"],
                        write=False)


# -------------------------------------------------------------------------------------------- which table
def test_precedence_user_then_shipped_then_builtin(tune_dir: pathlib.Path) -> None:
    user = _table_for(H200, _rule(FLASH_FIRST))
    other_class = _rule(("efficient", "cudnn", "flash", "math", "chunked"), seqlen_q=(2049, 8192),
                        seqlen_k=(2049, 8192), evidence="tuned 2026-12-01: efficient 1 ms at (4, 16, 4096, 128)")
    shipped = _table_for(H200, _rule(CUDNN_FIRST), other_class, torch="2.11.0")
    user_path = _write(user, tune_dir)
    shipped_path = _write(shipped, tune_dir.parent / "shipped")

    p = plan(SPEC, H200)  # (a) this machine's table
    assert p.backend == "flash" and p.order[0] == "flash"
    assert p.ranking_source.startswith(f"tuned table {user_path}")
    long = AttentionSpec(**{**SPEC.__dict__, "seqlen_q": 4096, "seqlen_k": 4096})
    p = plan(long, H200)  # (b) a class only the shipped table measured, with the versions that differ
    assert p.backend == "efficient" and "efficient 1 ms" in p.evidence
    assert p.ranking_source == (f"shipped table sdpa_flash/tables/{shipped_path.name} (NVIDIA H200, quick run of "
                                "2026-12-07; measured with torch 2.11.0, this is 2.13.0)")
    assert "table:   shipped table sdpa_flash/tables/" in p.explain()
    short = AttentionSpec(**{**SPEC.__dict__, "seqlen_q": 100, "seqlen_k": 100})
    rule, source = ranking_source(H200, short)  # (c) neither: the built-in rules
    assert source == "built-in rules (sdpa_flash/_ranking.py)" and rule.evidence.startswith("H200, bf16")
    assert ranking(H200).evidence == ranking_source(H200)[0].evidence  # no call: the device's general rule
    user_path.unlink()
    _caches.clear_all()
    assert plan(SPEC, H200).order[0] == "cudnn"  # the shipped table, once this machine's is gone
    # another GPU of the same architecture takes neither table
    assert ranking_source(H100, SPEC)[1] == "built-in rules (sdpa_flash/_ranking.py)"


def test_non_causal_classes_are_apart_by_key_alignment(tune_dir: pathlib.Path) -> None:
    """cuDNN's non-causal forward ran key lengths off a multiple of 128 ~9% slower than FA4 (H100), the multiples
    about as fast: tables rank the two apart, through the file, and explain() says which one decided."""
    caps = Capabilities.synthetic("cuda", (9, 0), name="NVIDIA H200", torch_version="2.13.0",
                                  kernels={"fa4": "4.0.0b40"})
    even = _rule(CUDNN_FIRST, causal=False, aligned=True, evidence="tuned 2026-12-07: cudnn 0.84 ms at 4096")
    odd = _rule(("fa4", *CUDNN_FIRST), causal=False, aligned=False, evidence="tuned 2026-12-07: fa4 0.63 ms at 4088")
    path = _write(_table_for(caps, even, odd), tune_dir)
    assert [(r.aligned, r.order[0]) for r in read_table(path).rules] == [(True, "cudnn"), (False, "fa4")]
    for sk, first in ((512, "cudnn"), (1024, "cudnn"), (504, "fa4"), (1000, "fa4")):
        spec = AttentionSpec(**{**SPEC.__dict__, "causal": None, "seqlen_k": sk})
        p = plan(spec, caps)
        assert p.order[0] == first, (sk, p.order)
        assert ("Sk a multiple of 128" if first == "cudnn" else "Sk not a multiple of 128") in p.explain()
    # causal calls: neither rule (the causal class is not split)
    assert ranking_source(caps, SPEC)[1] == "built-in rules (sdpa_flash/_ranking.py)"
    assert odd.describe().endswith("Sk 257-1024, Sk not a multiple of 128, forward only, no GQA, not causal")


def test_packed_calls_have_their_own_rules(tune_dir: pathlib.Path) -> None:
    caps = Capabilities.synthetic("cuda", (9, 0), name="NVIDIA H200", torch_version="2.13.0",
                                  kernels={"fa4": "4.0.0b36"})
    packed = _rule(("flash", "fa4", "cudnn", "efficient", "math", "chunked"), entry="packed",
                   evidence="tuned 2026-12-07: flash 0.5 ms, fa4 0.6 ms at packed 8 sequences")
    _write(_table_for(caps, _rule(("fa4", *CUDNN_FIRST)), packed), tune_dir)
    spec = AttentionSpec(**{**SPEC.__dict__, "batch": 1, "causal": "bottom_right"})
    p = plan(spec, caps, entry="packed")
    assert p.backend == "flash" and "flash 0.5 ms" in p.evidence and p.ranking_source.startswith("tuned table")
    assert plan(spec, caps).backend == "fa4"  # the dense rule for a dense call
    # a packed class the table did not measure: ranked as a dense call of its longest sequence (the built-in rules)
    longer = AttentionSpec(**{**spec.__dict__, "seqlen_q": 4096, "seqlen_k": 4096})
    assert ranking(caps, longer, entry="packed") == ranking(caps, longer)


def test_a_backend_that_failed_when_tuned_is_refused_there(tune_dir: pathlib.Path) -> None:
    failed = _rule(FLASH_FIRST, failed=(("flash", "RuntimeError: no kernel image for this tile"),))
    path = _write(_table_for(H200, failed), tune_dir)
    p = plan(SPEC, H200)
    assert p.backend == "cudnn"
    assert p.reasons["flash"][0] == ("raised on this class of calls when tuned: RuntimeError: no kernel image for "
                                     f"this tile [tuned table {path} (measured on this machine, quick run of "
                                     "2026-12-07)]")
    with pytest.raises(BackendUnavailableError, match="no kernel image for this tile"):
        plan(SPEC, H200, sdpa_flash.policy.resolve_policy("flash"))
    other = AttentionSpec(**{**SPEC.__dict__, "dtype": torch.float16})  # another class: not affected
    assert plan(other, H200, sdpa_flash.policy.resolve_policy("flash")).backend == "flash"


# --------------------------------------------------------------------------------------------- rejections
def _one_warning(caps: Capabilities, spec: AttentionSpec, match: str) -> None:
    """Planning warns once about the file (again after the caches are cleared: still once) and uses the built-in
    rules."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            assert ranking_source(caps, spec)[1] == "built-in rules (sdpa_flash/_ranking.py)"
            _caches.clear_all()
    ours = [w for w in seen if issubclass(w.category, TunedTableWarning)]
    assert len(ours) == 1, [str(w.message) for w in seen]
    assert match in str(ours[0].message), str(ours[0].message)


def test_corrupt_json_is_ignored_with_one_warning(tune_dir: pathlib.Path) -> None:
    path = _write(_table_for(H200, _rule(FLASH_FIRST)), tune_dir)
    path.write_text(path.read_text()[:200])  # truncated
    _one_warning(H200, SPEC, "not valid JSON")


def test_another_format_is_ignored_with_one_warning(tune_dir: pathlib.Path) -> None:
    path = _write(_table_for(H200, _rule(FLASH_FIRST)), tune_dir)
    data = json.loads(path.read_text())
    data["format"] = FORMAT + 1  # a table of a later sdpa_flash
    path.write_text(json.dumps(data))
    _one_warning(H200, SPEC, f"format {FORMAT + 1}, but this sdpa_flash reads formats 1, 2")


def test_a_format_1_table_still_reads(tune_dir: pathlib.Path) -> None:
    """Format 2 added ``aligned``; a format-1 table (no such field) reads with each rule covering both kinds of key
    length, and a format-1 table that has the field is refused, naming it."""
    path = _write(_table_for(H200, _rule(FLASH_FIRST)), tune_dir)
    data = json.loads(path.read_text())
    data["format"] = 1
    for rule in data["rules"]:
        del rule["aligned"]
    path.write_text(json.dumps(data))
    (rule,) = read_table(path).rules
    assert rule.aligned is None and plan(SPEC, H200).order[0] == "flash"
    data["rules"][0]["aligned"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(TunedTableError, match="'aligned'"):
        read_table(path)


def test_a_table_of_another_gpu_is_ignored_with_one_warning(tune_dir: pathlib.Path) -> None:
    foreign = _table_for(H100, _rule(FLASH_FIRST))
    _write(foreign, tune_dir, table_filename(machine_key(H200)))  # named for this GPU, keyed for another
    _one_warning(H200, SPEC, "measured on NVIDIA H100 80GB HBM3 (compute capability 9.0), this is NVIDIA H200")


def test_a_stale_table_is_ignored_with_one_warning_and_reported(tune_dir: pathlib.Path) -> None:
    stale = _table_for(H200, _rule(FLASH_FIRST), torch="2.11.0", cudnn="9.10.2")
    path = _write(stale, tune_dir)
    _one_warning(H200, SPEC, "it is stale (measured with torch 2.11.0, this is 2.13.0; measured with cuDNN 9.10.2, "
                             "this is 9.19.0); `python -m sdpa_flash tune` measures this machine again")
    assert tables_for(H200).stale == ((str(path), "measured with torch 2.11.0, this is 2.13.0; measured with cuDNN "
                                                  "9.10.2, this is 9.19.0"),)


def test_report_names_the_table_in_force_and_a_stale_one(tune_dir: pathlib.Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    caps = sdpa_flash.capabilities("cpu")
    assert report("cpu", check=False)["tuned_table"]["in_force"] == "built-in rules (sdpa_flash/_ranking.py)"
    rule = RankingRule("cpu", ("flash", "math", "chunked"), "tuned by hand", head_dim=(1, 64), dtype=torch.float32)
    old = "2.10.0" if caps.torch_version != "2.10.0" else "2.9.0"  # (not this torch, whichever CI runs)
    path = _write(_table_for(caps, rule, torch=old), tune_dir)
    _caches.clear_all()
    with pytest.warns(TunedTableWarning, match="stale"):
        tuned = report("cpu", check=False)["tuned_table"]
    assert tuned["path"] is None and tuned["stale"] == [
        {"path": str(path), "why": f"measured with torch {old}, this is {caps.torch_version}"}]
    assert main(["--device", "cpu", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert (f"  stale, ignored: {path}: measured with torch {old}, this is {caps.torch_version}; "
            "`python -m sdpa_flash tune` refreshes it") in out
    fresh = _write(_table_for(caps, rule), tune_dir)
    _caches.clear_all()
    tuned = report("cpu", check=False)["tuned_table"]
    assert tuned["path"] == str(fresh) and tuned["rules"] == 1 and tuned["in_force"].startswith("tuned table")


def test_forced_table_and_constructed_profiles(tune_dir: pathlib.Path, tmp_path: pathlib.Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    forced = _write(_table_for(H200, _rule(FLASH_FIRST)), tmp_path, "anywhere.json")
    monkeypatch.setenv(_table.ENV_TABLE, str(forced))
    _caches.clear_all()
    assert ranking_source(H200, SPEC)[1].startswith(f"tuned table {forced}")
    # a constructed profile never reads the default cache directory, only one named explicitly
    monkeypatch.delenv(_table.ENV_TABLE)
    monkeypatch.delenv(_table.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _write(_table_for(H200, _rule(FLASH_FIRST)), tmp_path / "xdg" / "sdpa_flash" / "tuned")
    _caches.clear_all()
    assert ranking_source(H200, SPEC)[1] == "built-in rules (sdpa_flash/_ranking.py)"
    assert _table.default_dir() == tmp_path / "xdg" / "sdpa_flash" / "tuned"  # where a probed device looks


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.update(extra=1), r"keys of the file to be among format, key, run, rules, measurements.*'extra'"),
    (lambda d: d["key"].pop("torch"), r"key\.torch to be present"),
    (lambda d: d["key"].update(cudnn="9.19"), r"key\.cudnn to be null or a release such as '9\.19\.0'"),
    (lambda d: d["run"].update(mode="fast"), r"run\.mode to be one of quick, full, model"),
    (lambda d: d["run"].update(date="yesterday"), r"run\.date to be an ISO 8601 date"),
    (lambda d: d["rules"][0].update(order=["flash", "warp"]), r"a backend of rules\[0\]\.order to be one of"),
    (lambda d: d["rules"][0].update(order=[]), r"rules\[0\]\.order to be a non-empty list"),
    (lambda d: d["rules"][0].update(seqlen_q=[300, 200]), r"rules\[0\]\.seqlen_q to be null or \[low, high\]"),
    (lambda d: d["rules"][0].update(dtype="int8"), r"rules\[0\]\.dtype to be one of"),
    (lambda d: d["rules"][0].update(entry="ragged"), r"rules\[0\]\.entry to be one of dense, packed"),
    (lambda d: d["rules"][0].update(device_type="cpu"), r"rules\[0\]\.device_type to be the key's 'cuda'"),
    (lambda d: d["rules"][0].update(causal="yes"), r"rules\[0\]\.causal to be true or false or null"),
    (lambda d: d["rules"][0].update(failed={"flash": ""}), r"rules\[0\]\.failed\.flash to be a non-empty string"),
    (lambda d: d["measurements"][0].update(median_ms=-1.0), r"measurements\[0\]\.median_ms to be a finite number"),
    (lambda d: d["measurements"][0].update(status="ok"), r"measurements\[0\]\.status to be one of"),
    (lambda d: d["measurements"][0].update(samples_ms=None), r"measurements\[0\]\.samples_ms to be a non-empty"),
])
def test_validation_names_the_field(edit: Any, match: str) -> None:
    data = _table_for(H200, _rule(FLASH_FIRST)).to_dict()
    TunedTable.from_dict(data)  # valid as built
    edit(data)
    with pytest.raises(TunedTableError, match=match):
        TunedTable.from_dict(data, path="t.json")


def test_writes_are_atomic_and_leave_nothing_behind(tmp_path: pathlib.Path) -> None:
    table = _table_for(H200, _rule(FLASH_FIRST))
    path = tmp_path / "sub" / "t.json"
    assert table.write(path).path == str(path)
    with pytest.raises(TunedTableError, match="order"):  # the writer validates: a bad table never reaches the disk
        TunedTable(table.key, table.run, (_rule(("flash", "flash")),), ({},), ()).write(path)
    assert read_table(path).to_dict() == table.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temporary file left


def test_shipped_tables_are_valid() -> None:
    """Every table shipped in sdpa_flash/tables/ (package data) reads, keyed for a GPU, named as the writer names
    it; the directory explains what they are."""
    shipped = ROOT / "sdpa_flash" / "tables"
    assert "python -m sdpa_flash tune" in (shipped / "README.md").read_text()
    for path in shipped.glob("*.json"):
        table = read_table(path)
        assert table.key["device_type"] == "cuda" and path.name.startswith(table_filename(table.key)[:-16])
    assert 'tables/*.json' in (ROOT / "pyproject.toml").read_text()


# -------------------------------------------------------------------------------------------- processes
_WORKER = """
import json, os, pathlib, sys, time
import torch
import sdpa_flash
from sdpa_flash import _caches
from sdpa_flash.tuning import tables_for

ready, done, others = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), [pathlib.Path(p) for p in sys.argv[3:]]
while not ready.exists():  # the reader is reading
    time.sleep(0.05)
table = sdpa_flash.tune(configs=[{"heads": 2, "head_dim": 16, "seqlen": 64, "causal": True, "training": False}],
                        rounds=1, device="cpu")
for _ in range(30):  # rewrite it, for the reader to catch a partial file if there could be one
    table.write(table.path)
done.touch()
while not all(p.exists() for p in others):
    time.sleep(0.05)
_caches.clear_all()
t = tables_for(sdpa_flash.capabilities("cpu")).user
q = torch.randn(2, 2, 64, 16)
print(json.dumps({"path": t.path, "date": t.run["date"], "evidence": [r.evidence for r in t.rules],
                  "backend": sdpa_flash.explain(q, q, q, causal=True).backend}))
"""

_READER = """
import pathlib, sys, time
from sdpa_flash.tuning import read_table

ready, directory = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
markers = [pathlib.Path(p) for p in sys.argv[3:]]
reads = 0
ready.touch()
while not all(p.exists() for p in markers):
    for path in directory.glob("*.json"):
        read_table(path)  # raises on a partial file
        reads += 1
print(reads)
"""


def test_concurrent_tuners_and_readers_end_with_one_valid_table(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "tuned"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "SDPA_FLASH_TUNE_DIR": str(directory)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    marks = [tmp_path / "a.done", tmp_path / "b.done"]

    def start(*args: object) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", *map(str, args)], env=env, cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    ready = tmp_path / "reader.ready"
    reader = start(_READER, ready, directory, *marks)
    workers = [start(_WORKER, ready, marks[0], marks[1]), start(_WORKER, ready, marks[1], marks[0])]
    results = [p.communicate(timeout=240) for p in (*workers, reader)]
    for p, (out, err) in zip((*workers, reader), results, strict=True):
        assert p.returncode == 0, out + err
    assert int(results[2][0]) > 0  # the reader read while the tables were being written
    a, b = (json.loads(out) for out, _ in results[:2])
    assert a == b  # both processes end with the same table and the same choice
    files = sorted(p.name for p in directory.iterdir())
    assert files == [pathlib.Path(a["path"]).name]  # one table, no temporary file left
    assert [r.evidence for r in read_table(a["path"]).rules] == a["evidence"] and a["backend"] == "flash"
