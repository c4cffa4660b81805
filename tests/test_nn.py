"""``sdpa_flash.nn.Attention`` against ``torch.nn.MultiheadAttention`` (copied weights), GQA against explicit
repetition, varlen input against padded input, state_dict round trips, and constructor errors.

Tolerance: outputs and gradients are compared with ``torch.testing.assert_close``'s float32 defaults
(rtol 1.3e-6, atol 1e-5). Both layers run the same projections and the same attention maths in float32 on
unit-scale inputs (E = 32, S = 9), so they differ only by the rounding of sums of a few dozen terms: a few
float32 ulps of values of order 1, far inside that bound (a wrong mask or head mapping moves values by ~0.1).
"""

from __future__ import annotations

import pytest
import torch

import sdpa_flash
from sdpa_flash import varlen
from sdpa_flash.nn import Attention

E, H = 32, 4


def mha_like(layer: Attention) -> torch.nn.MultiheadAttention:
    bias = layer.qkv.bias is not None
    mha = torch.nn.MultiheadAttention(layer.embed_dim, layer.num_heads, bias=bias, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.qkv.weight)
        mha.out_proj.weight.copy_(layer.out_proj.weight)
        if bias:
            mha.in_proj_bias.copy_(layer.qkv.bias)
            mha.out_proj.bias.copy_(layer.out_proj.bias)
    return mha.eval()


def x_of(b: int = 3, s: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, s, E, generator=torch.Generator().manual_seed(seed))


KPM = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1]],
                   dtype=torch.bool)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_multihead_attention(bias: bool, causal: bool, padded: bool) -> None:
    torch.manual_seed(0)
    layer = Attention(E, H, causal=causal, bias=bias).eval()
    mha = mha_like(layer)
    x = x_of()
    xa, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    kpm = KPM if padded else None
    got = layer(xa, key_padding_mask=kpm)
    cm = ~torch.ones(9, 9, dtype=torch.bool).tril() if causal else None  # MHA: True = masked out
    want, _ = mha(xm, xm, xm, attn_mask=cm, key_padding_mask=None if kpm is None else ~kpm, need_weights=False)
    rows = KPM if padded else torch.ones(3, 9, dtype=torch.bool)
    torch.testing.assert_close(got[rows], want[rows])
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)) * rows[..., None]
    (got * grad).sum().backward()
    (want * grad).sum().backward()
    torch.testing.assert_close(xa.grad, xm.grad)
    torch.testing.assert_close(layer.qkv.weight.grad, mha.in_proj_weight.grad)
    torch.testing.assert_close(layer.out_proj.weight.grad, mha.out_proj.weight.grad)


def test_attn_mask_bool_and_float_and_with_key_padding() -> None:
    layer = Attention(E, H).eval()
    mha = mha_like(layer)
    x = x_of()
    allowed = torch.rand(9, 9, generator=torch.Generator().manual_seed(3)) < 0.7
    allowed.fill_diagonal_(True)
    additive = torch.zeros(9, 9).masked_fill(~allowed, float("-inf"))
    want, _ = mha(x, x, x, attn_mask=~allowed, need_weights=False)
    torch.testing.assert_close(layer(x, attn_mask=allowed), want)
    torch.testing.assert_close(layer(x, attn_mask=additive), want)
    want, _ = mha(x, x, x, attn_mask=~allowed, key_padding_mask=~KPM, need_weights=False)
    rows = KPM & (allowed[None] & KPM[:, None, :]).any(-1)  # queries that see a key
    torch.testing.assert_close(layer(x, attn_mask=allowed, key_padding_mask=KPM)[rows], want[rows])


