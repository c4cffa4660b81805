"""Variable-length batches: conversions are exact inverses that keep autograd; varlen attention equals
per-sequence attention (values and gradients) on every path the engine can choose; bad input is typed."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from varlen_cost import cost_model, models  # tests/ is on sys.path

import sdpa_flash
from sdpa_flash import AttentionInputError, BackendUnavailableError, varlen
from sdpa_flash import _varlen as engine
from sdpa_flash._varlen import execution
from sdpa_flash.testing import assert_close_to_reference, property_profile, reference_attention

EXAMPLES = max(10, property_profile().max_examples // 5)


def seqs(lengths: list[int], h: int = 2, d: int = 8, *, seed: int = 0, dtype: torch.dtype = torch.float64,
         device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g).to(device=device, dtype=dtype) for n in lengths]


def check_against_per_sequence(lq: list[int], lk: list[int], causal: bool | str, *, hq: int = 2, hkv: int = 2,
                               d: int = 8, dv: int = 8, dtype: torch.dtype = torch.float32, device: str = "cpu",
                               policy: str | None = None, seed: int = 0) -> varlen.VarlenBatch:
    """varlen_attention (and its gradients) against float64 math on each sequence alone, by the tolerance rule."""
    g = torch.Generator().manual_seed(seed)
    base_q = [torch.randn(n, hq, d, generator=g) for n in lq]
    base_k = [torch.randn(n, hkv, d, generator=g) for n in lk]
    base_v = [torch.randn(n, hkv, dv, generator=g) for n in lk]
    grad = [torch.randn(n, hq, dv, generator=g) for n in lq]

    def leaves(xs: list[torch.Tensor], dt: torch.dtype) -> list[torch.Tensor]:
        return [x.to(device=device, dtype=dt).requires_grad_() for x in xs]

    qs, ks, vs = leaves(base_q, dtype), leaves(base_k, dtype), leaves(base_v, dtype)
    out = varlen.varlen_attention(varlen.pack(qs), varlen.pack(ks), varlen.pack(vs), causal=causal, policy=policy)
    go = torch.cat(grad).to(device=device, dtype=dtype)
    visible_rows = []
    for i in range(len(lq)):  # rows that see no key: output 0 and no gradient (see the varlen docstring)
        r = torch.arange(lq[i])[:, None]
        c = torch.arange(lk[i])[None, :]
        vis = torch.ones(lq[i], lk[i], dtype=torch.bool)
        if causal in (True, "top_left"):
            vis = c <= r
        elif causal == "bottom_right":
            vis = c <= r + lk[i] - lq[i]
        visible_rows.append(vis.any(-1))
    go = go * torch.cat(visible_rows).to(device)[:, None, None].to(dtype)
    grads = torch.autograd.grad(out.values, [*qs, *ks, *vs], go, allow_unused=True)
    n = len(lq)
    outs = out.unpack()
    gos = torch.split(go, lq)
    for i in range(n):
        if lq[i] == 0:
            continue
        cand_grads = [grads[i], grads[n + i], grads[2 * n + i]]
        if lk[i] == 0:
            assert torch.equal(outs[i], torch.zeros_like(outs[i]))
            continue
        def bhsd(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(0, 1)[None]

        ref_in = [bhsd(x[i]).detach().double().requires_grad_() for x in (qs, ks, vs)]
        same_in = [bhsd(x[i]).detach().requires_grad_() for x in (qs, ks, vs)]
        ref = reference_attention(*ref_in, causal=causal)
        same = reference_attention(*same_in, causal=causal, dtype=None)
        rows = visible_rows[i].to(device)
        g_i = bhsd(gos[i])
        ref_g = torch.autograd.grad(ref, ref_in, g_i.double())
        same_g = torch.autograd.grad(same, same_in, g_i)
        keep = rows[None, None, :, None]
        cand = [bhsd(outs[i]) * keep, *(bhsd(c) if c is not None else torch.zeros_like(s)
                                        for c, s in zip(cand_grads, same_in, strict=True))]
        assert_close_to_reference(cand, [(same * keep).detach(), *same_g],
                                  [(ref.nan_to_num(0.0) * keep).detach(), *ref_g])
    return out


# ------------------------------------------------------------------------------------------- conversions
def test_cu_seqlens_worked_example() -> None:
    cu = varlen.cu_seqlens_from_lengths([2, 3, 2])
    assert cu.tolist() == [0, 2, 5, 7] and cu.dtype == torch.int32
    b = varlen.pack(seqs([2, 3, 2]))
    assert b.cu_seqlens.tolist() == [0, 2, 5, 7] and b.max_seqlen == 3 and b.seqlens == (2, 3, 2)
    assert b.values.shape == (7, 2, 8) and b.batch_size == 3 and b.total == 7


lengths_lists = st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda x: sum(x) > 0)


@settings(max_examples=EXAMPLES)
@given(lengths=lengths_lists, left=st.booleans())
def test_round_trip_list_pack_padded_nested_is_identity_with_gradients(lengths: list[int], left: bool) -> None:
    xs = [x.requires_grad_() for x in seqs(lengths)]
    batch = varlen.pack(xs)
    padded, mask = batch.to_padded()
    assert padded.shape == (len(lengths), max(lengths), 2, 8) and mask.sum(1).tolist() == lengths
    assert torch.equal(padded[~mask], torch.zeros_like(padded[~mask]))
    if left:  # move every sequence to the right edge: left padding survives the round trip too
        s = padded.shape[1]
        shift = torch.stack([torch.roll(torch.arange(s), s - n) for n in lengths])
        padded = torch.gather(padded, 1, shift[:, :, None, None].expand_as(padded))
        mask = torch.gather(mask, 1, shift)
    again = varlen.from_padded(padded, key_padding_mask=mask)
    assert again.seqlens == tuple(lengths)
    padded2, mask2 = again.to_padded()
    assert torch.equal(padded2, padded) and torch.equal(mask2, mask)
    through_nested = varlen.from_nested(again.to_nested())
    parts = through_nested.unpack()
    assert [p.shape[0] for p in parts] == lengths
    for p, x in zip(parts, xs, strict=True):
        assert torch.equal(p, x)
    weights = [torch.randn_like(x) for x in xs]
    loss = sum((p * w).sum() for p, w in zip(parts, weights, strict=True))
    grads = torch.autograd.grad(loss, xs)
    for gr, w in zip(grads, weights, strict=True):
        assert torch.equal(gr, w)


def test_from_padded_with_lengths_right_padding() -> None:
    x = torch.randn(3, 5, 2, 4)
    b = varlen.from_padded(x, lengths=[5, 0, 2])
    assert b.seqlens == (5, 0, 2)
    assert torch.equal(b.unpack()[0], x[0]) and torch.equal(b.unpack()[2], x[2, :2])
    back, mask = b.to_padded()
    assert torch.equal(back[0], x[0]) and torch.equal(back[2, :2], x[2, :2]) and not mask[1].any()


def test_from_cu_seqlens_and_position_ids() -> None:
    v = torch.randn(7, 2, 4)
    assert varlen.from_cu_seqlens(v, torch.tensor([0, 2, 5, 7])).seqlens == (2, 3, 2)
    assert varlen.from_cu_seqlens(v, [0, 2, 5, 7], max_seqlen=3).max_seqlen == 3
    assert varlen.from_position_ids(v, torch.tensor([[0, 1, 0, 1, 2, 0, 1]])).seqlens == (2, 3, 2)
    assert varlen.from_position_ids(v, torch.tensor([0, 1, 2, 3, 4, 5, 6])).seqlens == (7,)


# --------------------------------------------------------------------------------------------- attention
CAUSAL = [False, True, "bottom_right"]


@pytest.mark.parametrize("model", list(models("cpu")))
@pytest.mark.parametrize("causal", CAUSAL, ids=["none", "top_left", "bottom_right"])
def test_every_grouping_equals_per_sequence_attention(model: str, causal: bool | str) -> None:
    lengths = [5, 1, 7, 7, 3, 12, 0, 4, 9, 9, 30]
    with cost_model("cpu", models("cpu")[model]):
        check_against_per_sequence(lengths, lengths, causal)
        if causal is not True:  # unequal query/key lengths per sequence (cross-attention, KV caches)
            check_against_per_sequence(lengths, [3, 0, 9, 2, 5, 12, 4, 1, 9, 10, 2], causal, hq=4, hkv=2)


@settings(max_examples=EXAMPLES)
@given(lq=st.lists(st.integers(0, 20), min_size=1, max_size=7), extra=st.lists(st.integers(-5, 8), min_size=7,
                                                                                   max_size=7),
       causal=st.sampled_from(CAUSAL), group=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32,
                                                                                            torch.bfloat16]),
       model=st.sampled_from(list(models("cpu"))), seed=st.integers(0, 2**16))
def test_varlen_equals_per_sequence_attention_property(lq: list[int], extra: list[int], causal: bool | str,
                                                       group: int, dtype: torch.dtype, model: str,
                                                       seed: int) -> None:
    lk = lq if causal is True else [max(0, a + b) for a, b in zip(lq, extra, strict=False)]
    with cost_model("cpu", models("cpu")[model]):
        check_against_per_sequence(lq, lk, causal, hq=2 * group, hkv=2, d=8, dv=8 if group == 1 else 4,
                                   dtype=dtype, seed=seed)


def test_no_information_crosses_sequences() -> None:
    lengths = [6, 3, 9, 9, 4]
    for name, model in models("cpu").items():
        with cost_model("cpu", model):
            xs = seqs(lengths, dtype=torch.float32)
            out = varlen.varlen_attention(*(varlen.pack(xs),) * 3).unpack()
            ys = [x.clone() for x in xs]
            ys[2] = ys[2] * 3 + 1  # another sequence changes; none of the others may
            ys[3][:2] = float("nan")
            out2 = varlen.varlen_attention(*(varlen.pack(ys),) * 3).unpack()
            for i in (0, 1, 4):
                assert torch.equal(out[i], out2[i]), name
            assert torch.isnan(out2[3]).all()


def test_nested_in_nested_out() -> None:
    xs = seqs([4, 6, 1], dtype=torch.float32)
    nt = varlen.pack(xs).to_nested()
    out = varlen.varlen_attention(nt, nt, nt, causal=True)
    assert out.is_nested and out.shape[0] == 3
    want = varlen.varlen_attention(*(varlen.pack(xs),) * 3, causal=True)
    assert torch.equal(varlen.from_nested(out).values, want.values)


def test_to_nested_logs_nothing() -> None:
    # torch.nested.nested_tensor_from_jagged asks torch.fx's is_fx_tracing(), which logs a deprecation line once
    # per process ("W... is_fx_tracing will return true ..."): to_nested() builds the same view without it. In a
    # child process, since the line is logged once per process.
    import subprocess
    import sys

    code = ("import torch\nfrom sdpa_flash import varlen\n"
            "b = varlen.pack([torch.randn(n, 2, 8) for n in (3, 5, 1)])\nnt = b.to_nested()\n"
            "assert nt.is_nested and nt.layout == torch.jagged and nt.size(0) == 3\n"
            "assert torch.equal(varlen.from_nested(nt).values, b.values)\n"
            "assert nt._values.data_ptr() == b.values.data_ptr()\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert "is_fx_tracing" not in done.stderr and done.stderr == ""


def test_explain_names_the_path_and_reasons() -> None:
    b = varlen.pack(seqs([5, 9, 9, 2]))
    p = varlen.explain_varlen(b, b, b, causal=True)
    assert p.path == "grouped" and p.backend == "flash"
    assert "flash varlen kernel is CUDA only" in p.reasons["flash_varlen"][0]
    assert "grouped" in str(p) and "estimate grouped" in p.explain()
    assert varlen.explain_varlen(b, b, b, policy="math").backend == "math"
    with pytest.raises(BackendUnavailableError, match="cudnn"):
        varlen.varlen_attention(b, b, b, policy="cudnn")


def test_plan_on_synthetic_h200_prefers_cudnn_groups_or_flash_varlen() -> None:
    caps = sdpa_flash.Capabilities.synthetic("cuda", (9, 0))
    lens = tuple(torch.exp(6.5 + 0.9 * torch.randn(64, generator=torch.Generator().manual_seed(0)))
                 .clamp(16, 8192).long().tolist())
    for causal in (None, "top_left"):
        for grad in (False, True):
            spec = engine.VarlenSpec("cuda", torch.bfloat16, 16, 16, 128, 128, lens, lens, causal, False, grad)
            p = engine.plan_varlen(spec, caps, sdpa_flash.policy.resolve_policy("auto"))
            assert p.path in ("grouped", "hybrid", "flash_varlen")
            assert set(p.estimates) == {"grouped", "flash_varlen", "hybrid"}
            covered = sorted([i for g in p.groups for i in g.members] + list(p.varlen_members))
            assert covered == list(range(64))  # every sequence computed exactly once
            if p.groups:
                assert p.backend == "cudnn"
    strict = engine.plan_varlen(engine.VarlenSpec("cuda", torch.bfloat16, 16, 16, 128, 128, lens, lens),
                                caps, sdpa_flash.policy.resolve_policy("flash"))
    assert strict.backend == "flash"


def test_plan_checks_every_group_shape_against_a_strict_policy() -> None:
    """The longest sequence is not the only shape a strict policy must run: cuDNN refuses L_k = 1, and FLASH a
    top-left causal pair with more queries than keys. The plan says which group, before anything runs."""
    caps = sdpa_flash.Capabilities.synthetic("cuda", (9, 0))
    resolve = sdpa_flash.policy.resolve_policy
    spec = engine.VarlenSpec("cuda", torch.bfloat16, 4, 4, 64, 64, (1, 4096, 4096), (1, 4096, 4096))
    with pytest.raises(BackendUnavailableError, match=r"a group of 1 x \(L_q=1, L_k=1\): cudnn: seqlen_k=1") as \
            info:
        engine.plan_varlen(spec, caps, resolve("cudnn"))
    assert "grouped" in info.value.reasons and "flash_varlen" in info.value.reasons
    auto = engine.plan_varlen(spec, caps, resolve("auto"))  # auto runs it: flash varlen, or groups with a fallback
    assert sorted([i for g in auto.groups for i in g.members] + list(auto.varlen_members)) == [0, 1, 2]
    pair = engine.VarlenSpec("cuda", torch.bfloat16, 4, 4, 64, 64, (2, 300), (1, 300), "top_left")
    with pytest.raises(BackendUnavailableError, match=r"L_q=2, L_k=1.*bottom-right") as info:
        engine.plan_varlen(pair, caps, resolve("flash"))
    assert "top_left" in " ".join(info.value.reasons["flash_varlen"])


# ------------------------------------------------------------------------------------ key_padding_mask
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_padding_mask_matches_masked_math_and_zeros_padded_rows(layout: str, causal: bool) -> None:
    b, h, s, d = 3, 4, 10, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 7:] = False  # right padding
    mask[1, :3] = False  # left padding
    mask[2, ::2] = False  # anything
    lay = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
    out = lay(sdpa_flash.attention(lay(q), lay(k), lay(v), key_padding_mask=mask, causal=causal, layout=layout))
    keep = mask[:, None, :, None]
    assert torch.equal(out * ~keep, torch.zeros_like(out))
    full = mask[:, None, None, :] & (torch.ones(s, s, dtype=torch.bool).tril() if causal else True)
    grad = torch.randn(out.shape, generator=g) * keep  # padded rows pass no gradient
    cand = [out * keep, *torch.autograd.grad(out, (q, k, v), grad)]
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    same = reference_attention(*ins, attn_mask=full, dtype=None)
    same_g = torch.autograd.grad(same, ins, grad)
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ins64, attn_mask=full)
    ref_g = torch.autograd.grad(ref, ins64, grad.double())
    assert_close_to_reference(cand, [same * keep, *same_g], [ref * keep, *ref_g])
    plan = sdpa_flash.explain(lay(q), lay(k), lay(v), key_padding_mask=mask, causal=causal, layout=layout)
    assert isinstance(plan, engine.VarlenPlan)


def test_key_padding_mask_cross_attention_and_mask_cache() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 3, 8, generator=g)
    k = torch.randn(2, 2, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = sdpa_flash.attention(q, k, k, key_padding_mask=mask)
    ref = reference_attention(q.double(), k.double(), k.double(), attn_mask=mask[:, None, None, :])
    assert (out.double() - ref).abs().max() < 1e-5
    mask[0, 4] = True  # an in-place change bumps the version: the cached layout must not be reused
    out2 = sdpa_flash.attention(q, k, k, key_padding_mask=mask)
    ref2 = reference_attention(q.double(), k.double(), k.double(), attn_mask=mask[:, None, None, :])
    assert (out2.double() - ref2).abs().max() < 1e-5
    p = sdpa_flash.explain(q, k, k, key_padding_mask=mask, causal="bottom_right")
    assert any("dense masked route" in n for n in p.notes)  # causal in padded coordinates with Sq != Sk


# ------------------------------------------------------------------------------------------- bad input
def _bad_cases() -> list[tuple[str, object, str]]:
    v = torch.randn(7, 2, 4)
    one = varlen.pack([torch.randn(3, 2, 4)])
    two = varlen.pack([torch.randn(3, 2, 4), torch.randn(2, 2, 4)])
    x = torch.randn(2, 5, 2, 4)
    return [
        ("lengths that do not sum to the rows", lambda: varlen.from_cu_seqlens(v, [0, 2, 5]), "end at the 7"),
        ("cu_seqlens float", lambda: varlen.from_cu_seqlens(v, torch.tensor([0.0, 7.0])), "int32 or int64"),
        ("cu_seqlens 2-D", lambda: varlen.from_cu_seqlens(v, torch.tensor([[0, 7]])), "1-D"),
        ("cu_seqlens not from 0", lambda: varlen.from_cu_seqlens(v, [1, 7]), "start at 0"),
        ("cu_seqlens decreasing", lambda: varlen.from_cu_seqlens(v, [0, 5, 3, 7]), "non-decreasing"),
        ("wrong max_seqlen", lambda: varlen.from_cu_seqlens(v, [0, 7], max_seqlen=3), "max_seqlen"),
        ("more lengths than rows", lambda: varlen.from_padded(x, lengths=[1, 2, 3]), "2 lengths"),
        ("lengths beyond the data", lambda: varlen.from_padded(x, lengths=[6, 1]), "lengths <= the padded"),
        ("negative length", lambda: varlen.from_padded(x, lengths=[-1, 1]), "non-negative"),
        ("mask not boolean", lambda: varlen.from_padded(x, key_padding_mask=torch.ones(2, 5)), "boolean"),
        ("mask of the wrong shape", lambda: varlen.from_padded(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
         "shape"),
        ("both lengths and mask", lambda: varlen.from_padded(x, lengths=[1, 1], key_padding_mask=torch.ones(
            2, 5, dtype=torch.bool)), "exactly one"),
        ("padded input not 4-D", lambda: varlen.from_padded(torch.randn(2, 5, 4), lengths=[1, 1]), "4-D"),
        ("packed values not 3-D", lambda: varlen.pack([torch.randn(3, 4)]), "3-D"),
        ("sequences that disagree", lambda: varlen.pack([torch.randn(3, 2, 4), torch.randn(3, 3, 4)]),
         "sequences\\[1\\]"),
        ("no sequences", lambda: varlen.pack([]), "at least one"),
        ("Q/K with different sequence counts", lambda: varlen.varlen_attention(one, two, two), "number of sequences"),
        ("dense tensors to varlen_attention", lambda: varlen.varlen_attention(v, v, v), "VarlenBatch"),
        ("bad causal", lambda: varlen.varlen_attention(one, one, one, causal="left"), "causal"),
        ("key_padding_mask with attn_mask", lambda: sdpa_flash.attention(
            torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4),
            key_padding_mask=torch.ones(1, 5, dtype=torch.bool), attn_mask=torch.ones(5, 5, dtype=torch.bool)),
         "either attn_mask or key_padding_mask"),
        ("key_padding_mask wrong shape", lambda: sdpa_flash.attention(
            torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4),
            key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), "shape"),
        ("key_padding_mask on another device", lambda: sdpa_flash.attention(
            torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4),
            key_padding_mask=torch.ones(1, 5, dtype=torch.bool, device="meta")), "device|meta"),
        ("packed lengths that do not sum", lambda: varlen.varlen_attention_packed(
            v, v, v, None, None, 7, 7, seqlens_q=[3, 3], seqlens_k=[3, 4]), "sum to"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_a_typed_error(case: tuple[str, object, str]) -> None:
    _, call, match = case
    with pytest.raises(AttentionInputError, match=match):
        call()  # type: ignore[operator]


def test_zero_length_sequences_are_valid() -> None:
    b = varlen.pack(seqs([0, 3, 0]))
    out = varlen.varlen_attention(b, b, b, causal=True)
    assert out.values.shape == (3, 2, 8) and torch.isfinite(out.values).all()
    k0 = varlen.pack(seqs([0, 0, 0]))
    q3 = varlen.pack(seqs([2, 0, 1]))
    out = varlen.varlen_attention(q3, k0, k0)  # queries with no keys: zeros, never NaN
    assert torch.equal(out.values, torch.zeros_like(out.values))


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.sm80
@pytest.mark.parametrize("path", ["default", "per-sequence", "one group, equal lengths only", "flash varlen",
                                  "hybrid", "groups on 4 streams"])
@pytest.mark.parametrize("causal", CAUSAL, ids=["none", "top_left", "bottom_right"])
def test_cuda_paths_equal_per_sequence_attention(path: str, causal: bool | str) -> None:
    base = engine.COST_MODELS["cuda"]
    forced = {
        **models("cuda"),
        "flash varlen": dataclasses.replace(base, varlen_call_us=0, varlen_call_us_bwd=0, varlen_rate=1e9,
                                            varlen_rate_bwd=1e9),
        "hybrid": dataclasses.replace(base, varlen_rate=1e4, varlen_rate_bwd=1e4),
        # the side streams must read the gathered groups only after the current stream wrote them
        "groups on 4 streams": dataclasses.replace(base, streams=4, varlen_call_us=1e9, varlen_call_us_bwd=1e9),
    }[path]
    lq = [300, 1, 129, 129, 64, 17, 0, 512, 200, 77, 5, 1000]
    lk = lq if causal is True else [250, 3, 129, 100, 64, 40, 7, 512, 1, 77, 90, 999]
    with cost_model("cuda", forced):
        for dtype in (torch.bfloat16, torch.float16):
            check_against_per_sequence(lq, lk, causal, hq=8, hkv=2, d=64, dv=64, dtype=dtype, device="cuda")
            check_against_per_sequence(lq, lq, causal, hq=4, hkv=4, d=128, dv=128, dtype=dtype, device="cuda")


@pytest.mark.sm80
@pytest.mark.parametrize("kernel", ["flash", "fa4"])
def test_cuda_varlen_kernel_calls_are_counted_and_shadow_checked(kernel: str) -> None:
    """The packed varlen call does not go through attention(): the engine counts it in stats() and shadow-checks
    one of its sequences 1 call in N, like every other kernel call — for each backend's packed kernel."""
    if kernel == "fa4" and not sdpa_flash.capabilities("cuda").kernel_version("fa4"):
        pytest.skip("flash-attn-4 is not installed")
    base = engine.COST_MODELS["cuda"]
    forced = dataclasses.replace(base, varlen_call_us=0, varlen_call_us_bwd=0, varlen_rate=1e9, varlen_rate_bwd=1e9,
                                 varlen_kernels=((kernel, 0.0, 0.0, 1e9, 1e9),))
    lens = [300, 1, 129, 129, 64, 17, 512, 200]
    g = torch.Generator().manual_seed(0)
    q, k, v = (varlen.pack([torch.randn(n, 4, 64, generator=g).to("cuda", torch.bfloat16) for n in lens])
               for _ in range(3))
    pol = sdpa_flash.policy.resolve_policy(kernel, shadow=2, shadow_action="raise")
    route = f"{kernel} varlen op"
    with cost_model("cuda", forced):
        p = varlen.explain_varlen(q, k, v, causal=True, policy=pol)
        assert p.path == "flash_varlen" and p.varlen_backend == kernel and p.varlen_members, p.explain()
        sdpa_flash.reset_stats()
        for _ in range(4):
            varlen.varlen_attention(q, k, v, causal=True, policy=pol)
    st = sdpa_flash.stats()
    assert st.plans[(kernel, route, p.spec.describe())] == 4
    assert st.shadow.checks >= 2 and not st.shadow.mismatches, st  # checked 1 call in 2, the first included
    with cost_model("cuda", forced):  # a fresh plan: built by the first call, counted again after the reset
        varlen.varlen_attention(q, k, v, causal=True, policy=pol)
        sdpa_flash.reset_stats()
        varlen.varlen_attention(q, k, v, causal=True, policy=pol)
    assert sdpa_flash.stats().plans[(kernel, route, p.spec.describe())] == 1
    bad = dataclasses.replace(pol, shadow=1)
    backend_type = type(engine_backends()[kernel])
    real = backend_type.varlen

    def corrupted(self):  # type: ignore[no-untyped-def]
        run = real(self)
        return lambda *a, **kw: run(*a, **kw) * 1.5

    backend_type.varlen = corrupted  # type: ignore[method-assign]
    try:
        with cost_model("cuda", forced), pytest.raises(sdpa_flash.ShadowMismatchError, match=route):
            for _ in range(len(lens)):  # each check samples one sequence, drawn afresh
                varlen.varlen_attention(q, k, v, causal=True, policy=bad)
    finally:
        backend_type.varlen = real  # type: ignore[method-assign]
        engine.clear_caches()


