"""The pipeline flags' rules (``--pp_size``, ``--pp_schedule``, ``--pp_virtual``, ``--pp_layers``): the values
alone (:func:`check_pp_args`, before the process group), against the model's config (:func:`check_pp_model`,
before the model loads). Each broken rule is one ConfigError naming the value, the rule and the fix;
combinations the pipeline cannot run yet are refused here rather than trained silently wrong."""

from __future__ import annotations

from typing import Any

from npu_parallel.convert.mtp import num_mtp_layers
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.pipeline import SCHEDULES, check_schedule, stages_per_rank
from npu_parallel.training.pipeline_split import resolve_split

__all__ = ["check_pp_args", "check_pp_model"]


def check_pp_args(cfg: Any) -> None:
    """The --pp_* values on their own and against the other flags."""
    if cfg.pp_size < 1:
        raise ConfigError(f"--pp_size {cfg.pp_size}: must be at least 1 (1: no pipeline stages)")
    if cfg.pp_virtual < 1:
        raise ConfigError(f"--pp_virtual {cfg.pp_virtual}: must be at least 1 (stages per rank)")
    if cfg.pp_schedule not in SCHEDULES:
        raise ConfigError(f"--pp_schedule {cfg.pp_schedule!r} is not a schedule; use one of {sorted(SCHEDULES)}")
    if cfg.pp_size == 1:
        if cfg.pp_layers:
            raise ConfigError(f"--pp_layers {cfg.pp_layers!r} needs --pp_size 2 or more (it splits the stages)")
        return
    check_schedule(cfg.pp_schedule, cfg.pp_size, cfg.grad_accum, cfg.pp_virtual)
    for flag, value, what in (
        ("router_z_loss", cfg.router_z_loss, "the router z-loss does not cross the stages yet"),
        ("capacity_factor", cfg.capacity_factor, "the stages do not count the dropped slots yet"),
    ):
        if value:
            raise ConfigError(
                f"--{flag} {value} with --pp_size {cfg.pp_size}: {what}; drop --{flag} or use --pp_size 1"
            )
    if cfg.eval_data or cfg.eval_split or cfg.eval_every:
        flag = "--eval_data" if cfg.eval_data else "--eval_split" if cfg.eval_split else "--eval_every"
        raise ConfigError(
            f"{flag} with --pp_size {cfg.pp_size}: eval during training does not run through pipeline stages yet; "
            f"drop it and evaluate the saved checkpoint with `npu-parallel eval`"
        )


def check_pp_model(cfg: Any, model_config: Any, state: ParallelState) -> None:
    """The split against the model and the layout: stages vs decoder layers, --pp_layers summing to the layer
    count, an embedding the first and the last stage share that one rank would hold twice (V schedules), and
    expert all-to-all (ep > tp) inside a stage, untested so far."""
    if cfg.pp_size == 1:
        return
    if state.ep_size > state.tp_size:
        raise ConfigError(
            f"--ep_size {state.ep_size} above tp {state.tp_size} with --pp_size {cfg.pp_size}: expert all-to-all "
            f"inside pipeline stages is not supported yet; pass --ep_size {state.tp_size} (or --pp_size 1)"
        )
    per = stages_per_rank(cfg.pp_schedule, cfg.pp_virtual)
    resolve_split(model_config, cfg.pp_size * per, cfg.pp_layers)
    shared = bool(getattr(model_config, "tie_word_embeddings", False)) or bool(
        cfg.mtp_loss_weight and num_mtp_layers(model_config)
    )
    if shared and SCHEDULES[cfg.pp_schedule][2] == "v":
        raise ConfigError(
            f"--pp_schedule {cfg.pp_schedule} puts the first and the last stage on one rank, and this model's "
            f"embedding is used on both (MTP or tied embeddings): not supported yet; use --pp_schedule 1f1b"
        )
