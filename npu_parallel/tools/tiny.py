"""Tiny random checkpoints shaped like the real models (same structure, small sizes), for demos and smoke tests."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from npu_parallel.checkpoint.remote_code import has_native_class

logger = logging.getLogger(__name__)

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


# transformers < 4.56 has no DeepSeek-V2 class; its DeepSeek-V3 class (same MLA + MoE tree) needs a q LoRA rank
V3_STAND_IN = dict(q_lora_rank=64, n_group=1, topk_group=1)


def model_classes() -> tuple[type, type, dict]:
    """(config class, model class, extra config) for the tiny model under the installed transformers."""
    import transformers

    if hasattr(transformers, "DeepseekV2ForCausalLM"):
        return transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, {}
    logger.warning(
        "transformers %s has no DeepSeek-V2 class: the tiny model is a DeepSeek-V3 of the same shape "
        "(with a q LoRA rank of 64)",
        transformers.__version__,
    )
    return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, V3_STAND_IN


def build_tiny_deepseek_v2_lite(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised DeepSeek-V2-Lite-shaped model (bytes as tokens: vocab 512) to ``path``."""
    path = Path(path)
    if (path / "config.json").is_file():
        if has_native_class(json.loads((path / "config.json").read_text()).get("model_type")):
            return path
        shutil.rmtree(path)  # built under another transformers release, whose class this one lacks
    config_cls, model_cls, extra = model_classes()
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY_V2_LITE, **extra, **overrides}))
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")  # concurrent builders never share a folder
    model.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process published it first: same seed, same weights
        shutil.rmtree(tmp, ignore_errors=True)
    return path