def engine_backends():  # type: ignore[no-untyped-def]
    from sdpa_flash.backends import BACKENDS

    return BACKENDS


def test_grouped_calls_are_counted_per_dense_call() -> None:
    sdpa_flash.reset_stats()
    b = varlen.pack(seqs([3, 5, 5]))
    p = varlen.explain_varlen(b, b, b)
    varlen.varlen_attention(b, b, b)
    assert p.path == "grouped"
    assert sdpa_flash.stats().total == len(p.groups)


# ------------------------------------------------------------------------- direct group execution
def _run_varlen(lq: list[int], lk: list[int], causal: bool | str, device: str, dtype: torch.dtype, *,
                hq: int = 4, hkv: int = 2, d: int = 16, slow: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], execution._Exec]:
    """varlen_attention and its gradients; ``slow`` forbids the direct group execution (each group through
    ``attention()`` with its own autograd nodes, the reference for it)."""
    g = torch.Generator().manual_seed(1)
    batches = [varlen.pack([torch.randn(n, h, d, generator=g).to(device, dtype) for n in lens])
               for lens, h in ((lq, hq), (lk, hkv), (lk, hkv))]
    leaves = [b.values.clone().requires_grad_() for b in batches]
    inputs = [varlen.VarlenBatch(t, b.cu_seqlens, b.max_seqlen, b.seqlens) for t, b in zip(leaves, batches,
                                                                                           strict=True)]
    usable = execution._Direct.usable
    if slow:
        execution._Direct.usable = lambda *a: False  # type: ignore[method-assign]
    try:
        out = varlen.varlen_attention(*inputs, causal=causal)
        go = torch.randn(out.values.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        grads = torch.autograd.grad(out.values, leaves, go)
    finally:
        execution._Direct.usable = usable  # type: ignore[method-assign]
    return out.values, grads, list(execution._exec_cache.values())[-1]


# (query lengths, key lengths, causal): causal right-padded groups, padded queries, singles. Every group has 16 keys
# or more: CPU flash does not take fewer without a mask (the denylist, pytorch/pytorch#141128), so such a group
# runs on math through attention(), not through the direct group execution.
DIRECT_CASES = [
    ([16, 20, 20, 41, 17, 28], None, True),
    ([15, 19, 16, 19], [19, 19, 19, 19], False),
    ([18, 0, 16, 23], None, "top_left"),
    ([17, 17, 17], None, False),
]


@pytest.mark.parametrize("model", ["default", "per-sequence"])
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: f"{c[0]}-{c[2]}")
def test_direct_group_execution_equals_per_group_attention(model: str, case: tuple[list[int], Any, Any]) -> None:
    """The grouped part run through the kernels' own forward and backward ops under one autograd node gives
    bitwise what per-group attention() calls give (same kernels, same inputs); it must also be the path taken."""
    lq, lk, causal = case
    with cost_model("cpu", models("cpu")[model]):
        out, grads, ex = _run_varlen(lq, lk or lq, causal, "cpu", torch.float32)
        assert ex.direct is not None, "the direct group execution was expected for this plan"
        ref, ref_grads, _ = _run_varlen(lq, lk or lq, causal, "cpu", torch.float32, slow=True)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)


