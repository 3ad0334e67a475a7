"""Tiny random checkpoints shaped like the real models (same structure, small sizes), for demos and smoke tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

# DeepSeek-V2-Lite's structure: MLA without q LoRA, 64 routed experts top-6, 2 shared, first layer dense.
TINY_V2_LITE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=None,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    aux_loss_alpha=0.001,  # the published config's load-balancing loss (DeepSeek's MoEGate), seq-wise
    seq_aux=True,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=10,
)


def build_tiny_deepseek_v2_lite(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised DeepSeek-V2-Lite-shaped model (bytes as tokens: vocab 512) to ``path``."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**{**TINY_V2_LITE, **overrides}))
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")  # concurrent builders never share a folder
    model.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process published it first: same seed, same weights
        shutil.rmtree(tmp, ignore_errors=True)
    return path
