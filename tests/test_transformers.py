"""sdpa_flash inside Hugging Face transformers models: ``attn_implementation="sdpa_flash"`` against ``"sdpa"``.

Tiny random-weight models built locally (no downloads), CPU, float32: a Llama-style decoder with GQA and a BERT
encoder; logits with and without (left / right) padding, greedy ``generate()`` with a KV cache, a training step's
gradients, sliding windows, dropout, and the attention function against transformers' own ``sdpa`` one.

The tolerance rule (model level): every compared element of a candidate may be at most twice as far from the
float64 ``"sdpa"`` model (PyTorch's math kernel in float64) as the worse of transformers' own float32 ``"sdpa"``
and ``"eager"`` implementations is, plus a floor of 8 float32 ulps of the largest reference value. Those two
implementations differ only in how they round, so their distance to float64 is the scale of legitimate error for
this model and input; the floor covers the case where both happen to round alike. Only real (non-padding)
positions are compared: transformers lets padded positions hold anything, and the varlen path gives them zeros.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    LlamaConfig,
    MistralConfig,
)

import sdpa_flash  # noqa: E402
from sdpa_flash.integrations import transformers as hf  # noqa: E402
from sdpa_flash.integrations.transformers import _registration as hf_registration  # noqa: E402
from sdpa_flash.testing import compare_to_reference, reference_attention  # noqa: E402

NAMES = ("sdpa_flash", "sdpa_policy")  # the name users type (contains "flash") and one transformers leaves alone
V5 = int(transformers.__version__.split(".")[0]) >= 5
needs_v5 = pytest.mark.skipif(not V5, reason="compares with transformers 5's sdpa semantics (is_causal kwarg, "
                              "position_bias)")
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    for name in NAMES:
        hf.register(name)


def llama_config(**overrides: Any) -> LlamaConfig:
    kw: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def build(cls: Any, config: Any, names: tuple[str, ...], seed: int = 0) -> dict[str, torch.nn.Module]:
    """One model per implementation, same weights; plus "ref64" (eager in float64). Configs are copied:
    ``from_config`` keeps the config object, so models sharing one would share its attention implementation."""
    torch.manual_seed(seed)
    first = cls.from_config(copy.deepcopy(config), attn_implementation=names[0]).eval()
    models = {names[0]: first}
    for name in (*names[1:], "sdpa", "eager"):
        m = cls.from_config(copy.deepcopy(config), attn_implementation=name).eval()
        m.load_state_dict(first.state_dict())
        models[name] = m
    ref = cls.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ref.load_state_dict(first.state_dict())
    models["ref64"] = ref.double()
    return models


def assert_model_close(name: str, got: torch.Tensor, outs: dict[str, torch.Tensor], keep: torch.Tensor | None,
                       what: str = "logits") -> None:
    """The module docstring's rule, on the positions ``keep`` (B, S) selects."""
    ref = outs["ref64"]
    sel = (lambda t: t[keep]) if keep is not None else (lambda t: t)

    def err(t: torch.Tensor) -> float:
        return float((sel(t).double() - sel(ref)).abs().max())

    assert torch.isfinite(sel(ref)).all()
    legit = max(err(outs["sdpa"]), err(outs["eager"]))
    bound = 2 * legit + 8 * EPS32 * float(sel(ref).abs().max())
    e = err(got)
    assert e <= bound, f"{name} {what}: error {e:.3g} vs float64 > bound {bound:.3g} (sdpa/eager error {legit:.3g})"


PADDINGS = {
    "none": None,
    "left": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 10, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]),
    "right": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [1] * 10, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]),
}


