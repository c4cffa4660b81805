"""Shadow checking (``Policy(shadow=N)``, ``SDPA_FLASH_SHADOW=N``): 1 in N calls of each kind is compared with the
float32 math reference on a sample of rows; mismatches are recorded in ``stats().shadow`` and warned about once,
raised, or only recorded. Off by default, and then the per-call path is exactly the one without it."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator

import pytest
import torch

import sdpa_flash
from sdpa_flash import Policy, ShadowMismatchError
from sdpa_flash.backends import BACKENDS
from sdpa_flash.policy import resolve_policy

_attention_module = sys.modules["sdpa_flash._dense"]  # the per-call cache lives in the dense call


@pytest.fixture(autouse=True)
def fresh_stats() -> Iterator[None]:
    sdpa_flash.reset_stats()
    yield
    sdpa_flash.reset_stats()


def qkv(b: int = 2, hq: int = 4, hkv: int = 2, sq: int = 16, sk: int = 16, d: int = 8,
        dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g).to(dtype), torch.randn(b, hkv, sk, d, generator=g).to(dtype),
            torch.randn(b, hkv, sk, d, generator=g).to(dtype))


@pytest.fixture
def broken_chunked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The chunked backend made wrong by 0.25 in every output element (a stand-in for a broken kernel)."""
    backend = BACKENDS["chunked"]
    runner = type(backend).runner

    def bad_runner(self, spec, prep):  # type: ignore[no-untyped-def]
        good = runner(self, spec, prep)
        return lambda q, k, v, m, p, s: good(q, k, v, m, p, s) + 0.25

    monkeypatch.setattr(type(backend), "runner", bad_runner)
    _attention_module._cache.clear()
    yield
    _attention_module._cache.clear()


def test_off_by_default_and_the_fast_path_is_unchanged() -> None:
    assert Policy().shadow == 0 and sdpa_flash.get_policy().shadow == 0
    q, k, v = qkv(d=17)  # a shape no other test uses
    for _ in range(3):
        sdpa_flash.attention(q, k, v)
    assert sdpa_flash.stats().shadow.checks == 0
    runners = [e[0] for e in _attention_module._cache.values()]
    assert runners and not any(r.__name__ == "run_shadowed" for r in runners)


def test_one_in_n_calls_is_checked() -> None:
    q, k, v = qkv()
    pol = resolve_policy("auto", shadow=3)
    for _ in range(9):
        sdpa_flash.attention(q, k, v, policy=pol)
    s = sdpa_flash.stats().shadow
    assert s.checks == 3 and s.mismatches == ()
    assert "shadow=1/3" in str(pol)


def test_one_in_n_calls_across_shapes() -> None:
    # Ragged batches make a new kind of call per step; the count is per backend, so they are not all checked.
    pol = resolve_policy("auto", shadow=4)
    for sq in range(16, 24):  # 16+ keys: CPU flash runs (fewer, unmasked, go to math: pytorch/pytorch#141128)
        q, k, v = qkv(sq=sq, sk=sq)
        sdpa_flash.attention(q, k, v, policy=pol)
    assert sdpa_flash.stats().shadow.checks == 2


SHAPES = ({}, {"hkv": 1}, {"sq": 5, "sk": 23}, {"sq": 1, "sk": 40}, {"sq": 23, "sk": 5})  # MHA, MQA, cross
CASES = [(c, m) for c in (False, True, "bottom_right") for m in (None, "bool", "float")]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["f16", "bf16", "f32", "f64"])
@pytest.mark.parametrize("backend", ["flash", "chunked"])
def test_correct_backends_pass(backend: str, dtype: torch.dtype, case: int) -> None:
    """No false alarms: the real CPU kernels pass on every kind of call, including rows that see no key (each
    causal kind and mask kind, with shapes and layouts taken in turn)."""
    causal, mask = CASES[case]
    shape, layout = SHAPES[case % len(SHAPES)], ("bhsd", "bshd")[case % 2]
    q, k, v = qkv(dtype=dtype, **shape)
    sq, sk = q.shape[2], k.shape[2]
    g = torch.Generator().manual_seed(1)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(2, 1, sq, sk, generator=g) < 0.6
    elif mask == "float":
        attn_mask = torch.randn(sq, sk, generator=g).to(dtype).masked_fill(torch.rand(sq, sk, generator=g) < 0.3,
                                                                            float("-inf"))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    pol = resolve_policy(backend, shadow=1, shadow_action="raise")
    for _ in range(4):  # each check samples other rows
        sdpa_flash.attention(q, k, v, attn_mask=attn_mask, causal=causal, layout=layout, policy=pol)
    assert sdpa_flash.stats().shadow.checks == 4


