"""A user's own kernel through register_backend(): planned, ranked, explained, refused with reasons, property-tested,
shadow-checked, denylisted and compiled like a built-in backend (the example plug-in, on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sdpa_flash
from sdpa_flash.testing import (
    assert_close_to_reference,
    attention_outputs,
    attention_problems,
    ran_backends,
)


def _load_example() -> Any:
    """The example as an importable module (torch.compile looks its functions up in sys.modules)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "plugin_backend.py"
    spec = importlib.util.spec_from_file_location("sdpa_flash_plugin_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


EXAMPLE = _load_example()
EinsumBackend: Any = EXAMPLE.EinsumBackend
CPU = sdpa_flash.Capabilities.synthetic("cpu")


@pytest.fixture
def einsum() -> Iterator[Any]:
    backend = EinsumBackend()
    sdpa_flash.register_backend(backend)
    try:
        yield backend
    finally:
        sdpa_flash.unregister_backend("einsum")


def _spec(**kw: Any) -> sdpa_flash.AttentionSpec:
    base: dict[str, Any] = {"device_type": "cpu", "dtype": torch.float32, "batch": 1, "heads_q": 4, "heads_kv": 4,
                            "seqlen_q": 64, "seqlen_k": 64, "head_dim": 32, "head_dim_v": 32}
    return sdpa_flash.AttentionSpec(**{**base, **kw})


def test_the_example_runs_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    result = EXAMPLE.main([])
    assert result["backend"] == "einsum" and max(result["usage"]) <= 1.0
    out = capsys.readouterr().out
    assert "adapted: head dim zero-padded 36->40" in out and "K/V repeated 4x for GQA" in out
    assert "dropout refused: dropout_p > 0 is not supported" in out
    assert "einsum" not in sdpa_flash.backends.BACKENDS


def test_a_plug_in_is_a_policy_name_and_is_explained(einsum: Any) -> None:
    q = torch.randn(1, 4, 24, 20)
    plan = sdpa_flash.explain(q, q, q, causal=True, policy="einsum")
    assert plan.backend == "einsum" and plan.route_reason == EinsumBackend.ROUTE_REASON
    assert "head dim zero-padded 20->24" in plan.notes
    assert str(plan).startswith("einsum via examples/plugin_backend.py")
    assert "einsum" in sdpa_flash.capabilities("cpu").backends


def test_ran_backends_sees_the_plug_in_by_its_profiler_names(einsum: Any) -> None:
    q = torch.randn(1, 4, 24, 16)
    assert ran_backends(lambda: sdpa_flash.attention(q, q, q, policy="einsum")) == {"einsum"}
    assert ran_backends(lambda: sdpa_flash.attention(q, q, q, policy="math")) == {"math"}


def test_what_the_kernel_cannot_do_is_refused_with_its_reason(einsum: Any) -> None:
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(sdpa_flash.BackendUnavailableError,
                       match=r"`einsum` is not supported because:\n +- dropout_p > 0 is not supported"):
        sdpa_flash.attention(q, q, q, dropout_p=0.5, policy="einsum")
    half = sdpa_flash.Capabilities.synthetic("cuda", (9, 0))  # no CUDA requirement other than the CPU's: same data
    assert sdpa_flash.backends.get_backend("einsum").not_supported_reasons(_spec(device_type="cuda"), half) == []


def test_auto_ranks_it_where_it_asked(einsum: Any) -> None:
    # Default: after the built-in fused kernels, before the math reference.
    assert sdpa_flash.plan(_spec(), CPU).order == ("flash", "einsum", "math", "chunked")
    # Where the fused kernel cannot run (CPU flash takes no dropout), auto reaches the plug-in before math.
    assert sdpa_flash.plan(_spec(dropout=True), sdpa_flash.capabilities("cpu")).backend == "math"  # einsum: no dropout
    assert sdpa_flash.plan(_spec(head_dim_v=16), sdpa_flash.capabilities("cpu")).backend == "einsum"
    sdpa_flash.register_backend(EinsumBackend(), before="flash", replace=True)
    assert sdpa_flash.plan(_spec(), sdpa_flash.capabilities("cpu")).order[:2] == ("einsum", "flash")
    # It is not fused: policy "fused" never takes it.
    assert "einsum" not in sdpa_flash.plan(_spec(), CPU, sdpa_flash.Policy("fused")).order


def test_unregister_forgets_every_plan(einsum: Any) -> None:
    q = torch.randn(1, 2, 16, 8)
    sdpa_flash.attention(q, q, q, policy=["einsum", "math"])
    sdpa_flash.unregister_backend("einsum")
    with pytest.raises(sdpa_flash.AttentionInputError, match="Expected policy"):
        sdpa_flash.attention(q, q, q, policy=["einsum", "math"])
    sdpa_flash.register_backend(EinsumBackend())  # (the fixture unregisters it)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_plug_in_matches_float64_math(data: st.DataObject) -> None:
    sdpa_flash.register_backend(EinsumBackend(), replace=True)  # (the strategy plans with it: drawn inside)
    try:
        problem = data.draw(attention_problems("einsum", backward=True, max_seqlen=40, max_head_dim=24))
        assert_close_to_reference(attention_outputs(problem, policy="einsum"), problem)
    finally:
        sdpa_flash.unregister_backend("einsum")


def test_shadow_check_catches_a_wrong_plug_in() -> None:
    class Broken(EinsumBackend):  # type: ignore[misc,valid-type]
        def kernel(self, device_type: str, *, traced: bool = False) -> Any:
            inner = super().kernel(device_type, traced=traced)
            return lambda call: inner(call) * 1.01

    sdpa_flash.register_backend(Broken())
    try:
        q = torch.randn(1, 2, 32, 8)
        with pytest.raises(sdpa_flash.ShadowMismatchError, match="einsum"), \
                sdpa_flash.use_policy("einsum", shadow=1, shadow_action="raise"):
            sdpa_flash.attention(q, q, q)
    finally:
        sdpa_flash.unregister_backend("einsum")


def test_denylist_entries_veto_a_plug_in(einsum: Any) -> None:
    entry = sdpa_flash.DenylistEntry("einsum", "wrong at head dim 8 (example)", device_type="cpu",
                                     when=lambda s: s.head_dim == 8)
    sdpa_flash.add_denylist_entry(entry)
    try:
        assert sdpa_flash.plan(_spec(head_dim=8, head_dim_v=8), CPU, sdpa_flash.Policy("custom", ("einsum", "math"),
                                                                                         fallback="silent")
                               ).backend == "math"
    finally:
        sdpa_flash.remove_denylist_entry(entry)
    with pytest.raises(sdpa_flash.AttentionInputError, match="kernel= is for backends installed as their own"):
        sdpa_flash.DenylistEntry("einsum", "x", kernel="<2")


def test_compiled_calls_reach_the_plug_in(einsum: Any) -> None:
    q = torch.randn(1, 2, 16, 12)

    @torch.compile(backend="eager", fullgraph=True)
    def f(q: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, q, q, causal=True, policy="einsum")

    torch._dynamo.reset()
    ref = sdpa_flash.attention(q, q, q, causal=True, policy="math")
    torch.testing.assert_close(f(q), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"backend": object()}, "Expected an instance of a sdpa_flash.backends.Backend subclass"),
    ({"backend": "name:cudnn"}, "is a built-in backend"),
    ({"backend": "name:auto"}, "lower-case identifier other than auto, fused, custom"),
    ({"backend": "name:Einsum"}, "lower-case identifier"),
    ({"backend": "einsum", "before": "nope"}, "Expected before= to name a registered backend"),
    ({"backend": "requirements:none"}, "REQUIREMENTS to be a non-empty dict"),
])
def test_register_backend_refuses_bad_input(kwargs: dict[str, Any], match: str) -> None:
    spec = kwargs.pop("backend")
    if isinstance(spec, str) and spec.startswith("name:"):
        backend = type("B", (EinsumBackend,), {"name": spec[5:]})()
    elif spec == "requirements:none":
        backend = type("B", (EinsumBackend,), {"name": "other", "REQUIREMENTS": {}})()
    elif spec == "einsum":
        backend = EinsumBackend()
    else:
        backend = spec
    with pytest.raises(sdpa_flash.AttentionInputError, match=match):
        sdpa_flash.register_backend(backend, **kwargs)
    assert "einsum" not in sdpa_flash.backends.BACKENDS and "other" not in sdpa_flash.backends.BACKENDS


