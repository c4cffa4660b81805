"""sdpa_flash: fast attention as a one-line, explainable decision over PyTorch's SDPA kernels.

Example:
    >>> import torch, sdpa_flash
    >>> q = k = v = torch.randn(1, 4, 64, 32)
    >>> out = sdpa_flash.attention(q, k, v, causal=True)
    >>> str(sdpa_flash.explain(q, k, v, causal=True)).split()[0]
    'flash'
"""

from __future__ import annotations

from . import _torch_import  # noqa: F401  (first: imports torch without its NumPy warning on the command line)
from ._warmup import WarmupResult, warmup
from .attention import attention, explain
from .backends import Backend, KernelCall, Requirements, register_backend, unregister_backend
from .capability import Capabilities, capabilities
from .errors import (
    AttentionInputError,
    BackendUnavailableError,
    KernelFailedError,
    SdpaFlashError,
    ShadowMismatchError,
)
from .planner import DenylistEntry, Plan, add_denylist_entry, denylist, plan, remove_denylist_entry
from .policy import Policy, get_policy, set_policy, use_policy
from .require import require
from .spec import AttentionSpec
from .stats import FallbackStat, ShadowMismatch, ShadowStats, Stats, reset_stats, stats
from .tuning import tune

__version__ = "0.1.0"

__all__ = [
    "AttentionInputError",
    "AttentionSpec",
    "Backend",
    "BackendUnavailableError",
    "Capabilities",
    "DenylistEntry",
    "FallbackStat",
    "KernelCall",
    "KernelFailedError",
    "Plan",
    "Policy",
    "Requirements",
    "SdpaFlashError",
    "ShadowMismatch",
    "ShadowMismatchError",
    "ShadowStats",
    "Stats",
    "WarmupResult",
    "__version__",
    "add_denylist_entry",
    "attention",
    "capabilities",
    "denylist",
    "explain",
    "get_policy",
    "plan",
    "register_backend",
    "remove_denylist_entry",
    "require",
    "reset_stats",
    "set_policy",
    "stats",
    "tune",
    "unregister_backend",
    "use_policy",
    "warmup",
]
