"""The fine-tuning loop: TP inside a node, FSDP2 over the dp ranks with mixed precision (bf16 compute, fp32
master weights and optimizer state, gradients reduced and accumulated in fp32), AdamW with warmup+cosine, gradient
accumulation and clipping by the true global norm, JIT warmup, sharded checkpoints and exact resume."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.lora_checkpoint import lora_extra
from npu_parallel.checkpoint.save import load_training_state, save_sharded
from npu_parallel.convert.mtp import MTP_ATTR, mtp_layers
from npu_parallel.moe.gate_options import set_noise_step
from npu_parallel.moe.load import has_balance_bias
from npu_parallel.parallel import device as _device
from npu_parallel.parallel.data_parallel import Precision, data_parallel
from npu_parallel.parallel.data_parallel import resolve_precision as _resolve
from npu_parallel.parallel.state import ParallelState, init_distributed
from npu_parallel.training import pipeline_run
from npu_parallel.training.config import TrainConfig, add_train_args, check_args, check_inputs, config_from_args
from npu_parallel.training.errors import ConfigError, NonFiniteError
from npu_parallel.training.eval import evaluate, run_eval_set
from npu_parallel.training.expert_load import LoadMonitor
from npu_parallel.training.guards import (
    agree,
    check_same_batch,
    nonfinite_parameter,
    step_is_finite,
    weights_are_finite,
)
from npu_parallel.training.lora import add_lora, resumes_lora
from npu_parallel.training.losses import causal_lm_loss, set_vocab_parallel_logits
from npu_parallel.training.metrics import MetricsLog, peak_memory_mb
from npu_parallel.training.moe_options import gate_options, moe_dispatcher
from npu_parallel.training.optim import build_optimizer, clip_grad_norm_, warmup_cosine
from npu_parallel.training.recompute import apply_recompute
from npu_parallel.training.step import train_step

__all__ = ["TrainConfig", "add_train_args", "config_from_args", "train"]  # the flags live in training.config

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, kind: str) -> Precision:
    """--precision on a device type -> its dtypes (auto: bf16 mixed where the device computes in bf16, else fp32)."""
    try:
        return _resolve(precision, kind)
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from None


def precision_record(mode: Precision) -> dict:
    """What a checkpoint's manifest records of the run's precision (merge writes ``compute`` by default)."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    return {"mode": mode.name, "compute": name[mode.compute], "master": name[mode.master], "reduce": name[mode.reduce]}


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