def test_direct_group_execution_is_skipped_where_it_would_differ() -> None:
    """Groups that need a mask, shadow checking, non-contiguous inputs, or that CPU flash does not take (fewer
    than 16 keys without a mask: the denylist, pytorch/pytorch#141128): the groups go through attention()."""
    with cost_model("cpu", models("cpu")["one group, mask padding"]):
        _, _, ex = _run_varlen([16, 20, 17], [16, 20, 17], False, "cpu", torch.float32)
        assert ex.direct is None
    with cost_model("cpu", models("cpu")["per-sequence"]):
        _, _, ex = _run_varlen([16, 20, 17], [16, 20, 17], True, "cpu", torch.float32)
        assert ex.direct is not None
        q = torch.randn(16 + 20 + 17, 2, 16)
        assert ex.direct.usable(q, q, q, sdpa_flash.Policy())
        assert not ex.direct.usable(q, q, q, sdpa_flash.Policy(shadow=10))
        assert not ex.direct.usable(q.transpose(0, 1).contiguous().transpose(0, 1), q, q, sdpa_flash.Policy())
        _, _, ex = _run_varlen([5, 9, 3], [5, 9, 3], True, "cpu", torch.float32)
        assert ex.direct is None


def test_direct_group_execution_autograd_semantics() -> None:
    """Like the kernels' own ops: backward twice with retain_graph gives the same gradients, twice without it is
    an error, and double backward is refused."""
    with cost_model("cpu", models("cpu")["per-sequence"]):
        q = varlen.pack(seqs([16, 20, 17], h=2, d=16, dtype=torch.float32))
        leaf = q.values.clone().requires_grad_()
        b = q.with_values(leaf)
        out = varlen.varlen_attention(b, b, b, causal=True).values
        assert list(execution._exec_cache.values())[-1].direct is not None
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        first = torch.autograd.grad(out, leaf, go, retain_graph=True)[0]
        again = torch.autograd.grad(out, leaf, go)[0]
        assert torch.equal(first, again)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(out, leaf, go)
        out = varlen.varlen_attention(b, b, b, causal=True).values
        (g,) = torch.autograd.grad(out, leaf, go, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(g.sum(), leaf)


@pytest.mark.cuda
@pytest.mark.parametrize("model", ["default", "per-sequence"])
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: f"{c[0]}-{c[2]}")
def test_cuda_direct_group_execution_equals_per_group_attention(model: str, case: tuple[list[int], Any, Any]
                                                                ) -> None:
    lq, lk, causal = case
    lq = [n * 9 for n in lq]  # lengths the fused kernels take (cuDNN refuses a key length of 1)
    lk = [n * 9 for n in lk] if lk else lq
    no_varlen = dataclasses.replace(models("cuda")[model], varlen_call_us=1e9, varlen_call_us_bwd=1e9,
                                    varlen_kernels=())
    # the direct path exists for the SDPA kernels' aten ops (cuDNN, flash): keep FA4 (when installed) out of it
    with cost_model("cuda", no_varlen), sdpa_flash.use_policy("cudnn,flash,efficient,math"):
        for dtype in (torch.bfloat16, torch.float16):
            out, grads, ex = _run_varlen(lq, lk, causal, "cuda", dtype, d=64)
            assert ex.direct is not None
            ref, ref_grads, _ = _run_varlen(lq, lk, causal, "cuda", dtype, d=64, slow=True)
            assert torch.equal(out, ref)
            for a, b in zip(grads, ref_grads, strict=True):  # cuDNN's backward is not bitwise deterministic
                torch.testing.assert_close(a, b, rtol=0, atol=float(b.abs().max()) * 2 ** -7)


