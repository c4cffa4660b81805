"""Hugging Face transformers on sdpa_flash: register, build a tiny random Llama, compare with "sdpa", generate.

    python examples/hf_transformers.py                         # CPU, float32, 2 layers, width 64 (seconds)
    python examples/hf_transformers.py --layers 12 --width 1024 --heads 16 --kv-heads 4   # bf16 on a GPU

Needs ``pip install 'sdpa_flash[hf]'``. No download: the model is built from a config with random weights.
"""

from __future__ import annotations

import argparse
import copy

import torch

from sdpa_flash.integrations import transformers as sdpa_flash_hf


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda if available (bf16), else cpu (float32)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    sdpa_flash_hf.register()  # attn_implementation="sdpa_flash" now runs every attention layer on sdpa_flash
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = LlamaConfig(vocab_size=256, hidden_size=args.width, intermediate_size=2 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    # One config object per model: transformers keeps attn_implementation on the config, and models built from one
    # object share it, so building `ref` from `config` itself would switch `ours` to "sdpa" too, silently
    # (sdpa_flash would then never be called; route_counts() would stay {}). check() raises if that happened.
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa_flash", dtype=dtype)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    sdpa_flash_hf.check(ours)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(device).eval(), ref.to(device).eval()

    ids = torch.randint(1, 256, (3, 16), device=device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as for batched generation
    mask[2, :9] = 0
    with torch.no_grad(), sdpa_flash_hf.record() as routes:
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    diff = float((got - want)[mask.bool()].abs().max())
    print(f"max |sdpa_flash - sdpa| logits on real tokens: {diff:.3g}")
    print("routes:", sorted({str(r).split(": ", 1)[1] for r in routes}))

    out = ours.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    out_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    same = bool(torch.equal(out, out_ref))
    print(f"greedy generate, {args.new_tokens} new tokens: same as sdpa: {same}")
    print("calls per path:", sdpa_flash_hf.route_counts())
    return {"max_logit_diff": diff, "same_tokens": float(same)}


if __name__ == "__main__":
    main()
