"""The fine-tuning loop, orchestration only: TP inside a node, FSDP2 over the dp ranks with mixed precision (bf16
compute, fp32 master weights and optimizer state, gradients reduced and accumulated in fp32), AdamW with
warmup+cosine, gradient accumulation and clipping by the true global norm, JIT warmup, sharded checkpoints and
exact resume. The model is made in training/run_model.py, a step in training/step.py (or the pipeline's in
training/pipeline_run.py), checkpoints in training/run_checkpoint.py."""

from __future__ import annotations

import logging
import shutil
import time

import torch

from npu_parallel.checkpoint.save import load_training_state
from npu_parallel.moe.gate_options import set_noise_step
from npu_parallel.parallel.data_parallel import data_parallel
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training import pipeline_run
from npu_parallel.training.config import TrainConfig, add_train_args, check_args, check_inputs, config_from_args
from npu_parallel.training.eval import evaluate, run_eval_set
from npu_parallel.training.expert_load import LoadMonitor
from npu_parallel.training.guards import agree, check_same_batch, step_is_finite
from npu_parallel.training.metrics import MetricsLog, peak_memory_mb
from npu_parallel.training.optim import build_optimizer, clip_grad_norm_, warmup_cosine
from npu_parallel.training.run_checkpoint import nonfinite_step, save_step
from npu_parallel.training.run_model import jit_warmup, load_run_model, resolve_precision, run_state
from npu_parallel.training.step import train_step

__all__ = ["TrainConfig", "add_train_args", "config_from_args", "run_state", "train"]  # flags: training.config

logger = logging.getLogger(__name__)


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

    model = load_run_model(cfg, inputs.model_path, state, mode, main)  # loaded, LoRA, checked, ready to train
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
                nonfinite_step(cfg, nonfinite, total, norm.item(), main)
            if cfg.save_dir and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or at_end):
                if pp is not None:
                    pp.sync_weights()  # the other stages' parameters from their owners: a pp 1 run's folder
                saved = save_step(cfg, model, opt, sched, state, mode, step + 1, data.position)
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
