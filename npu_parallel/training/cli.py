"""The command line of a training run, shared by ``examples/train_*.py`` and ``python -m npu_parallel.training.cli``.

Exit codes: 0 trained; 2 a bad argument or input (one line on stderr, before the model loads); 3 stopped on
non-finite losses or gradient norms (one line on stderr; no non-finite checkpoint is written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import torch.distributed as dist

from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.hf_compat import unsupported_transformers
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.config import add_train_args, check_args, config_from_args
from npu_parallel.training.errors import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK, ConfigError, NonFiniteError
from npu_parallel.training.flags import FlagParser

__all__ = ["run", "summary"]


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


def run(
    argv: list[str] | None = None,
    *,
    description: str = "Fine-tune a Mixture-of-Experts checkpoint with tensor/expert parallelism under torchrun",
    defaults: dict | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    resolve: Callable[[argparse.Namespace], None] | None = None,
    prepare: Callable[[argparse.Namespace, ParallelState], None] | None = None,
    prog: str | None = None,
) -> int:
    """Parse, check, train; return the exit code (the caller exits with it).

    ``defaults`` overrides TrainConfig's defaults, ``add_arguments`` adds a script's own flags, ``resolve(args)``
    fills defaults that depend on other flags (before any check), ``prepare(args, state)`` runs once the process
    group exists and before the inputs are checked (e.g. building a default model on rank 0).
    """
    parser = FlagParser(prog=prog, description=description)
    add_train_args(parser, **(defaults or {}))
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code, message, result = EXIT_OK, None, None
    try:
        if why := unsupported_transformers():
            raise ConfigError(why)
        from npu_parallel.training.loop import run_state, train  # the attention kernels need transformers >= 4.51

        if resolve is not None:
            resolve(args)
        check_args(config_from_args(args))  # before the process group: a bad value costs no rendezvous
        state = run_state(config_from_args(args))  # the run's one state: train() uses it, never builds another
        if prepare is not None:
            prepare(args, state)
        result = train(config_from_args(args), state)
    except (ConfigError, CheckpointError) as exc:
        code, message = EXIT_BAD_INPUT, str(exc)
    except NonFiniteError as exc:
        code, message = EXIT_NONFINITE, str(exc)
    finally:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0") or 0)
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:  # every rank took the same decision; one of them says it
        if message is not None:
            print(f"{parser.prog}: error: {message}", file=sys.stderr, flush=True)
        elif result is not None:
            print(summary(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run(prog="python -m npu_parallel.training.cli"))