@pytest.mark.usefixtures("broken_chunked")
def test_a_wrong_backend_is_recorded_and_warned_about_once() -> None:
    q, k, v = qkv()
    pol = resolve_policy("chunked", shadow=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            sdpa_flash.attention(q, k, v, policy=pol)
    shadow_warnings = [w for w in caught if "shadow check" in str(w.message)]
    assert len(shadow_warnings) == 1 and shadow_warnings[0].filename == __file__
    assert "the chunked backend's output differs from the float32 math reference by 0.25" in str(
        shadow_warnings[0].message)
    s = sdpa_flash.stats().shadow
    (m,) = s.mismatches
    assert (m.backend, m.count, m.checks, s.checks) == ("chunked", 3, 3, 3)
    assert m.worst_error == pytest.approx(0.25, rel=1e-3) and m.bound < 1e-3
    assert m.inputs.startswith("query (2, 4, 16, 8), key (2, 2, 16, 8)")
    assert "shadow mismatch chunked x3/3" in str(sdpa_flash.stats())


@pytest.mark.usefixtures("broken_chunked")
def test_raise_and_record_actions() -> None:
    q, k, v = qkv()
    with pytest.raises(ShadowMismatchError, match="differs from the float32 math reference") as info:
        sdpa_flash.attention(q, k, v, policy=resolve_policy("chunked", shadow=1, shadow_action="raise"))
    assert info.value.backend == "chunked" and info.value.error == pytest.approx(0.25, rel=1e-3)
    assert isinstance(info.value, sdpa_flash.SdpaFlashError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdpa_flash.attention(q, k, v, policy=resolve_policy("chunked", shadow=1, shadow_action="record"))
    assert sum(m.count for m in sdpa_flash.stats().shadow.mismatches) == 2


def _misread(t: torch.Tensor) -> torch.Tensor:
    """``t`` read as a kernel that assumes a contiguous layout reads it: the same storage walked with the strides of a
    contiguous tensor of ``t``'s shape (wrong whenever ``t`` is not contiguous)."""
    return t.as_strided(t.shape, torch.empty(t.shape).stride(), t.storage_offset())


def test_catches_a_kernel_that_misreads_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flash kernel that ignores the key's strides (the class of bug the check exists for), injected: the library's
    copy of a head dim with stride != 1 is undone, and the kernel reads the key as if it were contiguous. Whether
    the installed torch's own kernel still has such a bug does not matter."""
    monkeypatch.setattr(_attention_module, "_needs_copy", lambda backend, device_type, *t: (False,) * len(t))
    backend = BACKENDS["flash"]
    runner = type(backend).runner

    def misreading_runner(self, spec, prep):  # type: ignore[no-untyped-def]
        good = runner(self, spec, prep)
        return lambda q, k, v, m, p, s: good(q, _misread(k), v, m, p, s)

    monkeypatch.setattr(type(backend), "runner", misreading_runner)
    _attention_module._cache.clear()
    q, _, v = qkv(hkv=4)
    k = torch.randn(2, 4, 8, 16).transpose(-1, -2)  # (2, 4, 16, 8), head dim at stride 16
    assert not k.is_contiguous()
    sdpa_flash.attention(q, k, v, policy=resolve_policy("flash", shadow=1, shadow_action="record"))
    (m,) = sdpa_flash.stats().shadow.mismatches
    assert m.backend == "flash" and m.worst_error > 100 * m.bound
    _attention_module._cache.clear()
    monkeypatch.undo()
    sdpa_flash.reset_stats()
    sdpa_flash.attention(q, k, v, policy=resolve_policy("flash", shadow=1, shadow_action="raise"))  # the real one
    assert sdpa_flash.stats().shadow.checks == 1 and not sdpa_flash.stats().shadow.mismatches
    _attention_module._cache.clear()


def test_catches_a_kernel_that_masks_a_nan_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that answers 0 for a query row with a NaN (what PyTorch's CPU flash kernel does for short key
    blocks, pytorch/pytorch#141128), injected into the chunked backend: the
    reference row is NaN, so the check reports an infinite error at that row. Every row is sampled here (1 batch,
    1 head, 4 rows)."""
    backend = BACKENDS["chunked"]
    runner = type(backend).runner

    def zeroing_runner(self, spec, prep):  # type: ignore[no-untyped-def]
        good = runner(self, spec, prep)

        def run(q, k, v, m, p, s):  # type: ignore[no-untyped-def]
            out = good(q, k, v, m, p, s)
            return out.masked_fill(out.isnan().any(-1, keepdim=True), 0.0)

        return run

    monkeypatch.setattr(type(backend), "runner", zeroing_runner)
    _attention_module._cache.clear()
    q, k, v = qkv(b=1, hq=1, hkv=1, sq=4, sk=4)
    q[0, 0, 2, 0] = float("nan")
    sdpa_flash.attention(q, k, v, policy=resolve_policy("chunked", shadow=1, shadow_action="record"))
    (m,) = sdpa_flash.stats().shadow.mismatches
    assert m.backend == "chunked" and m.worst_error == float("inf") and m.worst_index[:3] == (0, 0, 2)
    _attention_module._cache.clear()


def test_works_with_autograd_and_leaves_gradients_alone() -> None:
    q, k, v = (t.requires_grad_() for t in qkv())
    out = sdpa_flash.attention(q, k, v, causal=True, policy=resolve_policy("flash", shadow=1, shadow_action="raise"))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = sdpa_flash.attention(*leaves, causal=True, policy="flash")
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)
    assert sdpa_flash.stats().shadow.checks == 1


def test_skipped_under_torch_compile() -> None:
    q, k, v = qkv()
    pol = resolve_policy("flash", shadow=1, shadow_action="raise")

    def fn(x: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(x, k, v, policy=pol)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(out, sdpa_flash.attention(q, k, v, policy="flash"))
    assert sdpa_flash.stats().shadow.checks == 0


def test_policy_field_hash_environment_and_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Policy(shadow=2) != Policy() and hash(Policy(shadow=2)) != hash(Policy())
    assert hash(Policy(shadow=2, shadow_action="raise")) != hash(Policy(shadow=2))
    assert resolve_policy("auto", shadow="2") is resolve_policy("auto", shadow=2)  # interned
    assert resolve_policy(Policy(), shadow=0) == Policy()
    monkeypatch.setenv("SDPA_FLASH_SHADOW", "5")
    monkeypatch.setenv("SDPA_FLASH_SHADOW_ACTION", "record")
    monkeypatch.setattr(sdpa_flash.policy, "_env_policy", None)
    pol = sdpa_flash.get_policy()
    assert (pol.shadow, pol.shadow_action) == (5, "record")
    monkeypatch.setattr(sdpa_flash.policy, "_env_policy", None)
    monkeypatch.delenv("SDPA_FLASH_SHADOW")
    monkeypatch.delenv("SDPA_FLASH_SHADOW_ACTION")
    q, k, v = qkv()
    with sdpa_flash.use_policy("auto", shadow=2) as block:
        assert block.shadow == 2
        for _ in range(4):
            sdpa_flash.attention(q, k, v)
    assert sdpa_flash.stats().shadow.checks == 2
    monkeypatch.setattr(sdpa_flash.policy, "_env_policy", None)
