#!/usr/bin/env python
"""A DeepSeek-V2-Lite slice: the published layer shapes, 2-4 layers (first dense), random weights, an HF folder.

    python benchmarks/slice.py --out /tmp/v2lite_slice [--layers 2] [--vocab 8192] [--experts 64]

Shapes (deepseek-ai/DeepSeek-V2-Lite config.json): hidden 2048, 16 heads of MLA (no q LoRA, kv LoRA 512, rope 64,
nope 128, v 128), 64 routed experts of width 1408, top-6, 2 shared experts, layer 0 a dense MLP of 10944. Only the
depth is cut, and the vocabulary when ``--vocab`` is below the real 102400 (the head's share of the FLOPs then
shrinks with it). ``--experts`` lowers the routed expert count for machines that cannot hold 64 (say so with
the numbers: it raises the tokens per expert). Weights are saved in bf16 (half the disk) and loaded in the
benchmark's dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

# deepseek-ai/DeepSeek-V2-Lite config.json; num_hidden_layers and (optionally) vocab_size / n_routed_experts cut
V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    routed_scaling_factor=1.0,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    norm_topk_prob=False,
    hidden_act="silu",
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=100000,
    eos_token_id=100001,
    attention_bias=False,
    aux_loss_alpha=0.001,
    seq_aux=True,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
)


def slice_config(layers: int = 2, vocab: int = 8192, experts: int = 64) -> dict:
    """The config kwargs of a slice: V2-Lite's shapes at ``layers`` layers, ``vocab`` tokens, ``experts`` experts."""
    if not 2 <= layers <= 4:
        raise ValueError(f"layers={layers}: a slice has 2-4 layers (layer 0 dense, the rest MoE)")
    if experts < 6:
        raise ValueError(f"experts={experts}: top-6 routing needs at least 6 routed experts")
    eos = min(V2_LITE["eos_token_id"], vocab - 1)
    return {
        **V2_LITE,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "n_routed_experts": experts,
        "bos_token_id": min(V2_LITE["bos_token_id"], vocab - 2),
        "eos_token_id": eos,
    }


def build_slice(path: str | Path, layers: int = 2, vocab: int = 8192, experts: int = 64, seed: int = 0) -> Path:
    """Save a random-weight V2-Lite slice (bf16 safetensors) to ``path``; an existing one of that config is reused."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    path = Path(path)
    want = slice_config(layers, vocab, experts)
    if (path / "config.json").is_file():
        have = json.loads((path / "config.json").read_text())
        if all(have.get(k) == want[k] for k in ("num_hidden_layers", "vocab_size", "n_routed_experts")):
            return path
        shutil.rmtree(path)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: half the memory and time of fp32
    try:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**want, dtype="bfloat16"))
    finally:
        torch.set_default_dtype(old)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")  # concurrent builders never share a folder
    model.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process published it first: same seed, same weights
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write (reused when it holds the same config)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers, 2-4 (layer 0 dense)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (the real one: 102400)")
    p.add_argument("--experts", type=int, default=64, help="routed experts (the real count: 64)")
    args = p.parse_args()
    t0 = time.perf_counter()
    path = build_slice(args.out, args.layers, args.vocab, args.experts)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{path}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
