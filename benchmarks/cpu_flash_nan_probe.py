"""Which calls PyTorch's CPU flash kernel answers with 0 instead of NaN (pytorch/pytorch#141128).

Puts a NaN in one query row (and, under causal masking, in the only key that row 0 sees), runs the kernel through
``F.scaled_dot_product_attention`` with only FLASH_ATTENTION enabled, and prints, per dtype, mask kind and causal
kind, the key lengths at which that row came back as zeros. The result is the same for every head dim and query
length tried, so they are folded into one line unless they differ. ``ATEN_CPU_CAPABILITY=avx2`` shows an AVX2 CPU on
an AVX-512 one. sdpa_flash's denylist entry for the bug (``sdpa_flash/_denylist.py``) is read from this output.

    python benchmarks/cpu_flash_nan_probe.py [--max-keys 40] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nan_row_is_zeroed(sq: int, sk: int, d: int, dtype: torch.dtype, mask: str | None, causal: bool,
                      nan_in: str) -> bool:
    """Whether row (0, 0, 0), all of whose visible scores are NaN, comes back as zeros from the CPU flash kernel."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, d, generator=g).to(dtype) for n in (sq, sk, sk))
    (q if nan_in == "query" else k)[0, 0, 0, 3] = float("nan")  # under causal, row 0 sees only key 0
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.ones(sq, sk, dtype=torch.bool)
    elif mask == "float":
        attn_mask = torch.zeros(sq, sk, dtype=dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    return bool((out[0, 0, 0] == 0).all())


def probe(max_keys: int) -> list[dict[str, object]]:
    rows = []
    for (name, dtype), mask, causal, nan_in in itertools.product(DTYPES.items(), (None, "bool", "float"),
                                                                 (False, True), ("query", "key")):
        if (nan_in == "key" and not causal) or (causal and mask is not None):
            continue
        per_shape = {}
        for d, sq in itertools.product((8, 16, 64), (1, 4)):
            per_shape[f"d={d},sq={sq}"] = [sk for sk in range(sq if causal else 1, max_keys + 1)
                                           if nan_row_is_zeroed(sq, sk, d, dtype, mask, causal, nan_in)]
        # under causal masking Sq <= Sk here, so compare the key lengths every shape tried
        common = range(4 if causal else 1, max_keys + 1)
        folded = {s: [x for x in ks if x in common] for s, ks in per_shape.items()}
        same = len({tuple(v) for v in folded.values()}) == 1
        rows.append({"dtype": name, "mask": mask, "causal": causal, "nan_in": nan_in,
                     "zeroed_at_key_lengths": next(iter(folded.values())) if same else per_shape})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-keys", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = probe(args.max_keys)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                          "rows": rows}, indent=1))
        return
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for r in rows:
        keys = r["zeroed_at_key_lengths"]
        if isinstance(keys, list):
            keys = f"{keys[0]}..{keys[-1]}" if keys and keys == list(range(keys[0], keys[-1] + 1)) else keys
        print(f"{r['dtype']:9} mask={r['mask']!s:5} causal={r['causal']!s:5} NaN in {r['nan_in']:5}: "
              f"zeroed at Sk = {keys or 'none'}")


if __name__ == "__main__":
    main()
