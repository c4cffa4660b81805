"""The memory-bounded exact fallback: equal to math forward and backward, chosen when math would not fit."""

from __future__ import annotations

import warnings

import pytest
import torch

import sdpa_flash
import sdpa_flash.backends.chunked as chunked_mod
from sdpa_flash import AttentionInputError, BackendUnavailableError
from sdpa_flash.policy import parse_bytes, resolve_policy
from sdpa_flash.testing import assert_close_to_reference, reference_attention


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Blocks of at most 16x16 (B=2, H=2, float64) so every test walks many tiles, including ragged edges.
    monkeypatch.setattr(chunked_mod, "_BLOCK_BYTES", 2 * 2 * 16 * 16 * 8)


def _check(dtype: torch.dtype, sq: int, sk: int, causal: bool | str, mask: str | None, hk: int = 2, *,
           batch: int = 2, heads: int = 2, head_dim: int = 16) -> None:
    g = torch.Generator().manual_seed(sq * 131 + sk)
    b, h, d = batch, heads, head_dim
    base = [torch.randn(b, h, sq, d, generator=g), torch.randn(b, hk, sk, d, generator=g),
            torch.randn(b, hk, sk, 8, generator=g)]
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(b, 1, sq, sk, generator=g) < 0.85
    elif mask == "float":
        attn_mask = torch.randn(sq, sk, generator=g).to(dtype)
    grad = torch.randn(b, h, sq, 8, generator=g).to(dtype)
    leaves = [t.to(dtype).requires_grad_() for t in base]
    out = sdpa_flash.attention(*leaves, attn_mask=attn_mask, causal=causal, policy="chunked")
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.double().requires_grad_() for t in base]
    ref = reference_attention(*ref_leaves, attn_mask=attn_mask, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    if dtype == torch.float64:  # the same-dtype reference is the float64 one
        same, same_grads = ref, ref_grads
    else:
        same_leaves = [t.to(dtype).requires_grad_() for t in base]
        same = reference_attention(*same_leaves, attn_mask=attn_mask, causal=causal, dtype=None)
        same_grads = torch.autograd.grad(same, same_leaves, grad)
    assert_close_to_reference([out, *grads], [same, *same_grads], [ref, *ref_grads])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"], ids=["full", "top_left", "bottom_right"])
@pytest.mark.parametrize(("sq", "sk"), [(40, 40), (24, 70), (70, 24)])
def test_chunked_matches_math(dtype: torch.dtype, causal: bool | str, sq: int, sk: int) -> None:
    _check(dtype, sq, sk, causal, None)


@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_chunked_with_masks_and_gqa(mask: str, causal: bool | str) -> None:
    _check(torch.float64, 33, 47, causal, mask, hk=1)


# Tiles at the diagonal. A causal mask crosses each query tile's last visible key tile somewhere inside it; an
# off-by-one in which key tiles a query tile visits shows only where a tile edge meets that diagonal, which the
# shapes above never do (a bug visiting keys < q1 - 1 + offset instead of <= passed them and gave O(1) errors at
# S=17 with 16x16 tiles). Every query length up to two tiles and one more row, against every key length up to two
# tiles and one more key, puts the diagonal (key = query + offset; offset = Sk - Sq bottom-right, 0 top-left) of
# the first and the later query tiles at every position relative to every key-tile edge: on a tile's first and
# last key, just before a tile, before the first tile and past the last, with ragged last tiles, Sq < Sk and
# Sq > Sk. Square tiles, and both kinds of non-square tiles (one query tile spanning several key tiles, and the
# reverse; their tile ends also fall at every residue of the other's size).
_TILES = [(4, 4), (3, 5), (5, 3)]


def _tile_sizes(bq: int, bk: int) -> list[tuple[int, int]]:
    return [(sq, sk) for sq in range(1, 2 * bq + 2) for sk in range(1, 2 * bk + 2)]


@pytest.mark.parametrize("corner", ["top_left", "bottom_right"])
@pytest.mark.parametrize("tiles", _TILES, ids=[f"{bq}x{bk}" for bq, bk in _TILES])
def test_causal_tiles_at_every_diagonal_alignment(
    tiles: tuple[int, int], corner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunked_mod, "_block_sizes", lambda *_: tiles)
    causal: bool | str = True if corner == "top_left" else corner
    for sq, sk in _tile_sizes(*tiles):
        try:
            _check(torch.float64, sq, sk, causal, None, hk=1, batch=1, heads=1)
        except AssertionError as exc:
            raise AssertionError(f"Sq={sq}, Sk={sk}, {corner}, {tiles[0]}x{tiles[1]} tiles: {exc}") from None


@pytest.mark.parametrize("causal", [True, "bottom_right"], ids=["top_left", "bottom_right"])
@pytest.mark.parametrize(("sq", "sk"), [(1025, 1025), (1025, 1100), (1100, 1025)])
def test_default_tiles_at_the_diagonal(
    causal: bool | str, sq: int, sk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The production tiles (1024 queries by 1024 keys here): the last query rows are a second tile whose diagonal
    # key starts the second key tile (Sq = Sk = 1025), or lies inside it, or before it. float32, so the bound comes
    # from the same-dtype reference's own error over 1025-key sums.
    monkeypatch.setattr(chunked_mod, "_BLOCK_BYTES", 64 * 2**20)
    assert chunked_mod._block_sizes(1, 1, sq, sk, 4) == (1024, 1024)
    _check(torch.float32, sq, sk, causal, None, hk=1, batch=1, heads=1, head_dim=8)


def test_fully_masked_rows_are_zero_with_zero_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    kv = torch.randn(1, 1, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    out = sdpa_flash.attention(q, kv, kv, causal="bottom_right", policy="chunked")  # rows 0-2 see no key
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 8, dtype=torch.float64))
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, :3], torch.zeros(3, 8, dtype=torch.float64))
    assert torch.isfinite(kv.grad).all()


