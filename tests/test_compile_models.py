"""``torch.compile`` over models that use sdpa_flash: ``sdpa_flash.nn.Attention``, a tiny Hugging Face model with
``attn_implementation="sdpa_flash"``, and ``attention(..., key_padding_mask=...)`` — each in one graph
(``fullgraph=True``, 0 graph breaks by ``torch._dynamo.explain``), equal to eager, and compiled once for repeated
calls with the same shapes (counted by a compile-counter backend). ``varlen_attention()`` plans on host lengths:
it graph-breaks (documented here) and still works under default ``torch.compile``.

Compiled paths trace the same kernels as eager ones, so results are compared with ``torch.testing.assert_close``'s
float32 defaults; on the CPU they are in fact bit-identical.

GPU (``@pytest.mark.sm80``, skipped without one): CUDA-graph capture and replay of a training step through
``attention()``, with replayed gradients equal to eager ones.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import sdpa_flash
from sdpa_flash import varlen
from sdpa_flash.nn import Attention

KPM = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def no_breaks(fn: object, *args: object) -> None:
    result = torch._dynamo.explain(fn)(*args)
    assert result.graph_break_count == 0, result.break_reasons
    assert result.graph_count == 1


# --------------------------------------------------------------------------------- sdpa_flash.nn.Attention
@pytest.mark.parametrize("padded", [False, True])
def test_nn_attention_compiles_fullgraph_once(padded: bool) -> None:
    torch.manual_seed(0)
    layer = Attention(32, 4, num_kv_heads=2, causal=True)
    kpm = KPM if padded else None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return layer(x, key_padding_mask=kpm)

    x = torch.randn(3, 8, 32)
    no_breaks(fn, x)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    rows = KPM if padded else torch.ones(3, 8, dtype=torch.bool)
    for seed in range(4):  # new values, same shapes: one compilation
        x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        xe = x.detach().clone().requires_grad_()
        got, want = compiled(x), fn(xe)
        torch.testing.assert_close(got[rows], want[rows])
        got[rows].sum().backward()
        want[rows].sum().backward()
        torch.testing.assert_close(x.grad, xe.grad)
    assert counter.frame_count == 1


def test_nn_attention_varlen_input_works_under_default_compile() -> None:
    layer = Attention(32, 4, causal=True).eval()
    batch = varlen.pack([torch.randn(5, 1, 32), torch.randn(3, 1, 32)])
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(batch).values, layer(batch).values)


# ----------------------------------------------------------------------- attention(key_padding_mask=...)
def test_key_padding_mask_compiles_to_one_dense_graph() -> None:
    """While tracing, attention() routes key_padding_mask to the dense masked path (lengths can't be read)."""
    q = torch.randn(3, 4, 8, 16)

    def fn(q: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, q, q, key_padding_mask=m, causal=True)

    no_breaks(fn, q, KPM)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for seed in range(3):
        qs = torch.randn(3, 4, 8, 16, generator=torch.Generator().manual_seed(seed))
        mask = KPM.roll(seed, dims=1)  # other values of the mask, same shape
        mask[:, 0] |= ~mask.any(1)
        torch.testing.assert_close(compiled(qs, mask).transpose(1, 2)[mask], fn(qs, mask).transpose(1, 2)[mask])
    assert counter.frame_count == 1


def test_key_padding_mask_padded_rows_are_zero_under_compile() -> None:
    q = torch.randn(3, 4, 8, 16)

    def fn(q: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return sdpa_flash.attention(q, q, q, key_padding_mask=m, causal=True)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, KPM)
    assert torch.equal(out.transpose(1, 2)[~KPM], torch.zeros_like(out.transpose(1, 2)[~KPM]))


# --------------------------------------------------------------------------------------- varlen_attention
def test_varlen_attention_graph_breaks_but_works_under_default_compile() -> None:
    """varlen_attention() plans on the host (lengths, a cached plan, the policy's context variable): dynamo
    breaks the graph there, so fullgraph=True is refused; default torch.compile runs it correctly."""
    q = varlen.pack([torch.randn(5, 4, 16), torch.randn(3, 4, 16)])

    def fn(b: varlen.VarlenBatch) -> torch.Tensor:
        return varlen.varlen_attention(b, b, b, causal=True).values

    result = torch._dynamo.explain(fn)(q)
    assert result.graph_break_count > 0  # if this fails, varlen became traceable: say so in the docs
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q)
    torch._dynamo.reset()
    leaf = q.values.detach().clone().requires_grad_()
    qb = q.with_values(leaf)
    out = torch.compile(fn, backend="aot_eager")(qb)
    torch.testing.assert_close(out, fn(q))
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


