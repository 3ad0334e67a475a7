"""Tiny checkpoints run by DeepSeek's own published code (``auto_map`` + ``modeling_deepseek.py``).

The project holds none of that code: ``NPU_PARALLEL_UPSTREAM_DIR`` names a folder with one sub-folder per
model, each holding the published ``modeling_deepseek.py`` and ``configuration_deepseek.py``:

    $NPU_PARALLEL_UPSTREAM_DIR/deepseek_v2/   from deepseek-ai/DeepSeek-V2-Lite (or DeepSeek-V2)
    $NPU_PARALLEL_UPSTREAM_DIR/deepseek_v3/   from deepseek-ai/DeepSeek-V3 (or DeepSeek-R1)
    $NPU_PARALLEL_UPSTREAM_DIR/deepseek_moe/  from deepseek-ai/deepseek-moe-16b-base

At test time the two files are copied into a tiny checkpoint folder whose config.json maps to them, as on the
Hub, and transformers builds and saves the model from them (``trust_remote_code=True``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

ENV = "NPU_PARALLEL_UPSTREAM_DIR"
FILES = ("modeling_deepseek.py", "configuration_deepseek.py")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    rope_scaling=None,
    use_cache=False,
    bos_token_id=0,
    eos_token_id=1,
    torch_dtype="float32",
)
_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)


def _auto_map(prefix: str) -> dict:
    return {
        "AutoConfig": f"configuration_deepseek.{prefix}Config",
        "AutoModel": f"modeling_deepseek.{prefix}Model",
        "AutoModelForCausalLM": f"modeling_deepseek.{prefix}ForCausalLM",
    }


# model name -> config.json (the published layout: model_type, architectures, auto_map)
CONFIGS = {
    "deepseek_v2": dict(
        _COMMON,
        **_MLA,
        model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
        auto_map=_auto_map("DeepseekV2"),
        q_lora_rank=None,  # V2-Lite
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        aux_loss_alpha=0.01,
        seq_aux=True,
    ),
    "deepseek_v3": dict(
        _COMMON,
        **_MLA,
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        auto_map=_auto_map("DeepseekV3"),
        q_lora_rank=24,
        topk_method="noaux_tc",
        n_group=2,
        topk_group=1,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        aux_loss_alpha=0.0,
        seq_aux=True,
        num_nextn_predict_layers=0,
    ),
    "deepseek_moe": dict(
        _COMMON,
        model_type="deepseek",
        architectures=["DeepseekForCausalLM"],
        auto_map=_auto_map("Deepseek"),
        scoring_func="softmax",
        norm_topk_prob=False,
        aux_loss_alpha=0.01,
        seq_aux=True,
    ),
}
# DeepSeek-V3's published MoE runs in eval mode only (its gate asserts `not self.training`)
EVAL_ONLY = {"deepseek_v3"}


def upstream_dir() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def missing_upstream(name: str) -> str | None:
    """Why the upstream files of ``name`` are not available (a skip reason), or None."""
    root = upstream_dir()
    if root is None:
        return f"{ENV} is unset: point it at a folder with DeepSeek's published modeling/configuration files"
    lacking = [f for f in FILES if not (root / name / f).is_file()]
    return f"{root / name} lacks {', '.join(lacking)}" if lacking else None


def write_remote_folder(name: str, path: Path) -> Path:
    """config.json in the published layout plus the upstream files; no weights yet."""
    path.mkdir(parents=True, exist_ok=True)
    root = upstream_dir()
    assert root is not None
    for f in FILES:
        shutil.copy(root / name / f, path / f)
    (path / "config.json").write_text(json.dumps(CONFIGS[name], indent=2))
    return path


def build_remote_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint built and saved by the upstream code itself (transformers 4.x)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_remote_folder(name, path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:  # V3 leaves it uninitialised (torch.empty): give it values that change routing
                bias.copy_(torch.randn_like(bias) * 0.3)
    model.save_pretrained(str(path))
    for f in FILES:  # save_pretrained copies them too; keep the verbatim ones whatever it does
        shutil.copy(upstream_dir() / name / f, path / f)  # type: ignore[operator]
    return path


def build_native_with_auto_map(path: Path, seed: int = 0) -> Path:
    """A DeepSeek-V2 checkpoint saved by transformers' own class, then given the published auto_map and files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIGS["deepseek_v2"])
    cfg.pop("auto_map")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.save_pretrained(str(path))
    write_remote_folder("deepseek_v2", path)
    return path