def inputs(padding: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = PADDINGS[padding]
    keep = torch.ones(3, 10, dtype=torch.bool) if mask is None else mask.bool()
    return ids, mask, keep


def run_all(models: dict[str, torch.nn.Module], fn: Callable[[torch.nn.Module], torch.Tensor]) -> dict[str, Any]:
    with torch.no_grad():
        return {n: fn(m) for n, m in models.items()}


# ------------------------------------------------------------------------------------------ importing
def test_importing_sdpa_flash_does_not_import_transformers() -> None:
    code = ("import sys, sdpa_flash, sdpa_flash.integrations, sdpa_flash.integrations.transformers, sdpa_flash.nn; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_flash_name_is_what_transformers_sees_as_flash_attention() -> None:
    """Why the "flash" name needs care: transformers takes it for a flash-attention kernel (and builds no mask
    for names missing from its mask interface); register() answers both, and the model builds."""
    generic = pytest.importorskip("transformers.utils.generic")
    if not hasattr(generic, "is_flash_attention_requested"):
        pytest.skip("transformers 4.x recognises flash attention by the prefix 'flash_attention' only")
    is_flash_attention_requested = generic.is_flash_attention_requested
    assert is_flash_attention_requested(requested_attention_implementation="sdpa_flash")
    assert not is_flash_attention_requested(requested_attention_implementation="sdpa_policy")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa_flash"] is hf.mask_function
    (fn, varlen_fn, *_), _ = lazy_import_flash_attention("sdpa_flash")
    from sdpa_flash import compat

    assert fn is compat.flash_attn_func and varlen_fn is compat.flash_attn_varlen_func
    model = AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa_flash")
    assert model.config._attn_implementation == "sdpa_flash"


def test_registering_only_an_attention_function_ignores_padding() -> None:
    """The bug register() fixes: transformers passes no mask to an implementation without a mask function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("naive_no_mask_fn", sdpa_attention_forward)
    try:
        models = build(AutoModelForCausalLM, llama_config(), ("naive_no_mask_fn", "sdpa_flash"))
        ids, mask, keep = inputs("left")
        outs = run_all(models, lambda m: m(ids, attention_mask=mask).logits)
        assert float((outs["naive_no_mask_fn"] - outs["sdpa"])[keep].abs().max()) > 1e-2
        assert_model_close("sdpa_flash", outs["sdpa_flash"], outs, keep)
    finally:
        AttentionInterface._global_mapping.pop("naive_no_mask_fn", None)


# ------------------------------------------------------------------------------------------ decoder
@pytest.mark.parametrize("padding", PADDINGS)
def test_llama_gqa_logits_match_sdpa(padding: str) -> None:
    models = build(AutoModelForCausalLM, llama_config(), NAMES)
    assert models["sdpa_flash"].model.layers[0].self_attn.num_key_value_groups == 2
    ids, mask, keep = inputs(padding)
    with hf.record() as routes:
        outs = run_all(models, lambda m: m(ids, attention_mask=mask).logits)
    for name in NAMES:
        assert_model_close(name, outs[name], outs, keep)
    assert {r.path for r in routes} == ({"no_mask"} if padding == "none" else {"varlen"})
    assert len(routes) == 2 * len(NAMES)  # every layer of both models went through sdpa_flash


def test_llama_from_pretrained_and_set_attn_implementation(tmp_path: Any) -> None:
    models = build(AutoModelForCausalLM, llama_config(), ("sdpa_flash",))
    models["sdpa_flash"].save_pretrained(tmp_path)
    try:
        switched = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    except ValueError as exc:  # transformers 5.25 needs its `kernels` dependency to load any model
        if "Kernels are not available" in str(exc):
            pytest.skip(f"this transformers cannot load a model here: {exc}")
        raise
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa_flash").eval()
    assert loaded.config._attn_implementation == "sdpa_flash"
    switched.set_attn_implementation("sdpa_flash")
    assert switched.config._attn_implementation == "sdpa_flash"
    ids, mask, keep = inputs("left")
    with torch.no_grad(), hf.record() as routes:
        a, b = loaded(ids, attention_mask=mask).logits, switched(ids, attention_mask=mask).logits
        ref = models["sdpa"](ids, attention_mask=mask).logits
    assert {r.path for r in routes} == {"varlen"} and len(routes) == 4
    torch.testing.assert_close(a[keep], ref[keep])
    torch.testing.assert_close(b[keep], ref[keep])


def test_user_4d_masks_are_recognised_or_computed_densely() -> None:
    models = build(AutoModelForCausalLM, llama_config(), ("sdpa_flash",))
    ids, _, keep = inputs("left")
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    additive = torch.zeros(3, 1, 10, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    biased = additive + torch.linspace(0, 0.5, 10)  # a real bias: not a padding pattern
    for m4, path in ((allowed, "varlen"), (additive, "varlen"), (biased, "dense")):
        with hf.record() as routes:
            outs = run_all(models, lambda m, m4=m4: m(ids, attention_mask=m4.to(m.dtype) if m4.is_floating_point()
                                                       else m4).logits)
        assert {r.path for r in routes} == {path}, [str(r) for r in routes]
        assert_model_close("sdpa_flash", outs["sdpa_flash"], outs, keep)


def first_divergence_is_a_tie(scores: tuple[torch.Tensor, ...], a: torch.Tensor, b: torch.Tensor,
                              prompt: int) -> bool:
    """Greedy decoding may legitimately part where the two best logits are within rounding of each other."""
    diff = (a[:, prompt:] != b[:, prompt:]).nonzero()
    row, step = int(diff[0, 0]), int(diff[0, 1])
    top2 = scores[step][row].topk(2).values
    return float(top2[0] - top2[1]) < 1e-4 * max(1.0, float(top2[0].abs()))


@pytest.mark.parametrize("padding", ["left", "none"])
def test_generate_greedy_with_kv_cache_matches_sdpa(padding: str) -> None:
    models = build(AutoModelForCausalLM, llama_config(), ("sdpa_flash",))
    ids, mask, _ = inputs(padding)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  pad_token_id=0)
    with torch.no_grad(), hf.record() as routes:
        got = models["sdpa_flash"].generate(ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        want = models["sdpa"].generate(ids, attention_mask=mask, **kwargs)
    if not torch.equal(got.sequences, want.sequences):
        assert first_divergence_is_a_tie(want.scores, got.sequences, want.sequences, ids.shape[1])
    decode = [r for r in routes if r.query_shape[2] == 1]
    assert decode and all(r.key_shape[2] > 10 for r in decode)  # Sq = 1, Sk = past + 1
    if padding == "left":
        assert {r.path for r in routes} == {"varlen"}


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_decode_step_with_left_padding_matches_sdpa() -> None:
    """Prefill then one cached step (Sq = 1, Sk = 11) with a left-padded batch: logits of the new token."""
    from transformers import DynamicCache

    models = build(AutoModelForCausalLM, llama_config(), ("sdpa_flash",))
    ids, mask, _ = inputs("left")
    nxt = torch.randint(3, 128, (3, 1), generator=torch.Generator().manual_seed(5))
    full = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    pos = (full.cumsum(-1) - 1).clamp(min=0)

    def step(m: torch.nn.Module) -> torch.Tensor:
        cache = DynamicCache(config=m.config)
        m(ids, attention_mask=mask, position_ids=pos[:, :10], past_key_values=cache, use_cache=True)
        return m(nxt, attention_mask=full, position_ids=pos[:, 10:], past_key_values=cache, use_cache=True).logits

    with hf.record() as routes:
        outs = run_all(models, step)
    assert_model_close("sdpa_flash", outs["sdpa_flash"], outs, None, "decode logits")
    assert [r.path for r in routes if r.query_shape[2] == 1] == ["varlen", "varlen"]


def test_training_step_gradients_match_sdpa() -> None:
    models = build(AutoModelForCausalLM, llama_config(), ("sdpa_flash",))
    ids, mask, keep = inputs("right")
    labels = ids.masked_fill(~keep, -100)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in models.items():
        m.train()
        m.zero_grad()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[name] = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads["sdpa_flash"].keys() == grads["sdpa"].keys() and len(grads["sdpa"]) > 10
    for pname, g in grads["sdpa_flash"].items():
        assert_model_close("sdpa_flash", g, {n: grads[n][pname] for n in ("sdpa", "eager", "ref64")}, None,
                           f"grad {pname}")


def test_attention_dropout_in_training_only() -> None:
    models = build(AutoModelForCausalLM, llama_config(attention_dropout=0.5), ("sdpa_flash",))
    m = models["sdpa_flash"]
    ids, mask, keep = inputs("right")
    with torch.no_grad():
        eval_out = m(ids, attention_mask=mask).logits
        assert_model_close("sdpa_flash", eval_out, run_all(models, lambda x: x(ids, attention_mask=mask).logits),
                           keep)
        m.train()
        with pytest.warns(UserWarning, match="fell back"):  # CPU: only the math backend implements dropout
            torch.manual_seed(0)
            a = m(ids, attention_mask=mask).logits
        torch.manual_seed(0)
        b = m(ids, attention_mask=mask).logits
        torch.manual_seed(1)
        c = m(ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)  # dropout follows torch's RNG
    assert float((a - eval_out)[keep].abs().max()) > 1e-3 and float((a - c)[keep].abs().max()) > 1e-3


@pytest.mark.parametrize("padding", PADDINGS)
def test_sliding_window_model_passes_the_window_to_the_kernel(padding: str) -> None:
    """transformers' sliding-window mask is recognised: the window goes to attention() as window=(W - 1, 0) and only
    the padding (if any) as a key padding mask, never the O(Sq*Sk) window mask."""
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
                           pad_token_id=0)
    models = build(AutoModelForCausalLM, config, ("sdpa_flash",))
    ids, mask, keep = inputs(padding)
    with warnings.catch_warnings(), hf.record() as routes:
        warnings.simplefilter("ignore")  # no fused kernel of PyTorch's takes a window on the CPU: the fallback warning
        outs = run_all(models, lambda m, ids=ids, mask=mask: m(ids, attention_mask=mask).logits)
    assert {r.path for r in routes} == ({"no_mask"} if padding == "none" else {"varlen"}), [str(r) for r in routes]
    assert all("sliding_window=4" in r.reason for r in routes)
    assert_model_close("sdpa_flash", outs["sdpa_flash"], outs, keep)
    nowin = copy.deepcopy(config)
    nowin.sliding_window = None
    plain = AutoModelForCausalLM.from_config(nowin, attn_implementation="sdpa").eval()
    plain.load_state_dict(models["sdpa"].state_dict())
    with torch.no_grad():
        # the window mattered: without it the logits differ
        assert float((plain(ids, attention_mask=mask).logits - outs["sdpa_flash"])[keep].abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------ encoder
@pytest.mark.parametrize("padding", PADDINGS)
def test_bert_bidirectional_logits_match_sdpa(padding: str) -> None:
    if not V5:
        pytest.skip("BERT uses transformers' AttentionInterface from 5.0 on (4.x has per-implementation classes)")
    models = build(AutoModelForMaskedLM, bert_config(), ("sdpa_flash",))
    ids, mask, keep = inputs(padding)
    with hf.record() as routes:
        outs = run_all(models, lambda m: m(ids, attention_mask=mask).logits)
    assert_model_close("sdpa_flash", outs["sdpa_flash"], outs, keep)
    assert {(r.path, r.causal) for r in routes} == ({("no_mask", None)} if padding == "none" else {("varlen", None)})


# ----------------------------------------------------------------------------- the attention function
class FakeModule(torch.nn.Module):
    def __init__(self, is_causal: bool, groups: int) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups
        self.layer_idx = 0


def qkv(b: int = 2, hq: int = 4, hk: int = 2, sq: int = 6, sk: int = 6, d: int = 8, seed: int = 0
        ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hk, sk, d, generator=g), \
        torch.randn(b, hk, sk, d, generator=g)


def check_against_math(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
                       causal: Any, scale: float | None, rows: torch.Tensor | None = None) -> None:
    """The project's rule (2x the same-dtype math error), on real query rows."""
    got = out.transpose(1, 2)
    ref = reference_attention(q, k, v, attn_mask=mask, causal=causal, scale=scale)
    same = reference_attention(q, k, v, attn_mask=mask, causal=causal, scale=scale, dtype=None)
    if rows is not None:
        got, ref, same = (t.transpose(1, 2)[rows] for t in (got, ref, same))
    c = compare_to_reference(got, same, ref)
    assert c.passed, str(c)


@pytest.mark.parametrize("scaling", [None, 0.3])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_forward_matches_math_for_2d_4d_bool_float_masks(scaling: float | None, causal: bool) -> None:
    module = FakeModule(causal, 2)
    q, k, v = qkv()
    kpm = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    allowed = kpm[:, None, None, :] & (torch.ones(6, 6, dtype=torch.bool).tril() if causal else True)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    for mask in (kpm.long(), kpm, allowed, additive):
        with hf.record() as routes:
            out, weights = hf.attention_forward(module, q, k, v, mask, scaling=scaling)
        assert weights is None and out.shape == (2, 6, 4, 8) and out.is_contiguous()
        assert routes[0].path == "varlen" and routes[0].causal == ("bottom_right" if causal else None)
        check_against_math(out, q, k, v, allowed, False, scaling, rows=kpm)


@needs_v5
def test_attention_forward_no_mask_follows_sdpa_is_causal_rule() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv(sq=1, sk=7)  # decode: sdpa attends to every key
    for module, is_causal in ((FakeModule(True, 2), None), (FakeModule(False, 2), None), (FakeModule(False, 2), True)):
        for shapes in ((q, k, v), qkv(sq=6, sk=6)):
            got, _ = hf.attention_forward(module, *shapes, None, is_causal=is_causal)
            want, _ = sdpa_attention_forward(module, *shapes, None, is_causal=is_causal)
            torch.testing.assert_close(got, want)


def test_sliding_window_without_mask_is_never_ignored() -> None:
    q, k, v = qkv(sq=10, sk=10)
    out, _ = hf.attention_forward(FakeModule(True, 2), q, k, v, None, sliding_window=3)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    check_against_math(out, q, k, v, ((j <= i) & (j > i - 3))[None, None], False, None)
    with pytest.raises(sdpa_flash.AttentionInputError, match="sliding_window=3"):
        hf.attention_forward(FakeModule(False, 2), q, k, v, None, sliding_window=3)
    plain = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()  # a plain causal mask contradicts the window
    with pytest.raises(sdpa_flash.AttentionInputError, match="will not ignore the window"):
        hf.attention_forward(FakeModule(True, 2), q, k, v, plain, sliding_window=3)


@pytest.mark.parametrize("mask", ["none", "2d", "4d"])
def test_softcap_and_sinks_pass_through(mask: str) -> None:
    """Gemma 2's softcap and gpt-oss's s_aux reach attention() as softcap= and sinks=, on every mask route."""
    q, k, v = qkv(sq=8, sk=8)
    s_aux = torch.randn(4, generator=torch.Generator().manual_seed(3))
    kpm = torch.ones(2, 8, dtype=torch.bool)
    kpm[1, :3] = False  # left padding
    causal4 = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    am: Any = {"none": None, "2d": kpm.long(), "4d": causal4 & kpm[:, None, None, :]}[mask]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no fused kernel takes softcap or sinks on the CPU: a fallback warning
        out, _ = hf.attention_forward(FakeModule(True, 2), q, k, v, am, softcap=5.0, s_aux=s_aux)
    allowed = causal4 if mask == "none" else causal4 & kpm[:, None, None, :]
    got = out.transpose(1, 2)
    ref = reference_attention(q, k, v, attn_mask=allowed, softcap=5.0, sinks=s_aux)
    same = reference_attention(q, k, v, attn_mask=allowed, softcap=5.0, sinks=s_aux, dtype=None)
    rows = allowed.any(-1).expand(2, 4, 8)  # (queries that see a key; here every one)
    c = compare_to_reference(got[rows], same[rows], ref[rows])
    assert c.passed, str(c)
    route = hf.explain(FakeModule(True, 2), q, k, v, am, softcap=5.0, s_aux=s_aux)
    assert route.plan is not None and route.plan.spec.softcap == 5.0 and route.plan.spec.sinks


def test_unsupported_options_raise_typed_errors() -> None:
    q, k, v = qkv()
    with pytest.raises(sdpa_flash.AttentionInputError, match="0/1"):
        hf.attention_forward(FakeModule(True, 2), q, k, v, torch.full((2, 6), 0.5))
    with pytest.raises(sdpa_flash.AttentionInputError, match="new attn_implementation name"):
        hf.register("sdpa")


def test_packed_cu_seq_lens_kwargs_attend_within_each_sequence() -> None:
    lens = [3, 5, 2]
    q, k, v = qkv(b=1, sq=10, sk=10)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    out, _ = hf.attention_forward(FakeModule(True, 2), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                  max_length_q=5, max_length_k=5)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    block = (seg[:, None] == seg[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    check_against_math(out, q, k, v, block[None, None], False, None)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_cu_seq_lens_take_softcap_sinks_and_the_sliding_window(causal: bool) -> None:
    """Packed sequences (flash-attention's cu_seq_lens_q/k) with Gemma 2's softcap, gpt-oss's s_aux and a sliding
    window: each sequence on its own, the window as transformers' flash path passes it, (W - 1, W - 1) per sequence
    (causal masking caps the right side of a causal layer)."""
    lens = [3, 7, 2]
    q, k, v = qkv(b=1, sq=12, sk=12, d=8, seed=4)
    s_aux = torch.randn(4, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7, softcap=5.0, s_aux=s_aux,
              sliding_window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no fused kernel does softcap or sinks on the CPU: a fallback warning
        out, _ = hf.attention_forward(FakeModule(causal, 2), q, k, v, None, **kw)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    pos = torch.arange(12) - cu[:-1].long()[seg]  # position within the sequence
    rel = pos[None, :] - pos[:, None]
    allowed = (seg[:, None] == seg[None, :]) & (rel >= -2) & (rel <= (0 if causal else 2))
    ref = reference_attention(q, k, v, attn_mask=allowed[None, None], softcap=5.0, sinks=s_aux)
    same = reference_attention(q, k, v, attn_mask=allowed[None, None], softcap=5.0, sinks=s_aux, dtype=None)
    c = compare_to_reference(out.transpose(1, 2), same, ref)
    assert c.passed, str(c)
    route = hf.explain(FakeModule(causal, 2), q, k, v, None, **kw)
    assert route.path == "packed" and route.plan is not None
    assert route.plan.spec.softcap == 5.0 and route.plan.spec.sinks
    assert route.plan.spec.window == ((2, None) if causal else (2, 2)), route.plan.spec


@needs_v5
def test_position_bias_is_added_to_the_scores() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv()
    bias = torch.randn(1, 4, 6, 6)
    kpm = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6], dtype=torch.bool)
    mask = kpm[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    for m in (None, mask):
        got, _ = hf.attention_forward(FakeModule(True, 2), q, k, v, m, position_bias=bias)
        want, _ = sdpa_attention_forward(FakeModule(True, 2), q, k, v, m, position_bias=bias)
        torch.testing.assert_close(got[kpm] if m is not None else got, want[kpm] if m is not None else want)


def test_explain_and_route_counts_say_which_path() -> None:
    q, k, v = qkv()
    kpm = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    route = hf.explain(FakeModule(True, 2), q, k, v, kpm)
    assert route.path == "varlen" and type(route.plan).__name__ == "VarlenPlan"
    dense = hf.explain(FakeModule(True, 2), q, k, v, torch.randn(2, 4, 6, 6))
    assert dense.path == "dense" and isinstance(dense.plan, sdpa_flash.Plan) and "per head" in dense.reason
    hf.reset_route_counts()
    hf.attention_forward(FakeModule(True, 2), q, k, v, kpm)
    hf.attention_forward(FakeModule(True, 2), q, k, v, None)
    assert hf.route_counts() == {"varlen": 1, "no_mask": 1}
    assert "varlen" in str(route)


def test_replace_sdpa_routes_transformers_own_name_through_sdpa_flash() -> None:
    """For tools that only set "sdpa" (LLaMA-Factory's --flash_attn sdpa): register(replace_sdpa=True)."""
    models = build(AutoModelForCausalLM, llama_config(), ("sdpa_flash",))
    ids, mask, keep = inputs("left")
    with torch.no_grad():
        want = models["sdpa"](ids, attention_mask=mask).logits
    hf.register("sdpa_flash", replace_sdpa=True)
    try:
        with torch.no_grad(), hf.record() as routes:
            got = models["sdpa"](ids, attention_mask=mask).logits
    finally:
        assert hf.restore_sdpa()
    assert {r.path for r in routes} == {"varlen"} and len(routes) == 2
    torch.testing.assert_close(got[keep], want[keep])
    with hf.record() as routes, torch.no_grad():
        models["sdpa"](ids, attention_mask=mask)
    assert routes == [] and not hf.restore_sdpa()


# ------------------------------------------------------------------------------------ registration and config state
def test_register_is_idempotent_and_keeps_the_registered_function() -> None:
    from transformers import AttentionInterface

    hf.register("sdpa_flash")
    first = AttentionInterface._global_mapping["sdpa_flash"]
    assert hf.register("sdpa_flash") == "sdpa_flash"
    assert AttentionInterface._global_mapping["sdpa_flash"] is first  # no new function: no recompiles either
    hf.register("sdpa_flash", policy="math")  # another policy: a new function under the same name
    assert AttentionInterface._global_mapping["sdpa_flash"] is not first
    assert hf.registered()["sdpa_flash"] == "math"
    hf.register("sdpa_flash")
    assert hf.registered()["sdpa_flash"] is None


def test_check_names_the_shared_config_switch() -> None:
    config = llama_config()
    ours = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa_flash")
    assert hf.check(ours) == "sdpa_flash"
    other = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")  # same config object
    assert ours.config is other.config and ours.config._attn_implementation == "sdpa"  # transformers' behaviour
    with pytest.raises(sdpa_flash.AttentionInputError) as info:
        hf.check(ours)
    assert str(info.value) == (
        "Expected LlamaForCausalLM's attention to run through sdpa_flash ('sdpa_flash', 'sdpa_policy'), but its "
        "config says attn_implementation='sdpa' instead. transformers keeps the implementation on the config "
        "object, which every model built from it shares and reads at each call: building another model from the "
        "same config object with another attn_implementation (or set_attn_implementation on any of them) switches "
        "them all. Build each model from its own copy (copy.deepcopy(config)); "
        "model.set_attn_implementation('sdpa_flash') switches this one back.")
    hf.reset_route_counts()
    with torch.no_grad():
        ours(torch.randint(3, 128, (1, 6)))
    assert hf.route_counts() == {}  # sdpa_flash was never called: the only trace, hence check()
    separate = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa_flash")
    AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    assert hf.check(separate) == "sdpa_flash"


def test_check_without_register(monkeypatch: pytest.MonkeyPatch) -> None:
    model = AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa")
    monkeypatch.setattr(hf_registration, "_registered", {})  # where check() reads it
    with pytest.raises(sdpa_flash.AttentionInputError, match=r"^Expected sdpa_flash to be registered with "
                       r"transformers, but nothing was registered in this process instead \(LlamaForCausalLM runs "
                       r"'sdpa'\): call sdpa_flash\.integrations\.transformers\.register\(\) before building the "
                       r"model\.$"):
        hf.check(model)


@needs_v5
def test_forgetting_register_is_transformers_own_error() -> None:
    # transformers validates attn_implementation itself, with no hook for a library to add to its message: the
    # docs quote this error (which never names sdpa_flash) so that a search for it finds register().
    code = ("from transformers import AutoModelForCausalLM, LlamaConfig\n"
            "cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, "
            "num_attention_heads=4, num_key_value_heads=2)\n"
            "try:\n    AutoModelForCausalLM.from_config(cfg, attn_implementation='sdpa_flash')\n"
            "except ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.startswith('Specified `attn_implementation="sdpa_flash"` is not supported. The only possible '
                                  'arguments are `attn_implementation="eager"`')


# ------------------------------------------------------------------------------------------------- gpt-oss
def test_gpt_oss_runs_its_sinks_and_windows_trains_and_generates() -> None:
    """A tiny random gpt-oss (learnable sinks on every layer, a sliding window on every other): logits, a few
    training steps and greedy generation agree with "eager", by the module's rule against eager in float64.
    gpt-oss takes no "*flash*" or "*sdpa*" name (docs/transformers.md), so it is registered under another."""
    config_cls = getattr(transformers, "GptOssConfig", None)
    if config_cls is None:
        pytest.skip("this transformers has no gpt-oss")
    from transformers import AutoModelForCausalLM

    hf.register("policy_attention")
    cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    kw = {"experts_implementation": "eager"}  # (the grouped-mm experts take no float64, which ref64 needs)
    models = {name: AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name, **kw)
              for name in ("eager", "policy_attention")}
    with torch.no_grad():
        for layer in models["eager"].model.layers:
            layer.self_attn.sinks.normal_()  # (initialised to zeros: make them matter)
    models["policy_attention"].load_state_dict(models["eager"].state_dict())
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", **kw)
    ref.load_state_dict(models["eager"].state_dict())
    models["ref64"] = ref.double()
    ids, mask, keep = inputs("left")
    ids = torch.cat([ids, ids[:, :4]], 1)  # 14 tokens: past the window of 4
    mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)  # type: ignore[list-item]
    keep = mask.bool()

    def loss_of(m: torch.nn.Module) -> torch.Tensor:
        logits = m(ids, attention_mask=mask).logits
        return logits, torch.nn.functional.cross_entropy(logits[:, :-1][keep[:, 1:]].float(), ids[:, 1:][keep[:, 1:]])

    with warnings.catch_warnings(), hf.record() as routes:
        warnings.simplefilter("ignore")  # no fused kernel of PyTorch's takes sinks on the CPU: the fallback warning
        for m in models.values():
            m.train()
        opts = {n: torch.optim.SGD(m.parameters(), lr=0.1) for n, m in models.items()}
        for step in range(3):
            outs, losses = {}, {}
            for n, m in models.items():
                outs[n], losses[n] = loss_of(m)
                opts[n].zero_grad()
                losses[n].backward()
                opts[n].step()
            assert_model_close(f"gpt-oss step {step}", outs["policy_attention"].detach(),
                               {**{n: o.detach() for n, o in outs.items()}, "sdpa": outs["eager"].detach()}, keep)
        assert all(r.plan is None or r.plan.spec.sinks for r in routes) and routes
        models["policy_attention"].eval()
        models["eager"].eval()
        prompt, prompt_mask = ids[1:2, :6], mask[1:2, :6]
        gen = {n: models[n].generate(prompt, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False)
               for n in ("eager", "policy_attention")}
    torch.testing.assert_close(gen["policy_attention"], gen["eager"], rtol=0, atol=0)
