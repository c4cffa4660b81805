"""What the reliability features cost in training: shadow checks (1 in N calls) and the always-on stats counter.

    python benchmarks/reliability.py                       # CPU: the tiny model (seconds)
    python benchmarks/reliability.py --gpu-size --json out.json   # the training example's GPU size (H200: ~1 min)

The model is ``examples/train_tiny_transformer.py``'s decoder (``sdpa_flash.nn.Attention`` blocks), trained on its
ragged, right-padded batches, so attention runs on the varlen path (grouped dense calls whose shapes change from
step to step). One model and one optimizer serve every configuration; only the layers' policy changes between
them: ``fused`` (CUDA) or ``auto`` with shadow checking off, at N = 100 and at N = 10. The configurations are timed
in interleaved rounds (a fresh random order each round), a few whole training steps (forward, backward, AdamW)
per sample; the ratio to "off" is the median of per-round ratios.

The stats counter cannot be switched off (it is one ``next()`` on an ``itertools.count`` per call); its cost is
given as the measured time of that operation times the attention calls per step, over the step time.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import pathlib
import random
import statistics
import sys
import time
import timeit
from typing import Any

import torch

import sdpa_flash
from sdpa_flash.nn import Attention
from sdpa_flash.policy import resolve_policy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _example() -> Any:
    path = ROOT / "examples" / "train_tiny_transformer.py"
    spec = importlib.util.spec_from_file_location("train_tiny_transformer", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-size", action="store_true",
                    help="12 layers, width 1024, 16 heads (4 KV), 8 x 2048 tokens (the example's GPU command)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 8 on CUDA, 4 on the CPU)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per sample")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    ex = _example()
    if args.gpu_size:
        vocab, width, layers, heads, kv, seq, batch = 8192, 1024, 12, 16, 4, 2048, 8
    else:
        vocab, width, layers, heads, kv, seq, batch = 64, 64, 2, 4, 2, 64, 4
    rounds = args.rounds or (8 if cuda else 4)
    torch.manual_seed(0)
    base = "fused" if cuda else "auto"
    model = ex.TinyLM(vocab, width, layers, heads, kv, seq, base).to(device)
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    data = [ex.batch(gen, batch, seq, vocab, device) for _ in range(8)]
    configs = {"off": resolve_policy(base),
               "shadow N=100": resolve_policy(base, shadow=100, shadow_action="record"),
               "shadow N=10": resolve_policy(base, shadow=10, shadow_action="record")}
    step_no = itertools.count()

    def step() -> None:
        ids, mask = data[next(step_no) % len(data)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(ids, mask)
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def sample(name: str) -> float:
        for layer in attn_layers:
            layer.policy = configs[name]
        step()  # settle: the first step after a switch builds nothing new, but keeps timing off the boundary
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - t) * 1e3 / args.steps

    sdpa_flash.reset_stats()
    for name in configs:  # warm-up: every shape the data makes, under every policy
        for _ in range(len(data)):
            sample(name)
    sdpa_flash.reset_stats()
    calls_before = _attention_calls()
    samples: dict[str, list[float]] = {n: [] for n in configs}
    ratios: dict[str, list[float]] = {n: [] for n in configs}
    order = list(configs)
    shuffle = random.Random(0)
    steps_run = 0
    for _ in range(rounds):
        shuffle.shuffle(order)
        got = {n: sample(n) for n in order}
        steps_run += len(order) * (args.steps + 1)
        for n in configs:
            samples[n].append(got[n])
            ratios[n].append(got[n] / got["off"])
    calls_per_step = (_attention_calls() - calls_before) / steps_run
    st = sdpa_flash.stats()
    counter = itertools.count()
    ns_next = min(timeit.repeat(lambda: next(counter), number=100_000, repeat=5)) / 100_000 * 1e9
    off_ms = statistics.median(samples["off"])
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "model": {"layers": layers, "width": width, "heads": heads, "kv_heads": kv, "batch": batch, "seq": seq,
                  "vocab": vocab, "ragged": True, "autocast_bf16": cuda, "policy": base},
        "rounds": rounds, "steps_per_sample": args.steps,
        "rows": [{"config": n, "step_ms": statistics.median(samples[n]),
                  "ratio_to_off": statistics.median(ratios[n]),
                  "spread": (max(ratios[n]) - min(ratios[n])) if len(ratios[n]) > 1 else 0.0} for n in configs],
        "attention_calls_per_step": calls_per_step,
        "shadow_checks": st.shadow.checks, "shadow_mismatches": len(st.shadow.mismatches),
        "stats_counter_ns": ns_next,
        "stats_fraction_of_step": calls_per_step * ns_next * 1e-6 / off_ms,
    }
    print(f"{result['device']}, torch {torch.__version__}; {layers} layers x {width}, {batch} x {seq} ragged tokens, "
          f"policy {base!r}; {rounds} rounds x {args.steps} steps")
    for r in result["rows"]:
        print(f"  {r['config']:<14} {r['step_ms']:8.2f} ms/step   x{r['ratio_to_off']:.4f} of off   "
              f"(per-round ratios span {r['spread']:.4f})")
    print(f"  shadow checks run in the timed rounds: {st.shadow.checks}, mismatches: {len(st.shadow.mismatches)}")
    print(f"  stats: {calls_per_step:.1f} attention() calls per step x {ns_next:.0f} ns per counter bump = "
          f"{100 * result['stats_fraction_of_step']:.5f}% of the step")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _attention_calls() -> int:
    return sdpa_flash.stats().total


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