def test_registering_twice_needs_replace(einsum: Any) -> None:
    with pytest.raises(sdpa_flash.AttentionInputError, match="registered already"):
        sdpa_flash.register_backend(EinsumBackend())
    with pytest.raises(sdpa_flash.AttentionInputError, match="added with register_backend"):
        sdpa_flash.unregister_backend("flash")


def test_no_warning_for_a_plugin_under_a_custom_policy_first(einsum: Any) -> None:
    q = torch.randn(1, 2, 16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdpa_flash.attention(q, q, q, policy=["einsum", "flash"])


def test_the_bench_compares_a_plug_in(einsum: Any, tmp_path: Path) -> None:
    from sdpa_flash.bench import CATALOGUE, catalogue, main

    assert "attention(einsum)" in [p.name for p in catalogue()]
    assert "attention(einsum)" not in [p.name for p in CATALOGUE]  # the built-in list stays as it was
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--shape", "1x2x64x16", "--paths", "einsum,attention(math)", "--dtype", "fp32",
                 "--modes", "fwd", "--rounds", "2", "--json", str(out), "--quiet"]) == 0
    rows = {r["path"]: r for r in json.loads(out.read_text())["sections"][0]["rows"]}
    assert rows["attention(einsum)"]["backend"] == "einsum" and rows["attention(einsum)"]["status"] == "ok"
    assert rows["attention(einsum)"]["ms"] > 0
