"""Bad input: every class of invalid argument raises ``AttentionInputError`` (a ``ValueError``) with a message
naming the problem, from ``attention()`` and from ``explain()`` alike, and no bad call poisons the per-call
cache that ``attention()`` keeps.

Two tables, one row per class of bad input (add rows as new entry points arrive: varlen, the flash-attn API):
``BAD`` for the arguments of ``attention()`` / ``explain()``, ``BAD_ELSEWHERE`` for policies, the environment,
``require()``, the denylist, ``plan()`` and ``sdpa_flash.testing`` (``CLI_BAD`` for ``python -m sdpa_flash``).
Then the inputs that look odd but are valid — empty problems, strided and overlapping tensors, masks of any
broadcastable rank — which must give the math reference's answer on every CPU backend."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import sdpa_flash
from sdpa_flash import AttentionInputError
from sdpa_flash.testing import reference_attention

B, H, S, D = 2, 4, 16, 16  # 16 keys: CPU flash takes unmasked calls (fewer are denylisted: pytorch/pytorch#141128)


def qkv(b: int = B, hq: int = H, hkv: int = H, sq: int = S, sk: int = S, d: int = D, dv: int = D,
        dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, sk, dv, generator=gen, dtype=dtype))


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _with(**kwargs: Any) -> Callable[[], Call]:
    return lambda: (qkv(), kwargs)


def _args(make: Callable[[], tuple[Any, Any, Any]], **kwargs: Any) -> Callable[[], Call]:
    return lambda: (make(), kwargs)


def _mixed() -> tuple[Any, Any, Any]:
    q, k, v = qkv()
    return q, k.double(), v.double()


# id -> (builder of (args, kwargs), regex the message must match)
BAD: dict[str, tuple[Callable[[], Call], str]] = {
    "query-not-tensor": (_args(lambda: (qkv()[0].tolist(), *qkv()[1:])),
                         r"Expected query to be a torch\.Tensor, but got list"),
    "key-not-tensor": (_args(lambda: (qkv()[0], None, qkv()[2])),
                       r"Expected key to be a torch\.Tensor, but got NoneType"),
    "rank-3": (_args(lambda: (qkv()[0][0], *qkv()[1:])), r"Expected query to be a 4-D tensor .* but got a 3-D tensor"),
    "rank-5": (_args(lambda: (qkv()[0].unsqueeze(0), *qkv()[1:])), r"to be a 4-D tensor .* but got a 5-D tensor"),
    "batch-mismatch": (_args(lambda: (qkv()[0], *qkv(b=3)[1:])), r"one batch size, but got 2, 3, 3"),
    "kv-heads-mismatch": (_args(lambda: (*qkv()[:2], qkv(hkv=2)[2])),
                          r"key and value to have the same number of heads, but got 4 and 2"),
    "kv-seqlen-mismatch": (_args(lambda: (*qkv()[:2], qkv(sk=5)[2])),
                           rf"key and value to have the same sequence length, but got {S} and 5"),
    "qk-head-dim-mismatch": (_args(lambda: (qkv()[0], *qkv(d=8)[1:])),
                             r"query and key to have the same head dim, but got 16 and 8"),
    "zero-head-dim": (_args(lambda: qkv(d=0, dv=0)), r"Expected non-zero head dims"),
    "zero-value-head-dim": (_args(lambda: qkv(dv=0)), r"Expected non-zero head dims.* value head dim 0"),
    "gqa-not-integral": (_args(lambda: qkv(hq=6, hkv=4)),
                         r"query heads \(6\) to be a multiple of the key/value heads \(4\)"),
    "integer-dtype": (_args(lambda: tuple(t.to(torch.int64) for t in qkv())),
                      r"Expected query to be a floating-point tensor .* dtype=int64"),
    "mixed-dtypes": (_args(_mixed), r"one dtype, but got float32, float64, float64"),
    "bad-layout": (_with(layout="bsdh"), r"Expected layout to be 'bhsd' .* got 'bsdh'"),
    "causal-sideways": (_with(causal="sideways"), r"Expected causal to be False, True, .* got 'sideways'"),
    "causal-2": (_with(causal=2), r"Expected causal to be .* but got 2 instead"),
    "dropout-negative": (_with(dropout_p=-0.1), r"Expected dropout_p to be a float in \[0, 1\), but got -0\.1"),
    "dropout-one": (_with(dropout_p=1.0), r"Expected dropout_p .* but got 1\.0"),
    "dropout-str": (_with(dropout_p="0.1"), r"Expected dropout_p .* but got '0\.1'"),
    "dropout-bool": (_with(dropout_p=True), r"Expected dropout_p .* but got True"),
    "scale-nan": (_with(scale=float("nan")), r"Expected scale to be None or a finite float, but got nan"),
    "scale-inf": (_with(scale=float("inf")), r"Expected scale to be None or a finite float, but got inf"),
    "scale-str": (_with(scale="0.3"), r"Expected scale to be None or a finite float"),
    "mask-int64": (_with(attn_mask=torch.ones(S, S, dtype=torch.int64)),
                   r"Expected attn_mask to be boolean or of the query's dtype float32, but got dtype=int64"),
    "mask-float64-for-float32": (_with(attn_mask=torch.zeros(S, S, dtype=torch.float64)),
                                 r"query's dtype float32, but got dtype=float64"),
    "mask-not-broadcastable": (_with(attn_mask=torch.ones(3, S, S, dtype=torch.bool)),
                               rf"Expected attn_mask to broadcast to \(B, Hq, Sq, Sk\) = \(2, 4, {S}, {S}\), "
                               rf".*\(3, {S}, {S}\)"),
    "mask-wrong-key-len": (_with(attn_mask=torch.ones(S, S + 1, dtype=torch.bool)),
                           rf"Expected attn_mask to broadcast .* \({S}, {S + 1}\)"),
    "mask-rank-5": (_with(attn_mask=torch.ones(1, 1, 1, S, S, dtype=torch.bool)), r"Expected attn_mask to broadcast"),
    "mask-not-tensor": (_with(attn_mask=[[True] * S] * S),
                        r"Expected attn_mask to be a torch\.Tensor or None, but got list"),
    "policy-unknown": (_with(policy="fastest"), r"Expected policy to be one of .* but got 'fastest'"),
    "policy-duplicate-str": (_with(policy="flash,flash"), r"Expected each backend at most once"),
    "policy-duplicate-tuple": (_with(policy=("flash", "math", "flash")), r"Expected each backend at most once"),
    "policy-not-str": (_with(policy=3), r"Expected policy to be a Policy, a policy name"),
    "policy-empty-str": (_with(policy=""), r"Expected policy to be one of .* but got '' instead"),
    "policy-list-with-int": (_with(policy=["flash", 3]), r"Expected policy to be a Policy.* got \['flash', 3\]"),
    "key-on-other-device": (_args(lambda: (qkv()[0], qkv()[1].to("meta"), qkv()[2].to("meta"))),
                            r"Expected query, key and value on one device, but got cpu, meta, meta instead"),
    "value-on-other-device": (_args(lambda: (*qkv()[:2], qkv()[2].to("meta"))),
                              r"on one device, but got cpu, cpu, meta instead"),
    "mask-on-other-device": (_with(attn_mask=torch.ones(S, S, dtype=torch.bool, device="meta")),
                             r"Expected attn_mask on cpu like the query, but got meta instead"),
    "complex-dtype": (_args(lambda: tuple(t.to(torch.complex64) for t in qkv())),
                      r"Expected query to be a floating-point tensor .* dtype=complex64"),
    "bool-dtype": (_args(lambda: tuple(t > 0 for t in qkv())), r"floating-point tensor .* dtype=bool instead"),
    "kv-heads-zero": (_args(lambda: (qkv()[0], *qkv(hkv=0)[1:])),
                      r"query heads \(4\) to be a multiple of the key/value heads \(0\)"),
    "dropout-nan": (_with(dropout_p=float("nan")), r"Expected dropout_p to be a float in \[0, 1\), but got nan"),
    "dropout-none": (_with(dropout_p=None), r"Expected dropout_p .* but got None instead"),
    "scale-tensor": (_with(scale=torch.tensor(0.5)), r"Expected scale to be None or a finite float, but got tensor"),
    "scale-complex": (_with(scale=1j), r"Expected scale to be None or a finite float, but got 1j"),
    "layout-none": (_with(layout=None), r"Expected layout to be 'bhsd' .* got None instead"),
    "causal-list": (_with(causal=[True]), r"Expected causal to be .* but got \[True\] instead"),
}


@pytest.mark.parametrize("build, match", BAD.values(), ids=BAD.keys())
def test_bad_input_raises(build: Callable[[], Call], match: str) -> None:
    args, kwargs = build()
    with pytest.raises(AttentionInputError, match=match) as info:
        sdpa_flash.attention(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, sdpa_flash.SdpaFlashError)
    with pytest.raises(AttentionInputError, match=match):
        sdpa_flash.explain(*args, **kwargs)
    # ... and the failed call left nothing behind: a valid call with the same shapes works and is right.
    q, k, v = qkv()
    torch.testing.assert_close(sdpa_flash.attention(q, k, v), reference_attention(q, k, v, dtype=None))


def test_policy_list_with_duplicate_explain() -> None:
    q, k, v = qkv()
    with pytest.raises(AttentionInputError, match=r"Expected each backend at most once .*\['flash', 'flash'\]"):
        sdpa_flash.explain(q, k, v, policy=["flash", "flash"])


def test_policy_list_with_duplicate_attention() -> None:
    q, k, v = qkv()
    with pytest.raises(AttentionInputError, match=r"Expected each backend at most once"):
        sdpa_flash.attention(q, k, v, policy=["flash", "flash"])


# --------------------------------------------------------------------------------- the cache stays clean
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("policy", ["auto", "math"])
@pytest.mark.parametrize("which", ["kv", "k", "v"])
def test_mixed_dtypes_raise_after_valid_call(which: str, policy: str, layout: str, grad: bool) -> None:
    """The fast path's cache key holds the query's properties only; mixed key/value dtypes must still raise."""
    q, k, v = qkv(hq=4, hkv=2, sq=6, sk=10)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    q.requires_grad_(grad)
    ok = sdpa_flash.attention(q, k, v, causal=True, layout=layout, policy=policy)  # fills the cache
    k2 = k.double() if which in ("kv", "k") else k
    v2 = v.double() if which in ("kv", "v") else v
    for _ in range(2):  # and the failure does not get cached as a success either
        with pytest.raises(AttentionInputError, match=r"Expected query, key and value to have one dtype"):
            sdpa_flash.attention(q, k2, v2, causal=True, layout=layout, policy=policy)
    torch.testing.assert_close(sdpa_flash.attention(q, k, v, causal=True, layout=layout, policy=policy), ok)


def test_valid_call_after_failures_with_same_shapes() -> None:
    q, k, v = qkv(seed=3)
    expected = reference_attention(q, k, v, causal=True, dtype=None)
    bad_calls: list[dict[str, Any]] = [
        {"causal": "sideways"}, {"dropout_p": 1.0}, {"scale": float("nan")}, {"layout": "bsdh"},
        {"attn_mask": torch.ones(S, S, dtype=torch.int64)}, {"policy": "fastest"},
    ]
    for kwargs in bad_calls:
        with pytest.raises(AttentionInputError):
            sdpa_flash.attention(q, k, v, **{"causal": True, **kwargs})
        torch.testing.assert_close(sdpa_flash.attention(q, k, v, causal=True), expected)
    with pytest.raises(AttentionInputError):
        sdpa_flash.attention(q, k.double(), v.double(), causal=True)
    torch.testing.assert_close(sdpa_flash.attention(q, k, v, causal=True), expected)
    assert sdpa_flash.explain(q, k, v, causal=True).backend == "flash"


# Validation must not depend on what was called before. The per-call cache is a dict keyed on the raw
# arguments, and Python's dict treats 1 == True == 1.0 and 0 == False == 0.0 as the same key; so these aliases
# are accepted as the numbers they equal (causal=1 is causal=True, dropout_p=False is 0.0, scale=True is 1.0),
# and a call gives the same result whether or not its alias is already cached.
# (canonical, alias, head dim): each case has a head dim no other test uses, so its cache starts cold.
HASH_ALIASES = {
    "causal-1-is-True": ({"causal": True}, {"causal": 1}, 20),
    "causal-0-is-False": ({"causal": False}, {"causal": 0}, 21),
    "dropout-False-is-0.0": ({"dropout_p": 0.0}, {"dropout_p": False}, 22),
    "scale-True-is-1.0": ({"scale": 1.0}, {"scale": True}, 23),
}


@pytest.mark.parametrize("order", ["alias-first", "canonical-first"])
@pytest.mark.parametrize("canonical, alias, d", HASH_ALIASES.values(), ids=HASH_ALIASES.keys())
def test_numeric_aliases_behave_alike_cold_and_cached(
    canonical: dict[str, Any], alias: dict[str, Any], d: int, order: str
) -> None:
    q, k, v = qkv(sq=7, sk=7, d=d, dv=d, seed=11 if order == "alias-first" else 12)
    calls = [alias, canonical] if order == "alias-first" else [canonical, alias]
    first, second = (sdpa_flash.attention(q, k, v, **kw) for kw in calls)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert sdpa_flash.explain(q, k, v, **alias).backend == sdpa_flash.explain(q, k, v, **canonical).backend


@pytest.mark.parametrize("sizes", [{"b": 0}, {"sk": 0}, {"sq": 0}], ids=["zero-batch", "zero-keys", "zero-queries"])
def test_mixed_dtypes_raise_after_valid_zero_size_call(sizes: dict[str, int]) -> None:
    """No kernel runs (or checks dtypes) on zero-size inputs, so the cache itself must tell the calls apart."""
    q, k, v = qkv(d=36, dv=36, **sizes)  # a shape no other test uses: the cache starts cold
    with pytest.raises(AttentionInputError, match="one dtype"):  # fresh
        sdpa_flash.attention(q, k.double(), v.double())
    sdpa_flash.attention(q, k, v)
    for _ in range(2):  # with the query's shape and dtype cached
        with pytest.raises(AttentionInputError, match="one dtype"):
            sdpa_flash.attention(q, k.double(), v.double())


# ------------------------------------------------------------------------ bad input beyond attention()
def _env(**env: str) -> Callable[[pytest.MonkeyPatch], Any]:
    """Set SDPA_FLASH_* variables, then read the environment's policy afresh."""

    def call(mp: pytest.MonkeyPatch) -> Any:
        for name in ("POLICY", "FALLBACK", "MEMORY_BUDGET", "SHADOW", "SHADOW_ACTION"):
            mp.delenv(f"SDPA_FLASH_{name}", raising=False)
        for name, value in env.items():
            mp.setenv(f"SDPA_FLASH_{name}", value)
        mp.setattr(sdpa_flash.policy, "_env_policy", None)
        return sdpa_flash.get_policy()

    return call