# ------------------------------------------------------------------ cuDNN's ragged layout (not an engine path)
_RAGGED_LENS = [300, 1, 129, 64, 17, 512, 200, 1000]
_RAGGED = """
import sys, torch
lens = LENS
cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v, go = (torch.randn(sum(lens), 4, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
saved = {"inputs": [t.cpu() for t in (q, k, v, go)]}
for causal in (False, True):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = torch.ops.aten._cudnn_attention_forward(*leaves, None, cu, cu, max(lens), max(lens), True, 0.0, causal,
                                                False)[0]
    saved[causal] = [t.cpu() for t in (o, *torch.autograd.grad(o, leaves, go))]
torch.cuda.synchronize()
torch.save(saved, sys.argv[1])
""".replace("LENS", repr(_RAGGED_LENS))


@functools.cache
def _ragged_results(path: str) -> dict[Any, Any]:
    """cuDNN ragged (THD) attention, ``aten._cudnn_attention_forward`` with ``cu_seqlens`` and torch's autograd
    for it, on one packed bf16 batch: the inputs and (out, dq, dk, dv) per causal flag. Run in a child process: a
    wrong backward can also be an illegal memory access, which would poison this process's CUDA context."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RAGGED, path], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the cuDNN ragged child process failed:\n{done.stderr[-3000:]}"
    return torch.load(path)  # type: ignore[no-any-return]


def _check_ragged(tmp_path_factory: pytest.TempPathFactory, which: slice) -> None:
    if not hasattr(torch.ops.aten, "_cudnn_attention_forward"):
        pytest.skip("aten._cudnn_attention_forward is not in this torch")
    got = _ragged_results(str(tmp_path_factory.getbasetemp() / "cudnn_ragged.pt"))
    q, k, v, go = got["inputs"]
    names = ("out", "dq", "dk", "dv")[which]
    for causal in (False, True):
        cand = [torch.split(t, _RAGGED_LENS) for t in got[causal]]
        starts = [0, *itertools.accumulate(_RAGGED_LENS)]
        for i in range(len(_RAGGED_LENS)):
            rows = slice(starts[i], starts[i + 1])
            ref_in = [x[rows].transpose(0, 1)[None].double().requires_grad_() for x in (q, k, v)]
            same_in = [x[rows].transpose(0, 1)[None].requires_grad_() for x in (q, k, v)]
            g_i = go[rows].transpose(0, 1)[None]
            ref = reference_attention(*ref_in, causal=causal)
            same = reference_attention(*same_in, causal=causal, dtype=None)
            refs = [ref, *torch.autograd.grad(ref, ref_in, g_i.double())]
            sames = [same, *torch.autograd.grad(same, same_in, g_i)]
            cands = [c[i].transpose(0, 1)[None] for c in cand]
            assert_close_to_reference(cands[which], [t.detach() for t in sames[which]],
                                      [t.detach() for t in refs[which]], names=names)


@pytest.mark.sm90
def test_cudnn_ragged_layout_forward_is_exact(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Its forward is right, and fast on the GPU (0.85-0.99x dense cuDNN's device time in benchmarks/
    varlen_probe.py); the engine does not take it because of its backward and its host cost (see the engine's
    docstring)."""
    _check_ragged(tmp_path_factory, slice(0, 1))