def test_dropout_is_declined_with_a_reason() -> None:
    q = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BackendUnavailableError, match="dropout_p > 0 is not supported"):
        sdpa_flash.attention(q, q, q, dropout_p=0.1, policy="chunked")


def test_auto_prefers_chunked_when_math_exceeds_the_budget() -> None:
    q = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(0))
    pol = resolve_policy("auto", memory_budget=1000)
    assert sdpa_flash.explain(q, q, q, policy=pol).backend == "flash"  # fused kernels first; the budget is math's
    # CPU flash has no dropout, so "auto" would fall to math, which is over budget here: chunked declines
    # dropout too, so nothing can run, and the error says why for each.
    with pytest.raises(BackendUnavailableError, match="over the memory budget of 1000 B"):
        sdpa_flash.explain(q, q, q, dropout_p=0.1, policy=pol)
    plan = sdpa_flash.explain(q, q, q, policy=resolve_policy(["math", "chunked"], memory_budget=1000))
    assert plan.backend == "chunked" and plan.fallback
    assert "over the memory budget of 1000 B" in plan.reasons["math"][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdpa_flash.attention(q, q, q, policy=resolve_policy(["math", "chunked"], memory_budget=1000))
    assert any("fell back to the chunked backend" in str(w.message) for w in caught)
    # A strict math policy is obeyed whatever the budget.
    assert sdpa_flash.explain(q, q, q, policy=resolve_policy("math", memory_budget=1000)).backend == "math"


def test_budget_from_use_policy_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 2, 64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with sdpa_flash.use_policy(["math", "chunked"], memory_budget="1KiB"):
        assert sdpa_flash.explain(q, q, q).backend == "chunked"
        with pytest.warns(UserWarning, match="fell back to the chunked backend"):
            out = sdpa_flash.attention(q, q, q)
    torch.testing.assert_close(out, reference_attention(q, q, q))
    monkeypatch.setenv("SDPA_FLASH_MEMORY_BUDGET", "lots")
    monkeypatch.setattr(sdpa_flash.policy, "_env_policy", None)
    with pytest.raises(AttentionInputError, match="SDPA_FLASH_MEMORY_BUDGET"):
        sdpa_flash.get_policy()
    monkeypatch.setenv("SDPA_FLASH_MEMORY_BUDGET", "2 GiB")
    monkeypatch.setattr(sdpa_flash.policy, "_env_policy", None)
    assert sdpa_flash.get_policy().memory_budget == 2 * 2**30
    monkeypatch.setattr(sdpa_flash.policy, "_env_policy", None)


@pytest.mark.parametrize(
    ("text", "value"), [("8GiB", 8 * 2**30), ("512 MB", 512 * 10**6), (4096, 4096), ("1.5kb", 1500)]
)
def test_parse_bytes(text: int | str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "-1GB", "8 parsecs", 0, -5, True, 1.5])
def test_parse_bytes_rejects(bad: object) -> None:
    with pytest.raises(AttentionInputError, match="Expected size"):
        parse_bytes(bad)  # type: ignore[arg-type]


def test_chunked_refuses_a_mask_that_needs_grad() -> None:
    q = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(8, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(BackendUnavailableError, match="attn_mask requires grad"):
        sdpa_flash.attention(q, q, q, attn_mask=bias, policy="chunked")  # refused by the plan, with the reason
    with pytest.raises(sdpa_flash.SdpaFlashError, match="does not propagate gradients to attn_mask"):
        chunked_mod.chunked_attention(q, q, q, bias=bias)  # and by the function itself, called directly
