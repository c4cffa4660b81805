"""A flash-attn-2-compatible API over sdpa_flash: model code written for flash-attn 2.8 runs unchanged.

The functions below take flash-attn 2.8's arguments, in its order and with its defaults, and return what it
returns. Each call is planned onto one exact path (see :func:`explain_flash_attn`):

* ``sdpa`` — :func:`sdpa_flash.attention` with ``layout="bshd"`` and bottom-right causal masking (the policy's
  fused kernels, no copy), or the varlen entry point for packed sequences. Windows and softcap go here too when the
  one planner gives them a fused kernel that does them natively (FlashAttention-4 with ``sdpa_flash[fa4]`` on
  Hopper/Blackwell; PyTorch's flash kernel for windows; FlexAttention, the ``flex`` backend, for softcap on CUDA):
  the same ranking, tuned table and denylist as
  ``attention(window=..., softcap=...)``; the plan names the kernel (:attr:`CompatPlan.kernel`);
* ``flex`` — ALiBi, and windows / softcap the policy's kernels do not take, on CUDA: PyTorch's FlexAttention,
  compiled once per call structure;
* ``masked`` — windows / ALiBi elsewhere: :func:`sdpa_flash.attention` with a boolean mask / float bias;
* ``exact`` — anything else (softcap on the CPU, dropout with softcap, ``return_attn_probs`` with dropout, a
  deterministic backward on CUDA): tiled plain PyTorch with its own backward.

Contract decisions (where flash-attn leaves room, or where its kernel and its documentation differ):

* a query row that sees no key (bottom-right causal with ``Sq > Sk``, windows, zero-length keys) gives 0 and a
  ``softmax_lse`` of ``+inf`` — what flash-attn's kernel writes;
* ``softmax_lse`` is ``(B, H, Sq)`` float32 for dense and kvcache calls and ``(H, total_q)`` for varlen calls
  (float64 for float64 inputs); it is the log-sum-exp of the documented scores, ALiBi included. (With
  ``causal=True`` and ALiBi flash-attn's kernel adds ``slope * j`` instead of ``-slope * |i + Sk - Sq - j|``: the
  same output, but its lse is shifted by ``slope * (i + Sk - Sq)``; we return the documented value.)
  It carries no gradient (flash-attn ignores gradients flowing into it too);
* ``S_dmask`` (the third value of ``return_attn_probs=True``) is an empty tensor when ``dropout_p == 0``, as in
  flash-attn 2.8; with dropout it is the ``(B, H, Sq, Sk)`` probability matrix in q's dtype with dropped entries
  negated (not rounded up to multiples of 128), computed by the exact path so it matches the output's dropout;
* ``softcap < 0`` is an error (flash-attn silently disables it); float32/float64 inputs, any head dim and
  ``Dv != D`` are accepted; ``max_seqlen_q/k`` smaller than the longest sequence is an error (flash-attn would skip
  rows); ``num_splits`` is accepted and ignored (it only changes flash-attn's work split);
* arguments this layer cannot compute exactly raise :class:`UnsupportedArgumentError` naming them;
  invalid ones raise :class:`~sdpa_flash.AttentionInputError`.

``install()`` makes ``import flash_attn`` resolve here when the real package is absent: ``flash_attn``,
``flash_attn.flash_attn_interface`` and ``flash_attn.bert_padding``, with the public names above. flash-attn's private
kernel entry points (``flash_attn_gpu``, ``_flash_attn_forward``, ``_flash_attn_varlen_forward``, their backwards,
``_get_block_size_n``) are deliberately not provided: importing one raises :class:`NotProvidedError` (an
``ImportError``) saying so. Neither are flash-attn's other submodules (``flash_attn.layers.rotary``,
``flash_attn.modules.mha``, ``flash_attn.ops``, ...): importing one raises a :class:`NotProvidedError` that is also
a ``ModuleNotFoundError``, naming what this layer provides (``importlib.util.find_spec`` on such a name raises it
too, while the layer is installed).
"""

from __future__ import annotations

from ._common import Features, UnsupportedArgumentError
from ._explain import explain_flash_attn
from ._install import FLASH_ATTN_VERSION, NotProvidedError, install, installed, uninstall
from ._interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from ._kvcache import apply_rotary, flash_attn_with_kvcache
from ._plan import PATHS, CompatPlan, CompatSpec, use_path

__all__ = [
    "FLASH_ATTN_VERSION",
    "PATHS",
    "CompatPlan",
    "CompatSpec",
    "Features",
    "NotProvidedError",
    "UnsupportedArgumentError",
    "apply_rotary",
    "explain_flash_attn",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "install",
    "installed",
    "uninstall",
    "use_path",
]
