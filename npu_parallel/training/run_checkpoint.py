"""A training run's step-N checkpoints and its stop rule for non-finite steps."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from npu_parallel.checkpoint.lora_checkpoint import lora_extra
from npu_parallel.checkpoint.save import save_sharded
from npu_parallel.parallel.data_parallel import Precision
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.config import TrainConfig
from npu_parallel.training.errors import NonFiniteError
from npu_parallel.training.guards import weights_are_finite

__all__ = ["nonfinite_step", "precision_record", "save_step"]

logger = logging.getLogger(__name__)


def precision_record(mode: Precision) -> dict:
    """What a checkpoint's manifest records of the run's precision (merge writes ``compute`` by default)."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    return {"mode": mode.name, "compute": name[mode.compute], "master": name[mode.master], "reduce": name[mode.reduce]}


def save_step(
    cfg: TrainConfig, model, opt, sched, state: ParallelState, mode: Precision, step: int, position: int
) -> Path:
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


def nonfinite_step(cfg: TrainConfig, run: list[int], loss: float, norm: float, main: bool) -> None:
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
