"""A Llama-style model's training step with attn_implementation "sdpa_flash" vs "sdpa" vs "eager".

    python benchmarks/models.py --json models.json          # H200: 12 layers, width 1024, 16/4 heads, 8 x 2048, bf16
    python benchmarks/models.py --tiny                       # any machine (CPU too): a smoke run of the same code
    python benchmarks/models.py --also-policy cudnn,flash,efficient,math   # + "sdpa_flash" without FA4, interleaved

One model (transformers ``LlamaConfig``, random weights, bf16) is built once and switched between implementations
with ``model.set_attn_implementation`` (same weights, no copies). Two scenarios:

* ``full``: every sequence is 2048 tokens (no attention mask);
* ``ragged``: right padding, lengths uniform in [256, 2048] (seeded): ``"sdpa"`` and ``"eager"`` get a dense
  ``(B, 1, S, S)`` mask and compute the padded positions; ``"sdpa_flash"`` recognises the padding and computes
  the layers packed (its varlen path) — the route counts printed show it.

Before timing, the outputs are compared: for each scenario, the largest difference of ``"sdpa_flash"``'s logits
(real tokens) from ``"sdpa"``'s must be at most twice ``"eager"``'s difference from ``"sdpa"`` plus 8 bf16 units of
the largest logit (the scale of legitimate bf16 error in this model), or the script exits with status 1.
Timing: forward + backward of the loss (no optimizer step, so the weights never change), CUDA events around
each step, the implementations interleaved in every repetition, the median reported. Takes about a minute on an
H200.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

IMPLS = ("sdpa_flash", "sdpa", "eager")


def build(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).train()


def batches(args: argparse.Namespace, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None,
                                                                      torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=gen)
    lengths = torch.randint(args.min_len, args.seq + 1, (args.batch,), generator=gen)
    mask = (torch.arange(args.seq)[None, :] < lengths[:, None]).long()
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {
        "full": (ids.to(device), None, ids.to(device)),
        "ragged": (ids.masked_fill(mask == 0, 0).to(device), mask.to(device),
                   ids.masked_fill(mask == 0, -100).to(device)),
    }
    return out


def step(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach()


def check(model: Any, data: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Logits of every implementation on every scenario, compared before any timing."""
    result: dict[str, Any] = {}
    eps = torch.finfo(dtype).eps
    for scenario, (ids, mask, _) in data.items():
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        logits = {}
        with torch.no_grad():
            for impl in IMPLS:
                model.set_attn_implementation(impl)
                logits[impl] = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[keep].float()
        ref = logits["sdpa"]
        d_ours = float((logits["sdpa_flash"] - ref).abs().max())
        d_eager = float((logits["eager"] - ref).abs().max())
        bound = 2 * d_eager + 8 * eps * float(ref.abs().max())
        result[scenario] = {"max_diff_sdpa_flash_vs_sdpa": d_ours, "max_diff_eager_vs_sdpa": d_eager,
                            "bound": bound, "passed": d_ours <= bound}
        del logits
    return result


def timed(fn: Any, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--min-len", type=int, default=256, help="ragged lengths are uniform in [min-len, seq]")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="2 layers, width 64, 2 x 64 tokens, 2 reps (smoke run)")
    ap.add_argument("--no-check", action="store_true", help="time even if the outputs disagree")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--also-policy", default=None, metavar="POLICY",
                    help="also time 'sdpa_flash' under this policy (e.g. cudnn,flash,efficient,math: auto without "
                         "FlashAttention-4), interleaved with the others")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layers, args.width, args.mlp, args.heads, args.kv_heads = 2, 64, 128, 4, 2
        args.vocab, args.batch, args.seq, args.min_len, args.reps, args.warmup = 256, 2, 64, 8, 2, 1
    import transformers

    import sdpa_flash
    from sdpa_flash.integrations import transformers as hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf.register()
    model = build(args, device, dtype)
    data = batches(args, device)
    checks = check(model, data, dtype)
    for scenario, c in checks.items():
        print(f"check {scenario:>6}: max |sdpa_flash - sdpa| {c['max_diff_sdpa_flash_vs_sdpa']:.3g}, "
              f"|eager - sdpa| {c['max_diff_eager_vs_sdpa']:.3g}, bound {c['bound']:.3g}: "
              f"{'PASS' if c['passed'] else 'FAIL'}")
    if not all(c["passed"] for c in checks.values()) and not args.no_check:
        print("outputs disagree beyond the bound; not timing (--no-check to time anyway)", file=sys.stderr)
        return 1

    import contextlib

    labels = list(IMPLS) + ([f"sdpa_flash[{args.also_policy}]"] if args.also_policy else [])

    def impl_of(label: str) -> tuple[str, Any]:
        if label.startswith("sdpa_flash["):
            return "sdpa_flash", sdpa_flash.use_policy(args.also_policy)
        return label, contextlib.nullcontext()

    times: dict[tuple[str, str], list[float]] = {}
    peaks: dict[tuple[str, str], int] = {}
    routes: dict[str, dict[str, int]] = {}
    for scenario, (ids, mask, lab) in data.items():
        hf.reset_route_counts()
        for rep in range(args.warmup + args.reps):
            for impl in labels:  # interleaved: drifts in clock or temperature hit every implementation alike
                attn, ctx = impl_of(impl)
                model.set_attn_implementation(attn)
                if device == "cuda" and rep == args.warmup:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with ctx:
                    ms = timed(lambda ids=ids, mask=mask, lab=lab: step(model, ids, mask, lab), device)
                if rep >= args.warmup:
                    times.setdefault((scenario, impl), []).append(ms)
                    if device == "cuda":
                        peaks[(scenario, impl)] = max(peaks.get((scenario, impl), 0), torch.cuda.max_memory_allocated())
                        torch.cuda.reset_peak_memory_stats()
        routes[scenario] = hf.route_counts()

    tokens = {s: int(d[0].numel() if d[1] is None else d[1].sum()) for s, d in data.items()}
    rows = []
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{args.layers} layers, width {args.width}, heads {args.heads}/{args.kv_heads}, batch {args.batch} x "
          f"{args.seq}, {str(dtype).replace('torch.', '')} on {name}; forward+backward, median of {args.reps}")
    print(f"{'scenario':<8} {'impl':<11} {'ms/step':>9} {'vs sdpa':>8} {'real tok/s':>11} {'peak MiB':>9}")
    for scenario in data:
        base = statistics.median(times[(scenario, "sdpa")])
        for impl in labels:
            t = times[(scenario, impl)]
            med = statistics.median(t)
            row = {"scenario": scenario, "impl": impl, "median_ms": med, "min_ms": min(t), "max_ms": max(t),
                   "speedup_vs_sdpa": base / med, "real_tokens_per_s": tokens[scenario] / (med / 1e3),
                   "peak_mib": peaks.get((scenario, impl), 0) / 2**20}
            rows.append(row)
            print(f"{scenario:<8} {impl:<11} {med:9.2f} {base / med:7.2f}x {row['real_tokens_per_s']:11.0f} "
                  f"{row['peak_mib']:9.0f}")
    for scenario, r in routes.items():
        print(f"sdpa_flash routes ({scenario}): {r}")
    print(sdpa_flash.stats())
    if args.json:
        env = {"torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "device": name,
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "env": env, "checks": checks, "results": rows, "routes": routes,
                       "ragged_real_tokens": tokens["ragged"]}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