@pytest.mark.sm90
@pytest.mark.xfail(strict=True, reason="torch 2.11: the backward of aten._cudnn_attention_forward with cu_seqlens "
                   "sizes its dQ accumulator from the head dim, not the longest sequence (pytorch/pytorch#186142): "
                   "dq/dk are wrong, so the engine does not use cuDNN's ragged layout. An XPASS means the torch in "
                   "use has the fix: measure the path again (benchmarks/varlen_probe.py).")
def test_cudnn_ragged_layout_backward_is_exact(tmp_path_factory: pytest.TempPathFactory) -> None:
    _check_ragged(tmp_path_factory, slice(1, 4))


def test_cost_model_is_chosen_by_architecture_then_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdpa_flash._varlen import cost

    generic = cost.COST_MODELS["cuda"]
    assert cost.cost_model("cuda", "sm80") == ("cuda", generic)  # no sm80 model: the device type's
    assert cost.cost_model("xpu", "") == ("cpu", cost._FALLBACK_MODEL)
    sm90 = dataclasses.replace(generic, call_us=1.0)
    monkeypatch.setitem(cost.COST_MODELS, "cuda:sm90", sm90)
    assert cost.cost_model("cuda", "sm90") == ("cuda:sm90", sm90)
    assert cost.cost_model("cuda", "sm100") == ("cuda", generic)
