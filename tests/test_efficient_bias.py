"""The efficient kernel's bias layout (checked by the kernel on CUDA; the layout itself is plain data)."""

from __future__ import annotations

import pytest
import torch

from sdpa_flash.backends.efficient import _aligned_bias


@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (2, 1, 1, 5), (5,), (3, 5), (2, 4, 3, 5), (1, 4, 1, 1), (2, 1, 3, 1),
                                   (2, 4, 3, 16)])
def test_bias_is_exact_contiguous_in_keys_and_16_aligned(shape: tuple[int, ...]) -> None:
    # found by the GPU property run: a (B, 1, 1, Sk) key mask with Sk = 1 has batch stride 1, which the
    # kernel refuses ("attn_bias is not correctly aligned (strideB)")
    bias = torch.randn(shape)
    out = _aligned_bias(bias, 2, 4, 3, shape[-1] if shape[-1] != 1 else 5)
    assert torch.equal(out, bias.expand(out.shape))
    assert out.stride(-1) == 1
    assert all(s % 16 == 0 for s in out.stride()[:-1])