def test_fully_padded_sequence_gives_bias_not_nan() -> None:
    """A sequence whose keys are all padding: MHA's fast path (eval, no grad) gives NaN, its regular path
    out_proj(0) = the output bias; the varlen path gives that too."""
    layer = Attention(E, H).eval()
    with torch.no_grad():
        layer.out_proj.bias.normal_()
    mha = mha_like(layer)
    kpm = KPM.clone()
    kpm[1] = False
    x = x_of()
    out = layer(x, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], layer.out_proj.bias.expand(9, E))
    with torch.no_grad():
        fast, _ = mha(x, x, x, key_padding_mask=~kpm, need_weights=False)
    assert torch.isnan(fast[1]).all()
    mha.train()  # dropout is 0: the same maths, through the regular path
    regular, _ = mha(x, x, x, key_padding_mask=~kpm, need_weights=False)
    torch.testing.assert_close(out[kpm], regular[kpm])
    torch.testing.assert_close(out[1], regular[1])


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_explicit_repetition(kv_heads: int) -> None:
    torch.manual_seed(0)
    gqa = Attention(E, H, num_kv_heads=kv_heads, causal=True).eval()
    full = Attention(E, H, causal=True).eval()
    d, rep = E // H, H // kv_heads
    with torch.no_grad():
        w, b = gqa.qkv.weight, gqa.qkv.bias
        q, k, v = w.split([H * d, kv_heads * d, kv_heads * d])
        qb, kb, vb = b.split([H * d, kv_heads * d, kv_heads * d])

        def repeat(t: torch.Tensor) -> torch.Tensor:  # head h of the full layer reads kv head h // rep
            return t.view(kv_heads, d, *t.shape[1:]).repeat_interleave(rep, 0).reshape(H * d, *t.shape[1:])

        full.qkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
        full.qkv.bias.copy_(torch.cat([qb, repeat(kb), repeat(vb)]))
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
    assert gqa.qkv.weight.shape == ((H + 2 * kv_heads) * d, E)
    x = x_of()
    torch.testing.assert_close(gqa(x), full(x))
    torch.testing.assert_close(gqa(x, key_padding_mask=KPM)[KPM], full(x, key_padding_mask=KPM)[KPM])


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_input_equals_padded_input_on_real_rows(causal: bool) -> None:
    layer = Attention(E, H, num_kv_heads=2, causal=causal).eval()
    x = x_of().requires_grad_()
    padded = layer(x, key_padding_mask=KPM)
    batch = varlen.from_padded(x[:, :, None], key_padding_mask=KPM)  # values (T, 1, E)
    out = layer(batch)
    assert isinstance(out, varlen.VarlenBatch) and out.values.shape == (int(KPM.sum()), 1, E)
    assert out.seqlens == batch.seqlens
    back = out.to_padded().values[:, :, 0]
    torch.testing.assert_close(back[KPM], padded[KPM])
    seqs = [x[i][KPM[i]].detach() for i in range(3)]  # and from a list of ragged sequences, values (T, E)
    packed = varlen.pack([s[:, None] for s in seqs])
    flat = varlen.VarlenBatch(packed.values[:, 0], packed.cu_seqlens, packed.max_seqlen, packed.seqlens)
    torch.testing.assert_close(layer(flat).values, out.values[:, 0])
    (back[KPM].sum()).backward()
    assert x.grad is not None and torch.equal(x.grad[~KPM], torch.zeros_like(x.grad[~KPM]))


def test_dropout_only_in_training() -> None:
    layer = Attention(E, H, dropout=0.5)
    x = x_of()
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    with pytest.warns(UserWarning, match="fell back"):  # CPU: dropout runs on the math backend
        torch.manual_seed(0)
        a = layer(x)
    torch.manual_seed(0)
    torch.testing.assert_close(layer(x), a)
    layer.eval()
    assert float((a - layer(x)).detach().abs().max()) > 1e-3


def test_policy_is_configurable() -> None:
    layer = Attention(E, H, policy="math").eval()
    x = x_of(s=16)  # 16 tokens: fewer, unmasked, are not for CPU flash (pytorch/pytorch#141128, the denylist)
    assert sdpa_flash.testing.ran_backends(layer, x) == {"math"}
    layer.policy = "flash"
    assert sdpa_flash.testing.ran_backends(layer, x) == {"flash"}
    with pytest.raises(sdpa_flash.BackendUnavailableError):
        Attention(E, H, policy="cudnn")(x)


def test_state_dict_round_trip() -> None:
    a = Attention(E, H, num_kv_heads=2, causal=True)
    b = Attention(E, H, num_kv_heads=2, causal=True)
    assert set(a.state_dict()) == {"qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias"}
    b.load_state_dict(a.state_dict())
    x = x_of()
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        Attention(E, H).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(embed_dim=30, num_heads=4), "divisible by num_heads"),
     (dict(embed_dim=32, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
     (dict(embed_dim=32, num_heads=4, dropout=1.0), r"dropout to be a float in \[0, 1\)"),
     (dict(embed_dim=32, num_heads=4, dropout=-0.1), "dropout"),
     (dict(embed_dim=0, num_heads=4), "embed_dim to be a positive int"),
     (dict(embed_dim=32, num_heads=0), "num_heads to be a positive int")],
)
def test_bad_constructor_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(sdpa_flash.AttentionInputError, match=match):
        Attention(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs_raise() -> None:
    layer = Attention(E, H)
    with pytest.raises(sdpa_flash.AttentionInputError, match=r"\(B, S, 32\)"):
        layer(torch.randn(2, 5, 16))
    batch = varlen.pack([torch.randn(3, 2, 8)])
    with pytest.raises(sdpa_flash.AttentionInputError, match="VarlenBatch values"):
        layer(batch)
    with pytest.raises(sdpa_flash.AttentionInputError, match="lengths are the mask"):
        layer(varlen.pack([torch.randn(3, 1, E)]), key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
