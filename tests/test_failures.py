"""A kernel that fails at its first call (a JIT compile error, an unsupported tile): recorded as a reason, ``auto``
moves on once with one warning, strict policies raise the kernel's message (sdpa_flash/_failures.py)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch

import sdpa_flash
from sdpa_flash import Backend, KernelCall, KernelFailedError, Requirements
from sdpa_flash._failures import forget_failures, recorded_failures
from sdpa_flash.errors import BackendUnavailableError
from sdpa_flash.testing import reference_attention

JIT_ERROR = "DSLRuntimeError: cannot build a 128x96 tile for this configuration"


class Failing(Backend):
    """Fails with ``error`` on the calls numbered in ``fail_on`` (1-based), else computes attention exactly."""

    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {"cpu": Requirements(dtypes=frozenset({torch.float32}))}

    def __init__(self, name: str, error: BaseException, fail_on: tuple[int, ...] = (1,)) -> None:
        self.name = name
        self.error, self.fail_on, self.calls = error, fail_on, 0

    def kernel(self, device_type: str, *, traced: bool = False) -> Any:
        def run(c: KernelCall) -> torch.Tensor:
            self.calls += 1
            if self.calls in self.fail_on:
                raise self.error
            scale = c.scale if c.scale is not None else c.q.shape[-1] ** -0.5
            return torch.softmax((c.q @ c.k.transpose(-1, -2)) * scale, -1) @ c.v

        return run


@pytest.fixture
def plug() -> Iterator[Any]:
    names: list[str] = []

    def register(backend: Failing, before: str = "flash") -> Failing:
        sdpa_flash.register_backend(backend, before=before)
        names.append(backend.name)
        return backend

    forget_failures()
    yield register
    for name in names:
        sdpa_flash.unregister_backend(name)
    forget_failures()


def qkv(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 2, 24, 16, generator=torch.Generator().manual_seed(batch))


def test_auto_moves_on_once_with_one_warning_and_the_reason_is_explained(plug: Any) -> None:
    bad = plug(Failing("jit", RuntimeError(JIT_ERROR)))
    q = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sdpa_flash.attention(q, q, q)
        again = sdpa_flash.attention(q, q, q)
        other_batch = sdpa_flash.attention(qkv(3), qkv(3), qkv(3))  # same class: not tried again
    assert bad.calls == 1
    failed = [str(w.message) for w in caught if "failed at its first call" in str(w.message)
              and "ran the call instead" in str(w.message)]
    assert len(failed) == 1, failed
    assert JIT_ERROR in failed[0] and "jit kernel" in failed[0]
    torch.testing.assert_close(out, reference_attention(q, q, q).to(out.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out)
    assert other_batch.shape == (3, 2, 24, 16)
    plan = sdpa_flash.explain(q, q, q)
    assert plan.backend != "jit"
    assert any(JIT_ERROR in r for r in plan.reasons["jit"]), plan.explain()
    assert len(recorded_failures()) == 1


def test_a_failure_after_the_first_call_is_the_callers_not_a_refusal(plug: Any) -> None:
    bad = plug(Failing("later", RuntimeError("device-side failure"), fail_on=(2,)))
    q = qkv()
    sdpa_flash.attention(q, q, q)
    with pytest.raises(RuntimeError, match="device-side failure") as info:
        sdpa_flash.attention(q, q, q)
    assert not isinstance(info.value, KernelFailedError)
    assert bad.calls == 2 and not recorded_failures()


@pytest.mark.parametrize("kind", ["one-backend", "fallback-error"])
def test_strict_policies_raise_the_kernels_message(plug: Any, kind: str) -> None:
    bad = plug(Failing("strict", RuntimeError(JIT_ERROR), fail_on=(1, 2)))
    policy: Any = "strict" if kind == "one-backend" else sdpa_flash.Policy("custom", ("strict", "math"),
                                                                           fallback="error")
    q = qkv()
    with pytest.raises(KernelFailedError, match="DSLRuntimeError: cannot build") as info:
        sdpa_flash.attention(q, q, q, policy=policy)
    assert isinstance(info.value.__cause__, RuntimeError) and info.value.backend == "strict"
    assert "policy='auto'" in str(info.value)
    assert bad.calls == 1 and not recorded_failures()  # nothing recorded: the next call tries it again
    with pytest.raises(KernelFailedError):
        sdpa_flash.attention(q, q, q, policy=policy)
    assert bad.calls == 2


def test_when_the_next_backend_fails_too_the_error_names_both(plug: Any) -> None:
    plug(Failing("first", RuntimeError("first kernel: no tile")), before="flash")
    plug(Failing("second", RuntimeError("second kernel: no image")), before="flash")
    q = qkv()
    with pytest.raises(KernelFailedError, match="second kernel: no image") as info:
        sdpa_flash.attention(q, q, q)
    assert "first kernel: no tile" in str(info.value)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory")],
                         ids=["cuda-oom", "cpu-oom"])
def test_running_out_of_memory_is_not_a_refusal(plug: Any, error: BaseException) -> None:
    plug(Failing("hungry", error))
    q = qkv()
    with pytest.raises(type(error)):
        sdpa_flash.attention(q, q, q)
    assert not recorded_failures()


def test_a_strict_policy_after_a_recorded_failure_gives_the_reason(plug: Any) -> None:
    plug(Failing("once", RuntimeError(JIT_ERROR)))
    q = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdpa_flash.attention(q, q, q)
    with pytest.raises(BackendUnavailableError, match="failed at its first call in this process"):
        sdpa_flash.attention(q, q, q, policy="once")
    forget_failures()
    sdpa_flash.attention(q, q, q, policy="once")  # forgotten: tried again (and runs: it fails only once)


# ------------------------------------------------------------------------------------------------- packed
class PackedFailing(Backend):
    """A packed (cu_seqlens) kernel on the CPU that fails on the calls numbered in ``fail_on`` (per-sequence SDPA
    otherwise), ranked first: what FA4's packed kernel is on a GPU."""

    VARLEN = True
    REQUIREMENTS: ClassVar[dict[str, Requirements]] = {"cpu": Requirements(dtypes=frozenset({torch.float32}))}

    def __init__(self, name: str, fail_on: tuple[int, ...] = (1,)) -> None:
        self.name, self.fail_on, self.calls = name, fail_on, 0

    def kernel(self, device_type: str, *, traced: bool = False) -> Any:
        return lambda c: torch.nn.functional.scaled_dot_product_attention(c.q, c.k, c.v, is_causal=bool(c.causal))

    def varlen(self) -> Any:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                max_q: int, max_k: int, dropout_p: float, causal: bool, scale: float | None) -> torch.Tensor:
            self.calls += 1
            if self.calls in self.fail_on:
                raise RuntimeError(JIT_ERROR)
            outs = []
            for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
                qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
                outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                            .transpose(0, 1))
            return torch.cat(outs)

        return run