def _plain(fn: Callable[[], Any]) -> Callable[[pytest.MonkeyPatch], Any]:
    return lambda mp: fn()


def _problem(**kw: Any) -> Any:
    from sdpa_flash.testing import ProblemParams

    return ProblemParams(torch.float32, seqlen_q=4, seqlen_k=4, **kw).build()


_SPEC = sdpa_flash.AttentionSpec("cpu", torch.float32, 1, 2, 2, 8, 8, 16, 16, needs_grad=True)
_resolve = sdpa_flash.policy.resolve_policy
_Entry = sdpa_flash.DenylistEntry
BUE = sdpa_flash.BackendUnavailableError

# id -> (call(monkeypatch), the error type, regex the message must match)
BAD_ELSEWHERE: dict[str, tuple[Callable[[pytest.MonkeyPatch], Any], type[Exception], str]] = {
    # a backend that does not exist on this device: its reason, not a crash
    "policy-cudnn-on-cpu": (_plain(lambda: sdpa_flash.attention(*qkv(), policy="cudnn")), BUE,
                            r"`cudnn` is not supported because:\n\s+- not available on device type 'cpu'"),
    "policy-efficient-on-cpu": (_plain(lambda: sdpa_flash.explain(*qkv(), policy="efficient")), BUE,
                                r"`efficient` is not supported because:\n\s+- not available on device type 'cpu'"),
    "fused-dropout-on-cpu": (_plain(lambda: sdpa_flash.attention(*qkv(), dropout_p=0.1, policy="fused")), BUE,
                             r"`flash` is not supported because:\n\s+- dropout_p > 0 is not supported"),
    # policy options
    "fallback-unknown": (_plain(lambda: sdpa_flash.use_policy("auto", fallback="loud").__enter__()),
                         AttentionInputError, r"Expected fallback to be one of warn_once, error, silent, but got "
                                              r"'loud'"),
    "memory-budget-junk": (_plain(lambda: _resolve("auto", memory_budget="lots")), AttentionInputError,
                           r"Expected memory_budget to be a positive number of bytes .* but got 'lots' instead"),
    "memory-budget-negative": (_plain(lambda: _resolve("auto", memory_budget=-1)), AttentionInputError,
                               r"Expected memory_budget .* but got -1 instead"),
    "memory-budget-float": (_plain(lambda: _resolve("auto", memory_budget=1.5)), AttentionInputError,
                            r"Expected memory_budget .* but got 1\.5 instead"),
    "shadow-negative": (_plain(lambda: _resolve("auto", shadow=-1)), AttentionInputError,
                        r"Expected shadow .* whole number N >= 0 .* but got -1 instead"),
    "shadow-not-a-number": (_plain(lambda: sdpa_flash.set_policy("auto", shadow="often")), AttentionInputError,
                            r"Expected shadow .* but got 'often' instead"),
    "shadow-action-unknown": (_plain(lambda: _resolve("auto", shadow=10, shadow_action="explode")),
                              AttentionInputError, r"Expected shadow_action to be one of warn, raise, record, but got "
                                                   r"'explode'"),
    "Policy-unknown-name": (_plain(lambda: sdpa_flash.Policy("fastest")), AttentionInputError,
                            r"Expected Policy\.name to be one of .* but got 'fastest' instead"),
    "Policy-unknown-backend": (_plain(lambda: sdpa_flash.Policy("custom", ("flash", "tpu"))), AttentionInputError,
                               r"Expected Policy\.backends to be a tuple of backend names .* \('flash', 'tpu'\)"),
    "Policy-budget-str": (_plain(lambda: sdpa_flash.Policy(memory_budget="8GiB")), AttentionInputError,
                          r"Expected memory_budget to be None or a positive number of bytes, but got '8GiB'"),
    # the environment, parsed in one place: the message names the variable and its value
    "env-policy": (_env(POLICY="fastest"), AttentionInputError,
                   r"Invalid environment: SDPA_FLASH_POLICY='fastest'.*Expected policy .* but got 'fastest'"),
    "env-fallback": (_env(FALLBACK="loud"), AttentionInputError,
                     r"SDPA_FLASH_FALLBACK='loud'.*Expected fallback .* but got 'loud'"),
    "env-memory-budget": (_env(MEMORY_BUDGET="lots"), AttentionInputError,
                          r"SDPA_FLASH_MEMORY_BUDGET='lots'.*Expected memory_budget .* but got 'lots'"),
    "env-shadow": (_env(SHADOW="-3"), AttentionInputError, r"SDPA_FLASH_SHADOW='-3'.*Expected shadow .* got '-3'"),
    "env-shadow-action": (_env(SHADOW="10", SHADOW_ACTION="panic"), AttentionInputError,
                          r"SDPA_FLASH_SHADOW_ACTION='panic'.*Expected shadow_action .* but got 'panic'"),
    # require(): a startup check must fail on bad arguments as clearly as on a missing kernel
    "require-unknown-policy": (_plain(lambda: sdpa_flash.require("bogus")), AttentionInputError,
                               r"Expected policy to be one of .* but got 'bogus' instead"),
    "require-unknown-device": (_plain(lambda: sdpa_flash.require("auto", "tpu")), AttentionInputError,
                               r"Expected device to be a torch\.device, a device string .* but got 'tpu' instead"),
    "require-device-float": (_plain(lambda: sdpa_flash.require("auto", 1.5)), AttentionInputError,  # type: ignore[arg-type]
                             r"Expected device .* but got 1\.5 instead"),
    "require-integer-dtype": (_plain(lambda: sdpa_flash.require("math", "cpu", dtype=torch.int32)),
                              AttentionInputError, r"Expected dtype to be None or a floating-point torch\.dtype .* "
                                                   r"but got torch\.int32 instead"),
    "require-zero-head-dim": (_plain(lambda: sdpa_flash.require("math", "cpu", head_dim=0)), AttentionInputError,
                              r"Expected head_dim to be a positive int, but got 0 instead"),
    "require-kv-heads-not-divisor": (_plain(lambda: sdpa_flash.require("math", "cpu", heads=16, kv_heads=3)),
                                     AttentionInputError, r"Expected kv_heads .* divisor of heads=16 .* got 3"),
    "require-cudnn-on-cpu": (_plain(lambda: sdpa_flash.require("cudnn", "cpu")), BUE,
                             r"`cudnn` is not supported because:\n\s+- not available on device type 'cpu'"),
    # the denylist: a bad entry fails where it is written, not inside every later plan()
    "deny-unknown-backend": (_plain(lambda: sdpa_flash.add_denylist_entry(_Entry("fast", "x"))), AttentionInputError,
                             r"Expected DenylistEntry\.backend to be one of .* but got 'fast' instead"),
    "deny-bad-torch-specifier": (_plain(lambda: _Entry("math", "x", torch="<<2.5")), AttentionInputError,
                                 r"Expected DenylistEntry\.torch to be None or a PEP 440 .* but got '<<2\.5'"),
    "deny-cc-not-a-tuple": (_plain(lambda: _Entry("math", "x", min_cc="8.0")), AttentionInputError,  # type: ignore[arg-type]
                            r"Expected DenylistEntry\.min_cc to be None or a \(major, minor\) .* but got '8\.0'"),
    "deny-when-not-callable": (_plain(lambda: _Entry("math", "x", when=True)), AttentionInputError,  # type: ignore[arg-type]
                               r"Expected DenylistEntry\.when to be None or a callable .* but got True instead"),
    "deny-unknown-device-type": (_plain(lambda: _Entry("math", "x", device_type="gpu")), AttentionInputError,
                                 r"Expected DenylistEntry\.device_type to be a device type .* but got 'gpu'"),
    "deny-kernel-version-of-a-torch-backend": (_plain(lambda: _Entry("cudnn", "x", kernel="<4.1")), AttentionInputError,
                                               r"Expected DenylistEntry\.kernel to be None for 'cudnn', which is part "
                                               r"of torch \(kernel= is for backends installed as their own "
                                               r"package: fa4\), but got '<4\.1'"),
    "deny-bad-kernel-specifier": (_plain(lambda: _Entry("fa4", "x", kernel="4.0b")), AttentionInputError,
                                  r"Expected DenylistEntry\.kernel to be None or a PEP 440 .* but got '4\.0b'"),
    "deny-empty-reason": (_plain(lambda: _Entry("math", " ")), AttentionInputError,
                          r"Expected DenylistEntry\.reason to be a non-empty string, but got ' ' instead"),
    "deny-add-not-an-entry": (_plain(lambda: sdpa_flash.add_denylist_entry({"backend": "math"})),  # type: ignore[arg-type]
                              AttentionInputError, r"Expected a sdpa_flash\.DenylistEntry, but got dict instead"),
    "deny-remove-unknown": (_plain(lambda: sdpa_flash.remove_denylist_entry(_Entry("math", "never added"))),
                            AttentionInputError, r"Expected an entry added with add_denylist_entry\(\), but got"),
    # plan()
    "plan-deterministic-unknown": (_plain(lambda: sdpa_flash.plan(_SPEC, sdpa_flash.Capabilities.synthetic("cpu"),
                                                                  deterministic="sometimes")),
                                   AttentionInputError, r"Expected deterministic to be None or one of off, warn, "
                                                        r"error, but got 'sometimes' instead"),
    # sdpa_flash.testing (its errors are plain ValueError/TypeError; owned by the property tests)
    "testing-shape-mismatch": (_plain(lambda: sdpa_flash.testing.compare_to_reference(
        torch.zeros(2, 3), torch.zeros(3), torch.zeros(3))), ValueError,
        r"Expected out of shape \(3,\) like the reference, but got candidate \(2, 3\)"),
    "testing-backward-without-grad-out": (_plain(lambda: sdpa_flash.testing.attention_references(
        _problem(), backward=True)), ValueError, r"Expected a problem with grad_out"),
    "testing-profile-unknown": (lambda mp: (mp.setenv("SDPA_FLASH_HYPOTHESIS_PROFILE", "huge"),
                                            sdpa_flash.testing.property_profile()),
                                AttentionInputError, r"Expected SDPA_FLASH_HYPOTHESIS_PROFILE to be one of .* 'huge'"),
}


