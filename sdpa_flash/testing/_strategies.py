"""Hypothesis strategies of attention problems; ``hypothesis`` is imported when a strategy is built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._problems import _DATA, _MASK_SHAPES, _MASKS, AttentionProblem, ProblemParams

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

    from ..capability import Capabilities

__all__ = ["attention_problems"]


def attention_problems(
    backend: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtypes: Sequence[torch.dtype] | None = None,
    min_batch: int = 1,
    max_batch: int = 2,
    max_heads: int = 4,
    min_seqlen: int = 1,
    max_seqlen: int = 24,
    seqlens: Sequence[int] | None = None,
    head_dims: Sequence[int] | None = None,
    max_head_dim: int = 16,
    shapes: Sequence[tuple[int, int, int, int, int, int, int]] | None = None,
    layouts: Sequence[str] = ("bhsd", "bshd"),
    causal: Sequence[bool | str] = (False, True, "bottom_right"),
    masks: Sequence[str] = _MASKS,
    data: Sequence[str] = _DATA,
    gqa: bool = True,
    min_group: int = 1,
    backward: bool = False,
    capabilities: Capabilities | None = None,
) -> SearchStrategy[AttentionProblem]:
    """A hypothesis strategy of :class:`AttentionProblem` that ``backend`` claims to handle on ``device``.

    Sizes, dtypes, masks and head dims are drawn within what the backend's requirements allow, and every
    drawn problem is then filtered through :func:`sdpa_flash.plan` with that backend as a strict policy (the
    backend's own ``not_supported_reasons``, the denylist and, on a real GPU, PyTorch's check), so the
    backend must run each one. Without ``backend``, any valid problem is drawn. Dropout is always off.

    Args:
        backend: ``"flash"``, ``"cudnn"``, ``"efficient"``, ``"math"``, ``"chunked"`` or ``None``.
        device: where the tensors go.
        dtypes: dtypes to draw from (default: every dtype the backend takes there).
        min_batch, max_batch, max_heads, min_seqlen, max_seqlen, max_head_dim: size limits (B, Hq, Sq and Sk,
            D and Dv).
        seqlens: lengths drawn as often as the whole ``min_seqlen..max_seqlen`` range (e.g. a kernel's tile
            edges ``63, 64, 65``), for Sq and Sk each.
        head_dims: head dims to draw from instead of ``1..max_head_dim``.
        shapes: ``(B, Hq, Hkv, Sq, Sk, D, Dv)`` tuples to draw the sizes from instead, a pool of shapes that
            repeat, for kernels that build a plan per distinct shape (cuDNN); of the limits above only
            ``min_batch``, ``min_seqlen``, ``min_group``, ``gqa`` and the backend's own apply.
        layouts, causal, masks, data: the kinds to draw from (see :class:`ProblemParams`).
        gqa: draw fewer key/value heads than query heads too.
        min_group: the fewest query heads per key/value head (2 draws only GQA/MQA problems).
        backward: include an upstream gradient (and ask the backend for a backward).
        capabilities: the device's :class:`~sdpa_flash.Capabilities` (default: probed).

    Example:
        >>> from hypothesis import given
        >>> @given(attention_problems("flash", backward=True))
        ... def test_flash(problem):
        ...     assert_close_to_reference(attention_outputs(problem, policy="flash"), problem)
    """
    from hypothesis import assume
    from hypothesis import strategies as st

    from ..backends import BACKENDS
    from ..capability import capabilities as probe
    from ..errors import BackendUnavailableError
    from ..planner import plan
    from ..policy import resolve_policy

    dev = torch.device(device)
    caps = capabilities or probe(dev)
    req = BACKENDS[backend].requirements(dev.type) if backend else None
    if backend and req is None:
        raise ValueError(f"Expected a backend with kernels for {dev.type}, but {backend!r} has none there.")
    all_dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    dtype_pool = [d for d in (dtypes or all_dtypes) if req is None or d in req.dtypes]
    if not dtype_pool:
        raise ValueError(f"Expected dtypes that {backend} takes, but got {list(dtypes or ())} instead.")
    mask_kinds = [m for m in masks if m == "none" or req is None or req.mask]
    if not mask_kinds:
        raise ValueError(f"Expected mask kinds that {backend} takes on {dev.type} ('none'), but got {list(masks)}.")
    policy = resolve_policy(backend) if backend else None
    dims = sorted(set(head_dims)) if head_dims else list(range(1, max_head_dim + 1))
    pool = None
    if shapes is not None:
        limit = req.max_head_dim if req is not None and req.max_head_dim is not None else None
        pool = [t for t in shapes if (limit is None or max(t[5], t[6]) <= limit) and t[0] >= min_batch
                and min(t[3], t[4]) >= min_seqlen and t[1] // max(t[2], 1) >= min_group and (gqa or t[1] == t[2])
                and (req is None or not req.same_head_dim_v or t[5] == t[6])]
        if not pool or any(len(t) != 7 or t[1] % t[2] for t in pool):
            raise ValueError(f"Expected (B, Hq, Hkv, Sq, Sk, D, Dv) shapes with Hq % Hkv == 0 that {backend} takes, "
                             f"but got {list(shapes)} instead.")
    lengths = st.integers(min_seqlen, max_seqlen)
    if seqlens:
        lengths = st.one_of(lengths, st.sampled_from(sorted(set(seqlens))))
    if req is not None and req.max_head_dim is not None:
        dims = [d for d in dims if d <= req.max_head_dim]
    if not dims:
        raise ValueError(f"Expected head dims that {backend} takes on {dev.type}, but none of those asked for fit.")

    @st.composite
    def draw(draw_: Callable[..., Any]) -> AttentionProblem:
        dtype = draw_(st.sampled_from(dtype_pool))
        if pool is not None:
            batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v = draw_(st.sampled_from(pool))
        else:
            heads_kv = draw_(st.integers(1, max(1, max_heads // min_group)))
            heads_q = heads_kv * (draw_(st.integers(min_group, max(min_group, max_heads // heads_kv))) if gqa else 1)
            head_dim = draw_(st.sampled_from(dims))
            same_v = req is not None and req.same_head_dim_v
            head_dim_v = head_dim if same_v or draw_(st.booleans()) else draw_(st.sampled_from(dims))
            batch = draw_(st.integers(min_batch, max(min_batch, max_batch)))
            seqlen_q, seqlen_k = draw_(lengths), draw_(lengths)
        mask = draw_(st.sampled_from(mask_kinds))
        params = ProblemParams(
            dtype=dtype,
            batch=batch,
            heads_q=heads_q,
            heads_kv=heads_kv,
            seqlen_q=seqlen_q,
            seqlen_k=seqlen_k,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            layout=draw_(st.sampled_from(list(layouts))),
            causal=draw_(st.sampled_from(list(causal))),
            mask=mask,
            mask_shape=draw_(st.sampled_from(_MASK_SHAPES)) if mask in ("bool", "float") else "full",
            mask_density=draw_(st.sampled_from((0.3, 0.7, 0.95))) if mask != "none" else 0.7,
            scale=draw_(st.one_of(st.none(), st.floats(0.05, 2.0))),
            data=draw_(st.sampled_from(list(data))),
            seed=draw_(st.integers(0, 2**31 - 1)),
            backward=backward,
        )
        if policy is not None:
            try:
                plan(params.spec(dev.type), caps, policy)
            except BackendUnavailableError:
                assume(False)
        return params.build(dev)

    return draw()
