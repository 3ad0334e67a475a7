"""The command line of a training run, shared by ``examples/train_*.py``, ``npu-parallel train`` and
``python -m npu_parallel.training.cli``; ``--config run.yaml`` gives every flag as a key (training/run_config.py).

Exit codes: 0 trained; 2 a bad argument or input (one line on stderr, before the model loads); 3 stopped on
non-finite losses or gradient norms (one line on stderr; no non-finite checkpoint is written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.hf_compat import unsupported_transformers
from npu_parallel.parallel.state import ParallelState, destroy_distributed
from npu_parallel.training.config import TrainConfig, add_train_args, check_args, config_from_args
from npu_parallel.training.errors import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK, ConfigError, NonFiniteError
from npu_parallel.training.flags import FlagParser
from npu_parallel.training.metrics import METRICS_FILE
from npu_parallel.training.run_config import add_config_arg, config_values, parse_run_args, write_run_config

logger = logging.getLogger(__name__)

__all__ = ["DESCRIPTION", "TRAIN_DEFAULTS", "build_parser", "parse", "run", "summary"]

DESCRIPTION = "Fine-tune a Mixture-of-Experts checkpoint with tensor/expert parallelism under torchrun"
# the defaults of `npu-parallel train` and examples/train_tp_moe.py (over TrainConfig's)
TRAIN_DEFAULTS = dict(batch_size=1, max_length=512, steps=100, lr=1e-5, warmup_steps=10)


def summary(result: dict) -> str:
    """The run's closing line: first and last loss, the checkpoint, the metrics, the loss curve, the load map."""
    losses = result["losses"]
    return (
        f"== done: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps"
        + (f"; checkpoint {result['checkpoint']}" if result["checkpoint"] else "")
        + (f"; metrics {result['metrics']}" if result["metrics"] else "")
        + (f"; loss curve {result['plot']}" if result["plot"] else "")
        + (f"; expert load {result['load_plot']}" if result.get("load_plot") else "")
    )


def build_parser(
    parser: argparse.ArgumentParser | None = None,
    *,
    description: str = DESCRIPTION,
    defaults: dict | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    prog: str | None = None,
) -> argparse.ArgumentParser:
    """The training flags (``--config`` first) on ``parser``, or on a new one."""
    if parser is None:
        parser = FlagParser(prog=prog, description=description)
    add_config_arg(parser)
    add_train_args(parser, **(defaults or {}))
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def parse(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    resolve: Callable[[argparse.Namespace], None] | None = None,
) -> tuple[argparse.Namespace, TrainConfig]:
    """The arguments (``--config``'s values under the command line's) and their checked TrainConfig; ConfigError
    for a bad config file or value, before any process group."""
    args = parse_run_args(parser, argv)
    if why := unsupported_transformers():
        raise ConfigError(why)
    if resolve is not None:
        resolve(args)
    cfg = config_from_args(args)
    check_args(cfg)  # before the process group: a bad value costs no rendezvous
    return args, cfg


def _record_config(parser: argparse.ArgumentParser, args, cfg: TrainConfig, argv: list[str], state) -> None:
    """Rank 0: the resolved config as config.yaml in --log_dir, beside metrics.jsonl. A log_dir that
    check_inputs will refuse (an earlier run's metrics, no --resume or --overwrite) keeps that run's file."""
    if state.rank != 0 or not cfg.log_dir:
        return
    log_dir = Path(cfg.log_dir)
    metrics = log_dir / METRICS_FILE
    if (log_dir.exists() and not log_dir.is_dir()) or (
        metrics.is_file() and metrics.stat().st_size and not (cfg.resume or cfg.overwrite)
    ):
        return
    world = f"world {state.world_size} (tp {state.tp_size}, ep {state.ep_size}, dp {state.dp_size})"
    try:
        write_run_config(log_dir, config_values(parser, args, cfg), parser.prog, argv, world)
    except OSError as exc:  # rank 0 alone: a warning, never an error the other ranks would not take
        logger.warning("--log_dir %s: could not write config.yaml (%s); the run goes on without it", log_dir, exc)


def run(
    argv: list[str] | None = None,
    *,
    description: str = DESCRIPTION,
    defaults: dict | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    resolve: Callable[[argparse.Namespace], None] | None = None,
    prepare: Callable[[argparse.Namespace, ParallelState], None] | None = None,
    prog: str | None = None,
) -> int:
    """Parse, check, train; return the exit code (the caller exits with it).

    ``defaults`` overrides TrainConfig's defaults, ``add_arguments`` adds a script's own flags, ``resolve(args)``
    fills defaults that depend on other flags (before any check), ``prepare(args, state)`` runs once the process
    group exists and before the inputs are checked (e.g. building a default model on rank 0). ``--config
    run.yaml`` sets any of the flags; the resolved config is written as config.yaml in --log_dir.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(description=description, defaults=defaults, add_arguments=add_arguments, prog=prog)
    try:
        args, cfg = parse(parser, argv, resolve)
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code, message, result = EXIT_OK, None, None
    state: ParallelState | None = None
    try:
        from npu_parallel.training.loop import run_state, train  # the attention kernels need transformers >= 4.51

        state = run_state(cfg)  # the run's one state: train() uses it, never builds another
        _record_config(parser, args, cfg, argv, state)
        if prepare is not None:
            prepare(args, state)
        result = train(config_from_args(args), state)
    except (ConfigError, CheckpointError) as exc:
        code, message = EXIT_BAD_INPUT, str(exc)
    except NonFiniteError as exc:
        code, message = EXIT_NONFINITE, str(exc)
    finally:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0") or 0)
        state = None  # its groups go with the process group, not at interpreter exit (see destroy_distributed)
        destroy_distributed()
    if rank == 0:  # every rank took the same decision; one of them says it
        if message is not None:
            print(f"{parser.prog}: error: {message}", file=sys.stderr, flush=True)
        elif result is not None:
            print(summary(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run(prog="python -m npu_parallel.training.cli"))
