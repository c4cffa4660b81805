"""Sliding windows, softcap and sinks: ``attention()`` against what a user would otherwise run, side by side.

Sections (``--sections``, default both):

* ``layer``: issue #25's three cases, bf16, forward and forward+backward, interleaved rounds (peak memory beside
  each time; the materialised mask or scores are part of what a path allocates):
  - window: a sliding window of 4096 keys (``window=(4095, 0)``, causal), S=32k, hd128, GQA 32/8, B=1;
  - softcap: softcap 50, causal, S=8k, hd128, 16 heads, B=2;
  - gpt-oss: hd64, 64 query / 8 key-value heads, learnable sinks, S=8k, B=1; a windowed layer (128 keys) and a
    full causal layer (gpt-oss alternates them).
  Paths: ``attention()`` under ``auto`` (what it ran is printed), ``F.scaled_dot_product_attention`` with the
  window as a materialised boolean mask (the only way SDPA can say it; softcap and sinks it cannot say at all),
  the eager formula (scores materialised: transformers' ``eager``), FlexAttention under ``torch.compile``
  (block mask for the window, a score_mod for softcap, sinks from its log-sum-exp: ``out * sigmoid(lse - sink)``),
  and FlashAttention-4's ``flash_attn_func`` called directly (``window_size``, ``softcap``, ``learnable_sink``),
  on contiguous (B, S, H, D) copies and on (B, S, H, D) views of the (B, H, S, D) tensors (the layer's own call).
  Before timing, every path's forward is compared with ``attention()``'s (max abs difference printed).
* ``model``: a small random gpt-oss (transformers ``GptOssConfig``: 4 layers, 64/8 heads of 64, window 128 on
  every other layer, sinks) training step (forward + backward of the loss) with ``attn_implementation``
  ``"eager"`` against sdpa_flash (registered as ``"policy_attention"``: gpt-oss takes no "flash"/"sdpa" name),
  interleaved, median ms/step; logits compared first.

    PYTHONPATH=. python benchmarks/variants.py --out variants.json [--sections layer,model] [--quick] \
        [--cases gpt-oss-window] [--rounds 21]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from typing import Any

import torch
import torch.nn.functional as F
from _harness import machine_info, run_sections  # (benchmarks/, on sys.path when a script runs)

import sdpa_flash
from sdpa_flash.backends import fa4 as fa4_backend
from sdpa_flash.bench._timing import Settings, Stats, Timed, interleave

DEV = torch.device("cuda")
ROWS: list[dict[str, Any]] = []


def gib(n: int | None) -> str:
    return "   n/a" if n is None else f"{n / 2**30:6.2f}"


def record(case: str, mode: str, path: str, result: Stats | BaseException, flops: float, **extra: Any) -> None:
    if isinstance(result, BaseException):
        row = {"case": case, "mode": mode, "path": path, "error": repr(result)[:300], **extra}
        print(f"{case:22s} {mode:6s} {path:26s} n/a: {row['error'][:140]}", flush=True)
    else:
        tf = flops / (result.median_ms * 1e-3) / 1e12
        row = {"case": case, "mode": mode, "path": path, "ms": result.median_ms, "q1_ms": result.q1_ms,
               "q3_ms": result.q3_ms, "spread": result.spread, "tflops": tf, "peak_bytes": result.peak_bytes,
               **extra}
        print(f"{case:22s} {mode:6s} {path:26s} {result.median_ms:9.3f} ms [{result.q1_ms:.3f}-{result.q3_ms:.3f}] "
              f"{tf:6.1f} TF/s  peak {gib(result.peak_bytes)} GiB", flush=True)
    ROWS.append(row)


def window_mask(sq: int, sk: int, left: int | None) -> torch.Tensor:
    """(Sq, Sk) bool, True = attend: causal bottom-right, and at most ``left`` keys before the diagonal."""
    i = torch.arange(sq, device=DEV)[:, None] + (sk - sq)
    j = torch.arange(sk, device=DEV)[None, :]
    ok = j <= i
    return ok & (j >= i - left) if left is not None else ok


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, softcap: float | None,
          sinks: torch.Tensor | None) -> torch.Tensor:
    """transformers' eager formula (gpt-oss's with sinks): scores in the input dtype, softmax in float32."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        col = sinks.to(s.dtype).view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
        s = torch.cat([s, col], -1)
        p = torch.softmax(s.float(), -1)[..., :-1].to(v.dtype)
    else:
        p = torch.softmax(s.float(), -1).to(v.dtype)
    return p @ v


