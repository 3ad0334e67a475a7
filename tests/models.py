"""Tiny random checkpoints built with transformers' own classes, one per architecture variant under test."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from npu_parallel.hf_compat import dtype_kwargs

from .remote_deepseek import to_remote_layout, to_remote_v1_layout

# classes an older transformers lacks (DeepSeek-V2 before 4.56) are None: their variants are left out below
DeepseekV2Config = getattr(transformers, "DeepseekV2Config", None)
DeepseekV2ForCausalLM = getattr(transformers, "DeepseekV2ForCausalLM", None)
DeepseekV3Config = getattr(transformers, "DeepseekV3Config", None)
DeepseekV3ForCausalLM = getattr(transformers, "DeepseekV3ForCausalLM", None)
LlamaConfig = getattr(transformers, "LlamaConfig", None)
LlamaForCausalLM = getattr(transformers, "LlamaForCausalLM", None)
MixtralConfig = getattr(transformers, "MixtralConfig", None)
MixtralForCausalLM = getattr(transformers, "MixtralForCausalLM", None)
Qwen2Config = getattr(transformers, "Qwen2Config", None)
Qwen2ForCausalLM = getattr(transformers, "Qwen2ForCausalLM", None)
Qwen2MoeConfig = getattr(transformers, "Qwen2MoeConfig", None)
Qwen2MoeForCausalLM = getattr(transformers, "Qwen2MoeForCausalLM", None)
Qwen3MoeConfig = getattr(transformers, "Qwen3MoeConfig", None)
Qwen3MoeForCausalLM = getattr(transformers, "Qwen3MoeForCausalLM", None)

# Shared tiny MLA/MoE shape: 8 heads and 8 experts (tp 1, 2, 4 all divide), vocab 250 (tp=4 pads it).
_BASE = dict(
    vocab_size=250,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=8,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS: dict[str, tuple[type, type, dict]] = {
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(_BASE, q_lora_rank=48, topk_method="greedy")),
    "deepseek_v2_lite": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(_BASE, q_lora_rank=None, topk_method="greedy")),
    "deepseek_v2_group": (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        dict(
            _BASE,
            q_lora_rank=48,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
    ),
    "deepseek_v3": (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        dict(
            _BASE,
            q_lora_rank=48,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
        ),
    ),
    # the original trust_remote_code module tree: ModuleList experts, MoEGate with seq-level aux loss
    "deepseek_v2_remote": (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        dict(
            _BASE,
            q_lora_rank=None,
            topk_method="greedy",
            aux_loss_alpha=0.1,
            seq_aux=True,
            norm_topk_prob=True,
            scoring_func="softmax",
        ),
    ),
}
# Other families: 8 query heads; key/value heads 4 (split at tp 4) or 2 (tp 4 shares them).
_STD = dict(
    vocab_size=250,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
_ROUTED = dict(output_router_logits=True, router_aux_loss_coef=0.05, num_experts_per_tok=2)
VARIANTS.update(
    {
        "mixtral": (
            MixtralConfig,
            MixtralForCausalLM,
            dict(_STD, **_ROUTED, num_key_value_heads=4, num_local_experts=8),
        ),
        "qwen2_moe": (
            Qwen2MoeConfig,
            Qwen2MoeForCausalLM,
            dict(
                _STD,
                **_ROUTED,
                num_key_value_heads=2,
                num_experts=8,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
                decoder_sparse_step=1,
                mlp_only_layers=[0],
                norm_topk_prob=False,
            ),
        ),
        "qwen3_moe": (
            Qwen3MoeConfig,
            Qwen3MoeForCausalLM,
            dict(
                _STD,
                **_ROUTED,
                num_key_value_heads=4,
                head_dim=16,
                num_experts=8,
                moe_intermediate_size=32,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[0],
            ),
        ),
        "llama": (LlamaConfig, LlamaForCausalLM, dict(_STD, num_key_value_heads=2)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(_STD, num_key_value_heads=4, tie_word_embeddings=True)),
        # DeepSeek-MoE 16B (v1) trust_remote_code tree, built from the Mixtral layout (standard attention)
        "deepseek_moe_remote": (
            MixtralConfig,
            MixtralForCausalLM,
            dict(_STD, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
        ),
    }
)
REMOTE = {"deepseek_v2_remote", "deepseek_moe_remote"}
# NPU_PARALLEL_TEST_VARIANTS=a,b: only these variants (make test-compat: the DeepSeek ones under transformers 4.x)
_ONLY = {v for v in os.environ.get("NPU_PARALLEL_TEST_VARIANTS", "").split(",") if v}
VARIANTS = {name: v for name, v in VARIANTS.items() if None not in v[:2] and (not _ONLY or name in _ONLY)}


def build_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    config_cls, model_cls, extra = VARIANTS[name]
    torch.manual_seed(seed)
    config = config_cls(**extra)
    model = model_cls(config)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:  # DeepSeek-V3's load-balancing bias: non-zero so it changes routing
                bias.copy_(torch.randn_like(bias) * 0.3)
    model.save_pretrained(path)
    return path


def load_reference(name: str, path: Path) -> torch.nn.Module:
    """The unconverted model as a user would load it (remote-code layout for the remote variant)."""
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(torch.float32))
    if name == "deepseek_v2_remote":
        model = to_remote_layout(model)
    elif name == "deepseek_moe_remote":
        model = to_remote_v1_layout(model)
    return model


def build_layout_checkpoints(root: Path) -> dict[str, Path]:
    """The same tiny DeepSeek-V2 stored three more ways: index-sharded, fused expert keys, tied embeddings."""
    from safetensors.torch import save_file

    out = {}
    config_cls, model_cls, extra = VARIANTS["deepseek_v2"]
    torch.manual_seed(1)
    model = model_cls(config_cls(**extra))
    out["sharded_index"] = root / "v2_sharded_index"
    model.save_pretrained(out["sharded_index"], max_shard_size="60KB")
    out["fused_keys"] = root / "v2_fused_keys"
    model.config.save_pretrained(out["fused_keys"])
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        out["fused_keys"] / "model.safetensors",
        metadata={"format": "pt"},
    )
    torch.manual_seed(2)
    tied = model_cls(config_cls(**{**extra, "tie_word_embeddings": True}))
    out["tied"] = root / "v2_tied"
    tied.save_pretrained(out["tied"])
    return out