def _packed_batch() -> Any:
    from sdpa_flash import varlen

    g = torch.Generator().manual_seed(0)
    return varlen.pack([torch.randn(n, 2, 16, generator=g) for n in (40, 7, 23)])


@pytest.fixture
def packed_first(plug: Any) -> Iterator[Any]:
    """Register ``PackedFailing(name)`` and make the CPU's cost model take one packed call by it for any batch."""
    from varlen_cost import cost_model, force_packed  # tests/ is on sys.path

    with contextlib.ExitStack() as stack:
        def register(name: str) -> PackedFailing:
            stack.enter_context(cost_model("cpu", force_packed("cpu", name)))
            backend: PackedFailing = plug(PackedFailing(name), before="flash")
            return backend

        yield register


def test_a_packed_kernel_that_fails_at_its_first_call_is_rerouted_once(packed_first: Any) -> None:
    from sdpa_flash import varlen

    bad = packed_first("packedjit")
    x = _packed_batch()
    assert varlen.explain_varlen(x, x, x, causal=True).varlen_backend == "packedjit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = varlen.varlen_attention(x, x, x, causal=True)
        again = varlen.varlen_attention(x, x, x, causal=True)
    assert bad.calls == 1
    said = [str(w.message) for w in caught if "packed kernel failed at its first call" in str(w.message)]
    assert len(said) == 1 and JIT_ERROR in said[0], [str(w.message) for w in caught]
    for got in (out, again):
        for o, seq in zip(got.unpack(), x.unpack(), strict=True):
            s = seq.transpose(0, 1)
            want = reference_attention(s, s, s, causal=True).transpose(0, 1)
            torch.testing.assert_close(o, want.to(o.dtype), rtol=1e-5, atol=1e-5)
    plan = varlen.explain_varlen(x, x, x, causal=True)
    assert plan.varlen_backend != "packedjit"
    assert any(name == "packedjit (packed)" for name, _ in recorded_failures())


def test_a_packed_kernel_failure_under_a_strict_policy_raises_the_kernels_message(packed_first: Any) -> None:
    from sdpa_flash import varlen

    packed_first("packedstrict")
    x = _packed_batch()
    with pytest.raises(KernelFailedError, match="DSLRuntimeError") as info:
        varlen.varlen_attention(x, x, x, causal=True, policy="packedstrict")
    assert info.value.backend == "packedstrict" and not recorded_failures()
