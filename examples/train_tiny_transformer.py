"""Train a small decoder language model built from ``sdpa_flash.nn.Attention`` blocks on synthetic data.

    python examples/train_tiny_transformer.py                  # CPU: 2 layers, width 64, 40 steps (seconds)
    python examples/train_tiny_transformer.py --layers 12 --width 1024 --heads 16 --kv-heads 4 --seq 2048 \\
        --batch 8 --steps 50                                   # on a GPU: bf16, fused kernels only

The data is ragged: each sequence has a random length and follows ``x[t+1] = (3 * x[t] + 1) % vocab`` from a
random start, so the loss must fall from ``ln(vocab)`` towards 0. Batches are right-padded and the padding goes
to the varlen path through ``key_padding_mask``. On CUDA the model runs under bf16 autocast with
``policy="fused"`` (an error, not a silent math fallback, if no fused kernel can run) and the script prints the
peak memory and the median step time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sdpa_flash
from sdpa_flash.nn import Attention


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, kv_heads: int, policy: str | None) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, num_kv_heads=kv_heads, causal=True, bias=False, policy=policy)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, kv_heads: int, max_len: int,
                 policy: str | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, kv_heads, policy) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.head(self.norm(x))


def batch(gen: torch.Generator, b: int, s: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged sequences following x[t+1] = (3 x[t] + 1) % vocab, right-padded; mask True = real token."""
    lengths = torch.randint(s // 4, s + 1, (b,), generator=gen)
    ids = torch.empty(b, s, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (b,), generator=gen)
    for t in range(1, s):
        ids[:, t] = (3 * ids[:, t - 1] + 1) % vocab
    mask = torch.arange(s)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 0).to(device), mask.to(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.width, args.layers, args.heads, args.kv_heads, args.seq,
                   "fused" if cuda else None).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    times: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        ids, mask = batch(gen, args.batch, args.seq, args.vocab, device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(ids, mask)
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # predict the next real token
        loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, args.vocab), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))  # syncs
        times.append(time.perf_counter() - t0)
        if step % max(1, args.steps // 8) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    step_ms = 1e3 * statistics.median(times[min(3, len(times) - 1):])
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f}; median step {step_ms:.1f} ms on {device}")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    print(sdpa_flash.stats())
    return {"first_loss": losses[0], "last_loss": losses[-1], "step_ms": step_ms}


if __name__ == "__main__":
    main()