def run_state(cfg: TrainConfig) -> ParallelState:
    """The run's one distributed state (ConfigError for a tp or ep size the world cannot split, on every rank)."""
    try:
        return init_distributed(cfg.tp_size, ep_size=cfg.ep_size, timeout_s=cfg.timeout_s, pp_size=cfg.pp_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_loaded_weights(cfg: TrainConfig, model_path: str, model) -> None:
    """A checkpoint with NaN or Inf weights is bad input: it could only ever produce skipped steps."""
    name = nonfinite_parameter(model)
    if name is not None:
        flag, path = ("--resume", cfg.resume) if cfg.resume else ("--model_path", model_path)
        raise ConfigError(f"{flag} {path}: {name} holds NaN or Inf; restore the checkpoint's weights")


def _use_mtp(cfg: TrainConfig, model) -> None:
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


def _save(cfg: TrainConfig, model, opt, sched, state: ParallelState, mode: Precision, step: int, position: int) -> Path:
    """A step-N checkpoint, never of non-finite weights (then NonFiniteError on every rank, nothing written)."""
    if not weights_are_finite(model, state):
        raise NonFiniteError(
            f"step {step}: an update left NaN or Inf in the weights, so no checkpoint is written; lower --lr "
            f"(now {cfg.lr:g}) and start again or resume from an earlier checkpoint"
        )
    assert cfg.save_dir is not None
    return save_sharded(
        model,
        Path(cfg.save_dir) / f"step-{step}",
        state,
        optimizer=opt,
        scheduler=sched,
        extra={
            "step": step,
            "data_position": position,
            "config": asdict(cfg),
            "precision": precision_record(mode),
            **lora_extra(model),
        },
        overwrite=bool(cfg.resume or cfg.overwrite),
        trainable_only=bool(lora_extra(model)),  # a LoRA run saves its adapters and their optimizer state
    )


def train(cfg: TrainConfig, state: ParallelState | None = None) -> dict:
    """Fine-tune ``cfg.model_path``; returns the per-step losses and where checkpoints and logs went.

    ``state``: the run's distributed state when the caller built it (the command line does, once per run);
    None builds it here from ``cfg.tp_size``/``cfg.ep_size``.

    Every argument and input is checked before the model loads (ConfigError on every rank). A step whose loss
    or gradient norm is not finite on any rank is skipped on all of them: no optimizer step, its gradients
    dropped, the LR schedule not advanced (it counts the updates applied), its batch consumed and its metrics
    line holding null; ``cfg.max_nonfinite_steps`` such steps in a row stop the run with NonFiniteError.
    """
    check_args(cfg)
    if state is None:
        state = run_state(cfg)
    main = state.rank == 0
    mode = resolve_precision(cfg.precision, state.device.type)
    torch.manual_seed(cfg.seed)
    inputs = agree(lambda: check_inputs(cfg, state), state)
    evals = agree(lambda: run_eval_set(cfg, inputs, state), state)
    data, start = inputs.data, inputs.start
    if main:
        for path in inputs.replaced:  # --overwrite: the earlier run's checkpoints go before this run writes any
            logger.warning("--overwrite: removing %s of an earlier run", path)
            shutil.rmtree(path)

    # the master weights: fp32 under mixed precision (a bf16 checkpoint upcast; a resumed one's fp32 kept); a LoRA
    # base is frozen, so it stays in the compute dtype (its adapters are fp32)
    lora = bool(cfg.lora_r or cfg.lora_adapter) or resumes_lora(cfg)
    if cfg.resume and not lora:
        model = load_sharded(
            cfg.resume,
            state,
            moe_impl=moe_dispatcher(cfg, state),
            dtype=mode.master,
            aux_loss_coef=cfg.aux_loss_coef,
            trust_remote_code=cfg.trust_remote_code,
            gate_options=gate_options(cfg),
        )
    else:
        model = load_pretrained(
            inputs.model_path,
            state,
            dtype=mode.compute if lora else mode.master,
            moe_impl=moe_dispatcher(cfg, state),
            progress=main,
            aux_loss_coef=cfg.aux_loss_coef,
            trust_remote_code=cfg.trust_remote_code,
            gate_options=gate_options(cfg),
        )
    agree(lambda: add_lora(cfg, model, state), state)  # LoRA: adapters only train (training/lora.py)
    agree(lambda: _check_loaded_weights(cfg, inputs.model_path, model), state)
    agree(lambda: _use_mtp(cfg, model), state)
    if cfg.bias_update_rate > 0 and not has_balance_bias(model):
        raise ConfigError(
            f"--bias_update_rate {cfg.bias_update_rate:g}: this model's routers have no e_score_correction_bias "
            f"(DeepSeek-V3's auxiliary-loss-free balancing); pass 0"
        )
    apply_recompute(model, "full" if cfg.gradient_checkpointing else cfg.recompute)  # before FSDP2 wraps it
    if cfg.vocab_parallel_loss:
        set_vocab_parallel_logits(model, True)
    model.train()
    pp = pipeline_run.setup(cfg, model, state, mode)  # --pp_size > 1: the stages, each FSDP2 over dp (else None)
    if pp is None:
        data_parallel(model, state, precision=mode)  # FSDP2 over dp (also at dp = 1: the precision policy)

    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, params=None if pp is None else pp.parameters())
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    if cfg.resume:
        load_training_state(cfg.resume, state, optimizer=opt, scheduler=sched)
        if main:
            logger.info("resumed from %s at step %d", cfg.resume, start)

    if pp is None:
        warm = jit_warmup(model, state, cfg.vocab_parallel_loss, cfg.jit_warmup_steps, model.config.vocab_size)
    else:
        warm = pp.warmup(cfg.jit_warmup_steps, cfg.grad_accum, (1, 16), model.config.vocab_size)
    if main and warm:
        logger.info("JIT warmup: %d passes in %.1f s", cfg.jit_warmup_steps, warm)
    load = LoadMonitor(
        cfg.log_dir,
        main,
        idle_steps=cfg.warn_idle_steps,
        max_ratio=cfg.warn_load_ratio,
        bias_update_rate=cfg.bias_update_rate,
        reader=None if pp is None else pp.read_load,
    )
    load.reset(model)  # the warmup passes are not steps

    last = min(cfg.steps, cfg.stop_after or cfg.steps)
    log = MetricsLog(cfg.log_dir, main, cfg.steps, start, resume=bool(cfg.resume))
    tokens_per_step = data.tokens_per_batch * cfg.grad_accum * state.dp_size
    saved = None
    nonfinite: list[int] = []  # the current run of consecutive skipped steps
    try:
        for step in range(start, last):
            t0 = time.perf_counter()
            batches = [b.to(state.device) for b in data.next_step()]  # the step's grad_accum micro-batches
            if step == start:
                check_same_batch(batches[0].input_ids, state, step + 1)
            set_noise_step(model, step, state.dp_rank)  # router noise by (step, dp rank): a resumed run draws alike
            # the global batch's loss: summed over its supervised targets, divided by their global count
            # (training/step.py); FSDP2 reduces the gradients on the last micro-batch only
            if pp is not None:
                losses = pp.step(batches)  # the same global batch and normalization through the stages
            else:
                losses = train_step(
                    model, batches, state, vocab_parallel=cfg.vocab_parallel_loss, mtp_weight=cfg.mtp_loss_weight
                )
            total, _, aux_total, mtp_total = losses.reduce(state)
            assert total is not None
            norm = clip_grad_norm_(model, cfg.grad_clip, state) if pp is None else pp.clip(cfg.grad_clip)
            lr = sched.get_last_lr()[0]
            finite = step_is_finite(total, norm, state)
            if finite:
                opt.step()
                sched.step()
                nonfinite.clear()
            else:
                nonfinite.append(step + 1)
            opt.zero_grad(set_to_none=True)
            load_fields = load.step(model, state, step + 1, update=finite)  # and the V3 routing bias, if asked
            seconds = time.perf_counter() - t0  # the step's own time (tokens/s), the eval after it not counted
            at_end = step + 1 == last
            eval_fields = {}
            if evals is not None and (at_end or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                eval_fields = evaluate(model, evals, state, vocab_parallel=cfg.vocab_parallel_loss).fields()
            log.step(
                {
                    "step": step + 1,
                    "loss": total,
                    "aux_loss": aux_total,
                    "mtp_loss": mtp_total,
                    "lr": lr,
                    "grad_norm": norm.item(),
                    "tokens_per_s": tokens_per_step / seconds,
                    "step_s": seconds,
                    "peak_mem_mb": peak_memory_mb(state.device),
                    "skipped": not finite,
                    **load_fields,
                    **eval_fields,
                }
            )
            if not finite:
                _nonfinite_step(cfg, nonfinite, total, norm.item(), main)
            if cfg.save_dir and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or at_end):
                if pp is not None:
                    pp.sync_weights()  # the other stages' parameters from their owners: a pp 1 run's folder
                saved = _save(cfg, model, opt, sched, state, mode, step + 1, data.position)
    finally:
        plot = log.close()
        load_plot = load.close()
    return {
        "losses": [r["loss"] for r in log.records],
        "steps": [r["step"] for r in log.records],
        "records": log.records,
        "checkpoint": str(saved) if saved else None,
        "metrics": str(log.path) if log.path else None,
        "plot": str(plot) if plot else None,
        "load_plot": str(load_plot) if load_plot else None,
        "plotted_steps": log.plotted,
        "state": {"world": state.world_size, "tp": state.tp_size, "dp": state.dp_size},
        "param_dtypes": {  # what the optimizer updates (master) and what stays frozen (a LoRA base)
            kind: sorted({str(p.dtype) for p in model.parameters() if p.requires_grad == trains})
            for kind, trains in (("trainable", True), ("frozen", False))
        },
    }


def _nonfinite_step(cfg: TrainConfig, run: list[int], loss: float, norm: float, main: bool) -> None:
    """Warn of a skipped step; raise NonFiniteError (every rank alike) once ``max_nonfinite_steps`` are in a row."""
    what = f"loss {loss:.4g}, grad norm {norm:.4g}"
    if len(run) >= cfg.max_nonfinite_steps:
        span = f"step {run[0]}" if len(run) == 1 else f"steps {run[0]}-{run[-1]}"
        raise NonFiniteError(
            f"{span}: loss or gradient norm not finite {len(run)} times in a row (last: {what}); stopped by "
            f"--max_nonfinite_steps {cfg.max_nonfinite_steps}, nothing saved for these steps: lower --lr "
            f"(now {cfg.lr:g}), check the data, or resume from the last checkpoint"
        )
    if main:
        logger.warning(
            "step %d: %s; skipped (no update, gradients dropped, LR schedule held), %d of %d allowed in a row",
            run[-1],
            what,
            len(run),
            cfg.max_nonfinite_steps,
        )