def flex_path(s: int, left: int | None, softcap: float | None) -> Any:
    """FlexAttention under torch.compile: a block mask for causal + window, a score_mod for softcap, and sinks (an
    argument, so the backward reaches them) from its log-sum-exp: ``out * sigmoid(lse - sink)``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, kj):  # type: ignore[no-untyped-def]
        ok = kj <= qi
        return ok & (kj >= qi - left) if left is not None else ok

    # Each case compiles afresh: the cases and modes of one process recompile flex_attention's one code object
    # (shapes, score_mod, grad mode) past dynamo's limit of 8, after which it ran uncompiled and out of memory.
    torch._dynamo.reset()
    block = create_block_mask(mask_mod, None, None, s, s, device="cuda")
    score_mod = None
    if softcap:
        def score_mod(score, b, h, qi, kj):  # type: ignore[no-untyped-def]
            return softcap * torch.tanh(score / softcap)
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(q, k, v, *sinks):  # type: ignore[no-untyped-def]
        if not sinks:
            return compiled(q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=True)
        out, lse = compiled(q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=True, return_lse=True)
        return out * torch.sigmoid(lse - sinks[0].view(1, -1, 1)).unsqueeze(-1).to(out.dtype)

    return call


def timed_item(name: str, call: Any, ts: list[torch.Tensor], mode: str, gout: torch.Tensor, layout: str) -> Timed:
    if mode == "fwd":
        def fn(i):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                return call(*ts)
    else:
        leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in ts]  # (strides kept)
        wrt = [t for t in leaves if t.requires_grad]
        # the output gradient as each path gets it: "bshd" copies, "bshd views" the (B, S, H, D) view of the
        # (B, H, S, D) gradient a model would pass back (what attention()'s own call hands FA4)
        g = {"bhsd": gout, "bshd": gout.transpose(1, 2).contiguous(), "bshd views": gout.transpose(1, 2)}[layout]

        def fn(i):  # type: ignore[no-untyped-def]
            return torch.autograd.grad(call(*leaves), wrt, g)
    return Timed(name, fn)


def layer_case(label: str, b: int, h: int, hkv: int, s: int, d: int, left: int | None, softcap: float | None,
               with_sinks: bool, settings: Settings, modes: tuple[str, ...]) -> None:
    g = torch.Generator(device="cuda").manual_seed(s + d + h)
    q = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, hkv, s, d, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(2))
    sinks = torch.randn(h, device=DEV, dtype=torch.float32, generator=g) if with_sinks else None
    window = (left, 0) if left is not None else None
    kw: dict[str, Any] = {"causal": True, "window": window, "softcap": softcap}
    sink_t = [sinks] if sinks is not None else []
    visible = sum(min(i + 1, (left + 1) if left is not None else s) for i in range(s))
    flops = 4.0 * b * h * visible * d
    print(f"== {label}: explain: {sdpa_flash.explain(q, k, v, **kw, sinks=sinks).backend}", flush=True)

    def ours(q, k, v, *sk):  # type: ignore[no-untyped-def]
        return sdpa_flash.attention(q, k, v, **kw, sinks=sk[0] if sk else None)

    paths: dict[str, tuple[Any, list[torch.Tensor], str]] = {"attention(auto)": (ours, [q, k, v, *sink_t], "bhsd")}
    if softcap is None and sinks is None:
        mask = window_mask(s, s, left)

        def sdpa_mask(q, k, v):  # type: ignore[no-untyped-def]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        paths["sdpa + bool mask"] = (sdpa_mask, [q, k, v], "bhsd")
    emask = window_mask(s, s, left)

    def eager_call(q, k, v, *sk):  # type: ignore[no-untyped-def]
        return eager(q, k, v, emask, softcap, sk[0] if sk else None)
    paths["eager (scores)"] = (eager_call, [q, k, v, *sink_t], "bhsd")
    try:
        paths["flex (compiled)"] = (flex_path(s, left, softcap), [q, k, v, *sink_t], "bhsd")
    except Exception as exc:  # reported as the path's n/a
        record(label, "-", "flex (compiled)", exc, 0.0)
    if fa4_backend.installed_version() is not None:
        fa4 = fa4_backend.load().flash_attn_func

        def fa4_call(q, k, v, *sk):  # type: ignore[no-untyped-def]
            return fa4(q, k, v, causal=True, window_size=(left, 0) if left is not None else (None, None),
                       softcap=softcap or 0.0, learnable_sink=sk[0] if sk else None)[0]
        paths["fa4 direct"] = (fa4_call, [t.transpose(1, 2).contiguous() for t in (q, k, v)] + sink_t, "bshd")
        # the same call on (B, S, H, D) views of the (B, H, S, D) tensors attention() takes: what the layer hands
        # FA4, so a gap between the two FA4 paths is the layout's, and one to this path is the layer's own
        paths["fa4 direct (views)"] = (fa4_call, [t.transpose(1, 2) for t in (q, k, v)] + sink_t, "bshd views")

    with torch.no_grad():  # agreement first: every path's forward against attention()'s
        ref = ours(q, k, v, *sink_t).float()
        for name, (call, ts, layout) in paths.items():
            try:
                out = call(*ts)
                out = out.transpose(1, 2) if layout.startswith("bshd") else out
                diff = (out.float() - ref).abs().max().item()
                print(f"   {name:26s} max |out - attention()| = {diff:.3g}", flush=True)
                ROWS.append({"case": label, "mode": "check", "path": name, "max_abs_diff": diff})
            except Exception as exc:
                print(f"   {name:26s} check n/a: {repr(exc)[:160]}", flush=True)
            torch.cuda.empty_cache()
    gout = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16, generator=g)
    backend = sdpa_flash.explain(q.requires_grad_(), k, v, **kw, sinks=sinks).backend
    q.requires_grad_(False)
    for mode in modes:
        items = []
        for name, (call, ts, layout) in paths.items():
            try:
                items.append(timed_item(name, call, ts, mode, gout, layout))
            except Exception as exc:  # (out of memory, typically): the path's n/a
                record(label, mode, name, exc, 0.0)
                torch.cuda.empty_cache()
        res = interleave(items, DEV, settings, measure_peak=True)
        for name, r in res.items():
            record(label, mode, str(name), r, flops * (3.5 if mode == "fwdbwd" else 1.0),
                   backend=backend if name == "attention(auto)" else "")
        torch.cuda.empty_cache()


def layers(settings: Settings, quick: bool, cases: str | None) -> None:
    modes = ("fwd", "fwdbwd")
    all_cases: dict[str, tuple[Any, ...]] = {
        "window": ("window4096 S=32k", 1, 32, 8, 16384 if quick else 32768, 128, 4095, None, False),
        "softcap": ("softcap50 S=8k", 2, 16, 16, 8192, 128, None, 50.0, False),
        "gpt-oss-window": ("gpt-oss window128", 1, 64, 8, 8192, 64, 127, None, True),
        "gpt-oss-full": ("gpt-oss full", 1, 64, 8, 8192, 64, None, None, True)}
    for name in cases.split(",") if cases else all_cases:
        layer_case(*all_cases[name], settings, modes)


def model(quick: bool) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    from sdpa_flash.integrations import transformers as hf

    hf.register("policy_attention")
    cfg = transformers.GptOssConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
        max_position_embeddings=8192, layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.bfloat16).to(DEV)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.sinks.normal_()
    b, s = (1, 2048) if quick else (2, 4096)
    ids = torch.randint(0, cfg.vocab_size, (b, s), device=DEV)
    impls = ("eager", "policy_attention")
    logits = {}
    with torch.no_grad():  # both bf16 paths against the same model in float32 ("eager"): the bf16 error of each
        ref = copy.deepcopy(m).float()
        ref.set_attn_implementation("eager")
        logits["float32 eager"] = ref(ids).logits.float()
        del ref
        for impl in impls:
            m.set_attn_implementation(impl)
            logits[impl] = m(ids).logits.float()
    scale = logits["float32 eager"].abs().max().item()
    diffs = {impl: (logits[impl] - logits["float32 eager"]).abs().max().item() for impl in impls}
    print(f"gpt-oss logits, max |bf16 - float32 eager|: {diffs} (largest logit {scale:.3g})", flush=True)
    with hf.record() as routes:
        m.set_attn_implementation("policy_attention")
        with torch.no_grad():
            m(ids[:, :256])
    print("routes:", sorted({str(r.path) for r in routes}), flush=True)
    m.set_attn_implementation("policy_attention")
    print("decision:", str(sdpa_flash.explain(
        torch.randn(b, 64, s, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True),
        *(torch.randn(b, 8, s, 64, device=DEV, dtype=torch.bfloat16) for _ in range(2)), causal=True,
        window=(127, 0), sinks=torch.zeros(64, device=DEV))).splitlines()[0], flush=True)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(m(ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        m.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {i: [] for i in impls}
    for impl in impls:  # warm
        m.set_attn_implementation(impl)
        for _ in range(2):
            step()
    reps = 5 if quick else 10
    for _ in range(reps):
        for impl in impls:
            m.set_attn_implementation(impl)
            torch.cuda.synchronize()
            a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            z.record()
            torch.cuda.synchronize()
            times[impl].append(a.elapsed_time(z))
    for impl in impls:
        ts = sorted(times[impl])
        print(f"gpt-oss step ({b}x{s}) {impl:18s} median {statistics.median(ts):8.2f} ms "
              f"[{ts[0]:.2f}-{ts[-1]:.2f}] over {reps}", flush=True)
        ROWS.append({"case": f"gpt-oss model {b}x{s}", "mode": "train_step", "path": impl,
                     "ms": statistics.median(ts), "min_ms": ts[0], "max_ms": ts[-1]})
    ROWS.append({"case": "gpt-oss model", "mode": "check", "max_abs_logit_diff_vs_float32": diffs,
                 "largest_logit": scale})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="variants.json")
    ap.add_argument("--sections", default="layer,model")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default=None,
                    help="the layer section's cases, comma-separated (default all: window,softcap,gpt-oss-window,"
                         "gpt-oss-full)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; 5 with --quick)")
    args = ap.parse_args()
    settings = Settings.for_device("cuda", rounds=args.rounds or (5 if args.quick else 9), budget_s=0.8,
                                   warmup_ms=20.0)
    run_sections({"layer": lambda: layers(settings, args.quick, args.cases), "model": lambda: model(args.quick)},
                 args.sections, args.out, machine_info(), ROWS)
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
