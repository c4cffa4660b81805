"""attention() with window / softcap / sinks on the GPU against the float64 reference (tolerance rule), fwd + bwd.

    python benchmarks/results/call_object_h100/variants_check.py      # a CUDA GPU; FA4 installed for the fa4 rows
"""
import torch

import sdpa_flash
from sdpa_flash.testing import compare_to_reference, reference_attention

torch.manual_seed(0)
q = torch.randn(1, 8, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
s = torch.randn(8, device="cuda", requires_grad=True)
for kw in [dict(window=(127, 0), causal=True), dict(softcap=30.0, causal=True), dict(sinks=s, causal=True),
           dict(window=(127, 0), sinks=s, causal=True)]:
    p = sdpa_flash.explain(q, k, v, **kw)
    out = sdpa_flash.attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    same = reference_attention(q, k, v, dtype=None, **kw)
    print(list(kw), p.backend, compare_to_reference(out, same, ref))
    g = torch.randn_like(out)
    leaves = [q, k, v] + ([s] if "sinks" in kw else [])
    a = torch.autograd.grad(out, leaves, g)
    b = torch.autograd.grad(ref, leaves, g.double())
    c = torch.autograd.grad(same, leaves, g)
    for n, x, y, z in zip("qkvs"[:len(a)], a, b, c, strict=True):
        print("  d" + n, compare_to_reference(x, z, y, name="d" + n))