# ---------------------------------------------------------------------------------- a transformers model
def test_hf_model_with_sdpa_flash_compiles_fullgraph() -> None:
    """0 graph breaks from sdpa_flash. transformers' own code may break on some transformers/torch pairs (on the H200
    image, torch 2.11, its lazy-module imports in the Llama forward did, with ``"sdpa"`` too): then the test holds us to
    the built-in ``"sdpa"`` implementation's count, with no break inside sdpa_flash, and to no recompiles."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sdpa_flash.integrations import transformers as hf

    hf.register()
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    mask = KPM.long()
    ids = torch.randint(0, 128, (3, 8))

    def forward_of(impl: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl).eval()

        def fn(ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, attention_mask=am, use_cache=False).logits

        return fn

    fn = forward_of("sdpa_flash")
    with torch.no_grad():
        ours = torch._dynamo.explain(fn)(ids, mask)
        torch._dynamo.reset()
        theirs = torch._dynamo.explain(forward_of("sdpa"))(ids, mask)
        torch._dynamo.reset()
        package = str(pathlib.Path(sdpa_flash.__file__).parent)
        in_us = [r for r in ours.break_reasons if any(f.filename.startswith(package) for f in r.user_stack)]
        assert not in_us, in_us
        assert ours.graph_break_count == theirs.graph_break_count, (ours.break_reasons, theirs.break_reasons)
        fullgraph = theirs.graph_break_count == 0
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, fullgraph=fullgraph, backend=counter)
        frames = []
        for seed in range(3):
            ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(ids, mask)[KPM], fn(ids, mask)[KPM])
            frames.append(counter.frame_count)
    assert frames[0] == frames[-1] == (1 if fullgraph else frames[0]) and frames[0] >= 1, frames


# -------------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.sm80
def test_cuda_graph_replay_of_a_training_step_matches_eager() -> None:
    """Capture forward + backward of an sdpa_flash.nn.Attention layer (fused kernels, bf16) in a CUDA graph with
    ``torch.cuda.make_graphed_callables``; replays on new inputs give eager's outputs and gradients."""
    torch.manual_seed(0)
    dev = "cuda"
    layer = Attention(256, 4, num_kv_heads=2, causal=True, policy="fused").to(dev, torch.bfloat16)
    eager = copy.deepcopy(layer)
    sample = torch.randn(2, 128, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (sample,), num_warmup_iters=3)
    for seed in range(3):
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(2, 128, 256, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        xe = x.detach().clone().requires_grad_()
        grad_out = torch.randn(2, 128, 256, device=dev, dtype=torch.bfloat16, generator=g)
        for p in (*layer.parameters(), *eager.parameters()):
            p.grad = None
        out = graphed(x)
        out.backward(grad_out)
        want = eager(xe)
        want.backward(grad_out)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=0, atol=0)  # the same forward kernels on the same inputs
        # Backward kernels may accumulate dQ with float32 atomics, whose order differs run to run: allow bf16
        # rounding of that, 2 bf16 units relative (assert_close's bfloat16 rtol) and 2 units of each tensor's
        # largest value absolute (elements that cancel to ~0).
        eps = torch.finfo(torch.bfloat16).eps
        torch.testing.assert_close(x.grad, xe.grad, rtol=2 * eps, atol=2 * eps * float(xe.grad.abs().max()))
        for (name, p), pe in zip(layer.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, pe.grad, rtol=2 * eps, atol=2 * eps * float(pe.grad.abs().max()),
                                       msg=lambda m, n=name: f"{n}: {m}")
