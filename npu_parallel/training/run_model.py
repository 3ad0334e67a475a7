"""The model of a training run, before the loop: its distributed state and precision, loaded or resumed, LoRA
added, its weights and MTP layers checked, recomputation applied, and the JIT warmup that compiles its kernels."""

from __future__ import annotations

import time
from typing import Any

import torch

from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.convert.mtp import MTP_ATTR, mtp_layers
from npu_parallel.moe.load import has_balance_bias
from npu_parallel.parallel import device as _device
from npu_parallel.parallel.data_parallel import Precision
from npu_parallel.parallel.data_parallel import resolve_precision as _resolve
from npu_parallel.parallel.state import ParallelState, init_distributed
from npu_parallel.training.config import TrainConfig
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.guards import agree, nonfinite_parameter
from npu_parallel.training.lora import add_lora, resumes_lora
from npu_parallel.training.losses import causal_lm_loss, set_vocab_parallel_logits
from npu_parallel.training.moe_options import conversion_options
from npu_parallel.training.recompute import apply_recompute

__all__ = ["jit_warmup", "load_run_model", "resolve_precision", "run_state"]


def resolve_precision(precision: str, kind: str) -> Precision:
    """--precision on a device type -> its dtypes (auto: bf16 mixed where the device computes in bf16, else fp32)."""
    try:
        return _resolve(precision, kind)
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from None


def run_state(cfg: TrainConfig) -> ParallelState:
    """The run's one distributed state (ConfigError for a tp or ep size the world cannot split, on every rank)."""
    try:
        return init_distributed(cfg.tp_size, ep_size=cfg.ep_size, timeout_s=cfg.timeout_s, pp_size=cfg.pp_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_loaded_weights(cfg: TrainConfig, model_path: str, model) -> None:
    """A checkpoint with NaN or Inf weights is bad input: it could only ever produce skipped steps."""
    name = nonfinite_parameter(model)
    if name is not None:
        flag, path = ("--resume", cfg.resume) if cfg.resume else ("--model_path", model_path)
        raise ConfigError(f"{flag} {path}: {name} holds NaN or Inf; restore the checkpoint's weights")


def use_mtp(cfg: TrainConfig, model) -> None:
    """MTP layers train with --mtp_loss_weight > 0 (which needs them) and stay frozen, untouched, at 0."""
    layers = mtp_layers(model)
    if cfg.mtp_loss_weight and not layers:
        source = cfg.resume or cfg.model_path
        raise ConfigError(
            f"--mtp_loss_weight {cfg.mtp_loss_weight}: {source} has no MTP layers ({MTP_ATTR} unset, or their "
            f"tensors not stored); pass --mtp_loss_weight 0 or a checkpoint that keeps them (DeepSeek-V3's)"
        )
    for layer in layers:
        layer.requires_grad_(bool(cfg.mtp_loss_weight))


def load_run_model(cfg: TrainConfig, model_path: str, state: ParallelState, mode: Precision, main: bool) -> Any:
    """The run's model: loaded (or resumed) in the master dtype, LoRA added, its weights and MTP layers checked,
    recomputation applied (before FSDP2 wraps it), in train mode. ConfigError on every rank alike."""
    # the master weights: fp32 under mixed precision (a bf16 checkpoint upcast; a resumed one's fp32 kept); a LoRA
    # base is frozen, so it stays in the compute dtype (its adapters are fp32)
    lora = bool(cfg.lora_r or cfg.lora_adapter) or resumes_lora(cfg)
    options = conversion_options(cfg)  # the conversion's choices, one object from the config to the dispatcher
    if cfg.resume and not lora:
        model = load_sharded(
            cfg.resume, state, dtype=mode.master, trust_remote_code=cfg.trust_remote_code, options=options
        )
    else:
        model = load_pretrained(
            model_path,
            state,
            dtype=mode.compute if lora else mode.master,
            progress=main,
            trust_remote_code=cfg.trust_remote_code,
            options=options,
        )
    agree(lambda: add_lora(cfg, model, state), state)  # LoRA: adapters only train (training/lora.py)
    agree(lambda: check_loaded_weights(cfg, model_path, model), state)
    agree(lambda: use_mtp(cfg, model), state)
    if cfg.bias_update_rate > 0 and not has_balance_bias(model):
        raise ConfigError(
            f"--bias_update_rate {cfg.bias_update_rate:g}: this model's routers have no e_score_correction_bias "
            f"(DeepSeek-V3's auxiliary-loss-free balancing); pass 0"
        )
    apply_recompute(model, "full" if cfg.gradient_checkpointing else cfg.recompute)  # before FSDP2 wraps it
    if cfg.vocab_parallel_loss:
        set_vocab_parallel_logits(model, True)
    model.train()
    return model


def jit_warmup(model, state, vocab_parallel: bool, steps: int, vocab: int) -> float:
    """Forward and backward on a tiny batch so kernels compile before the first timed step (HCCL timeouts)."""
    if steps <= 0:
        return 0.0
    npu = _device.torch_npu_module()
    if npu is not None and hasattr(npu.npu, "set_compile_mode"):
        npu.npu.set_compile_mode(jit_compile=False)
    t0 = time.perf_counter()
    ids = torch.arange(16, device=state.device).remainder(vocab).unsqueeze(0)
    devices = [] if state.device.type == "cpu" else [state.device]
    with torch.random.fork_rng(devices=devices, device_type=state.device.type):
        for _ in range(steps):
            loss, _ = causal_lm_loss(model, ids, ids, vocab_parallel=vocab_parallel)
            loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0