@pytest.mark.parametrize("call, error, match", BAD_ELSEWHERE.values(), ids=BAD_ELSEWHERE.keys())
def test_bad_input_elsewhere_raises(call: Callable[[pytest.MonkeyPatch], Any], error: type[Exception], match: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    saved = sdpa_flash.policy._process_policy
    try:
        with pytest.raises(error, match=match) as info:
            call(monkeypatch)
    finally:
        sdpa_flash.policy._process_policy = saved
    assert isinstance(info.value, (ValueError, TypeError, sdpa_flash.SdpaFlashError))
    if error is AttentionInputError:
        assert "Expected" in str(info.value)
    monkeypatch.undo()
    sdpa_flash.policy._env_policy = None
    q, k, v = qkv()  # nothing was left behind: a valid call still works
    torch.testing.assert_close(sdpa_flash.attention(q, k, v), reference_attention(q, k, v, dtype=None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_require_cuda_without_cuda() -> None:
    with pytest.raises(BUE, match=r"required on 'cuda:0'.*CUDA is not available to this PyTorch"):
        sdpa_flash.require("flash", "cuda:0")


# id -> (argv, exit status, regex for stderr)
CLI_BAD = {
    "require-unknown": (["--require", "bogus"], 2, r"Expected policy to be one of .* but got 'bogus' instead"),
    "device-unknown": (["--device", "tpu"], 2, r"--device: Expected device to be .* but got 'tpu' instead"),
    "device-index-only": (["--device", "1"], 2, r"Expected device .* but got '1' instead"),
    "require-missing-backend": (["--require", "cudnn", "--device", "cpu", "--no-check"], 1,
                                r"requirement 'cudnn' not met\n.*\n.*\n\s+`cudnn` is not supported because"),
}
if not torch.cuda.is_available():
    CLI_BAD["device-cuda-without-cuda"] = (["--device", "cuda", "--no-check"], 2,
                                           r"--device cuda: Expected a CUDA device, but CUDA is not available")


@pytest.mark.parametrize("argv, status, match", CLI_BAD.values(), ids=CLI_BAD.keys())
def test_cli_bad_arguments(argv: list[str], status: int, match: str, capsys: pytest.CaptureFixture[str]) -> None:
    from sdpa_flash.__main__ import main

    assert main(argv) == status
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err


# ------------------------------------------------------------------------ odd-looking inputs that are valid
CPU_POLICIES = ("flash", "math", "chunked")


STRIDED: dict[str, Callable[[], torch.Tensor]] = {
    "expanded-batch": lambda: torch.randn(1, H, S, D).expand(B, H, S, D),
    "expanded-zero-strides": lambda: torch.randn(1, 1, 1, D).expand(B, H, S, D),
    "expanded-last-dim": lambda: torch.randn(B, H, S, 1).expand(B, H, S, D),
    "last-dim-stride-2": lambda: torch.randn(B, H, S, 2 * D)[..., ::2],
    "transposed-last-dims": lambda: torch.randn(B, H, D, S).transpose(-1, -2),
    "bhsd-view-of-bshd": lambda: torch.randn(B, S, H, D).transpose(1, 2),
    "overlapping-rows": lambda: torch.randn(B * H * S + D).as_strided((B, H, S, D), (H * S, S, 1, 1)),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("policy", CPU_POLICIES)
@pytest.mark.parametrize("make", STRIDED.values(), ids=STRIDED.keys())
def test_strided_inputs_give_the_reference_answer(make: Callable[[], torch.Tensor], policy: str,
                                                  causal: bool) -> None:
    """Forward and backward on the strided tensors themselves (kept as they are by ``problem.leaves()``)."""
    import dataclasses

    from sdpa_flash.testing import ProblemParams, assert_close_to_reference, attention_outputs

    torch.manual_seed(0)
    q, k, v = make(), make(), make()
    params = ProblemParams(torch.float32, batch=B, heads_q=H, heads_kv=H, seqlen_q=S, seqlen_k=S, head_dim=D,
                           head_dim_v=D, causal=causal, backward=True)
    problem = dataclasses.replace(params.build(), query=q, key=k, value=v)
    assert problem.leaves()[1].stride() == k.stride()
    assert_close_to_reference(attention_outputs(problem, policy=policy), problem)


def test_strided_head_dim_is_copied_for_the_flash_kernel_and_explained() -> None:
    q, k, v = qkv()
    kt = torch.randn(B, H, D, S).transpose(-1, -2)  # head dim at stride S
    notes = sdpa_flash.explain(q, kt, v, policy="flash").notes
    assert any(n.startswith(f"key (strides {kt.stride()}) copied to contiguous memory first") for n in notes), notes
    # a query with another dim of stride 1: PyTorch allocates the output like it, so it is copied too
    qo = torch.randn(B * H * S + D).as_strided((B, H, S, D), (H * S, S, 1, 1))
    assert any(n.startswith(f"query (strides {qo.stride()}) copied") for n in sdpa_flash.explain(qo, k, v).notes)
    assert not any("copied" in n for n in sdpa_flash.explain(q, kt, v, policy="math").notes)  # math reads any strides
    assert not any("copied" in n for n in sdpa_flash.explain(q, k, v, policy="flash").notes)
    bshd = torch.randn(B, S, H, D).transpose(1, 2)  # stride 1 in the head dim: read in place, no note
    assert not any("copied" in n for n in sdpa_flash.explain(bshd, bshd, bshd, policy="flash").notes)


@pytest.mark.parametrize("first", ["contiguous-first", "strided-first"])
def test_strides_are_part_of_the_cache_key(first: str) -> None:
    """Same shapes, dtypes and devices: a cached plan for one stride pattern must not serve another."""
    g = torch.Generator().manual_seed(9)
    strided = torch.randn(B, H, 19, S, generator=g).transpose(-1, -2)  # head dim 19: used by no other test
    dense = strided.contiguous()
    order = [dense, strided] if first == "contiguous-first" else [strided, dense]
    for t in order * 2:
        torch.testing.assert_close(sdpa_flash.attention(t, t, t), reference_attention(t, t, t, dtype=None))


def test_devices_are_part_of_the_cache_key() -> None:
    """After a valid CPU call, the same shapes with key/value on another device ("meta") must still raise
    (PyTorch's CPU flash kernel would read the meta tensors as if they held data)."""
    q, k, v = qkv(d=27, dv=27)  # a shape no other test uses
    sdpa_flash.attention(q, k, v)
    for _ in range(2):
        with pytest.raises(AttentionInputError, match="on one device, but got cpu, meta, meta"):
            sdpa_flash.attention(q, k.to("meta"), v.to("meta"))
    m = torch.ones(S, S, dtype=torch.bool)
    sdpa_flash.attention(q, k, v, attn_mask=m)
    with pytest.raises(AttentionInputError, match="Expected attn_mask on cpu like the query, but got meta"):
        sdpa_flash.attention(q, k, v, attn_mask=m.to("meta"))


MASK_SHAPES = {"1d-keys": (S,), "2d": (S, S), "3d-heads": (H, S, S), "3d-broadcast": (1, S, S),
               "4d-keys": (B, 1, 1, S), "4d-rows": (B, H, S, 1)}


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("policy", CPU_POLICIES)
@pytest.mark.parametrize("shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
def test_masks_of_every_broadcastable_rank(shape: tuple[int, ...], policy: str, kind: str) -> None:
    """A mask of any rank that broadcasts to (B, Hq, Sq, Sk) is valid (the CPU flash kernel itself takes only
    2-D and 4-D masks: the others reach it as 4-D views)."""
    g = torch.Generator().manual_seed(len(shape))
    q, k, v = qkv(seed=len(shape))
    mask = torch.rand(shape, generator=g) < 0.7 if kind == "bool" else torch.randn(shape, generator=g)
    out = sdpa_flash.attention(q, k, v, attn_mask=mask, policy=policy)
    from sdpa_flash.testing import assert_close_to_reference

    assert_close_to_reference(out, reference_attention(q, k, v, attn_mask=mask, dtype=None),
                              reference_attention(q, k, v, attn_mask=mask))


EMPTY = {"batch-0": {"b": 0}, "heads-0": {"hq": 0, "hkv": 0}, "queries-0": {"sq": 0}, "keys-0": {"sk": 0}}


@pytest.mark.parametrize("policy", ("auto", *CPU_POLICIES))
@pytest.mark.parametrize("sizes", EMPTY.values(), ids=EMPTY.keys())
def test_empty_problems_are_valid(sizes: dict[str, int], policy: str) -> None:
    """An empty batch, no heads or no queries give an empty result; no keys give zeros (each query sees
    nothing) — on every backend and policy, forward and backward, as PyTorch's math backend does."""
    q, k, v = (t.requires_grad_() for t in qkv(d=29, dv=29, **sizes))
    out = sdpa_flash.attention(q, k, v, policy=policy, causal=True)
    b, hq, sq = q.shape[:3]
    assert out.shape == (b, hq, sq, 29)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))
    assert sdpa_flash.explain(q, k, v, policy=policy).notes[0].startswith("zero-size problem")
