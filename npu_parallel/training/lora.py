"""LoRA in the training loop: the ``--lora_*`` flags checked, adapters added to the loaded model, a run continued.

``--lora_r N`` trains new adapters (PEFT's initialisation, seeded by ``--seed``), ``--lora_adapter DIR`` continues
from a PEFT adapter folder; only the adapters train and the step folders hold only them and their optimizer state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from npu_parallel.checkpoint.lora_checkpoint import checkpoint_lora, config_from_dict, load_adapter_weights
from npu_parallel.checkpoint.peft_adapter import CONFIG_FILE, apply_lora
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.errors import ConfigError

# attention projections of every supported family and the fused routed experts (PEFT's target_parameters)
DEFAULT_TARGETS = (
    "q_proj,q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,k_proj,v_proj,o_proj,"
    "mlp.experts.gate_up_proj,mlp.experts.down_proj"
)


def split_targets(text: str) -> tuple[list[str], list[str]]:
    """``--lora_targets`` -> (target_modules, target_parameters): expert weights and ``*.weight`` are parameters."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    params = [n for n in names if "experts." in n or n.endswith(".weight")]
    return [n for n in names if n not in params], params


def check_lora_args(cfg: Any) -> None:
    """The --lora_* values on their own (ConfigError: the value, the rule, the fix)."""
    if cfg.lora_r < 0:
        raise ConfigError(f"--lora_r {cfg.lora_r}: must be 0 (full fine-tuning) or a positive rank, e.g. 16")
    if not cfg.lora_alpha > 0:
        raise ConfigError(f"--lora_alpha {cfg.lora_alpha}: must be above 0 (scaling = alpha / r), e.g. 32")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"--lora_dropout {cfg.lora_dropout}: must be within [0, 1)")
    modules, params = split_targets(cfg.lora_targets)
    if cfg.lora_r and not (modules or params):
        raise ConfigError("--lora_targets is empty; name modules (q_proj,o_proj) and/or mlp.experts.gate_up_proj")
    if cfg.lora_dropout and params and cfg.lora_r:
        raise ConfigError(
            f"--lora_dropout {cfg.lora_dropout} with expert/weight targets {params}: PEFT applies no dropout to "
            "target_parameters; pass --lora_dropout 0 or drop them from --lora_targets"
        )
    if cfg.lora_adapter:
        if cfg.lora_r:
            raise ConfigError(
                f"--lora_adapter {cfg.lora_adapter} with --lora_r {cfg.lora_r}: the adapter's own config sets the "
                "rank and targets; drop --lora_r"
            )
        if not (Path(cfg.lora_adapter) / CONFIG_FILE).is_file():
            raise ConfigError(f"--lora_adapter {cfg.lora_adapter}: no {CONFIG_FILE}; pass a PEFT adapter folder")


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    modules, params = split_targets(cfg.lora_targets)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=modules,
        target_parameters=params or None,
    )


def resumes_lora(cfg: Any) -> bool:
    """Whether --resume names a LoRA run's step folder (then the base comes from --model_path)."""
    try:
        return bool(cfg.resume) and checkpoint_lora(cfg.resume) is not None
    except CheckpointError as exc:
        raise ConfigError(f"--resume {exc}") from None


def add_lora(cfg: Any, model: nn.Module, state: ParallelState) -> bool:
    """Adapters per the flags, or the resumed run's; True when this run trains LoRA. No collective."""
    try:
        saved = checkpoint_lora(cfg.resume) if cfg.resume else None
        if saved is not None:
            apply_lora(model, state, config_from_dict(saved))
            load_adapter_weights(model, cfg.resume)
        elif cfg.lora_adapter:
            apply_lora(model, state, cfg.lora_adapter)
        elif cfg.lora_r:
            apply_lora(model, state, lora_config(cfg))
        else:
            return False
    except (ValueError, CheckpointError) as exc:
        flag = "--resume" if saved is not None else "--lora_adapter" if cfg.lora_adapter else "--lora_targets"
        raise ConfigError(f"{flag}: {exc}") from None
    return True
