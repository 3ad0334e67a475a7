"""``npu-parallel train [--config run.yaml] [--flag value ...] [--nproc_per_node N]``: a training run, the same code
as ``examples/train_tp_moe.py`` (:func:`npu_parallel.training.cli.run`, in this process).

Under torchrun (``torchrun --nproc_per_node 8 -m npu_parallel.tools.cli train --config run.yaml``) every rank runs
it in place. Outside torchrun, ``--nproc_per_node N`` starts N ranks through torchrun itself (standalone, one node)
once the flags and the config file have been checked; without it the run is one process. Exit codes as the
training command line's: 0 trained, 2 bad input (one line, before any process group), 3 non-finite losses; a
launched run returns torchrun's exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from npu_parallel.tools.checks import UserError
from npu_parallel.training.errors import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK

__all__ = ["PROG", "add_train_parser", "build_train_parser", "cmd_train", "main_train", "train_argv"]

PROG = "npu-parallel train"
EXIT_FILE = "NPU_PARALLEL_TRAIN_EXIT_FILE"  # where rank 0 of a launched run leaves its exit code (torchrun gives 1)
# the launched ranks keep their progress bar (launch's RANK_DEFAULTS turn tqdm off for test and verify ranks)
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def add_train_parser(sub) -> None:
    """List ``npu-parallel train`` among the verbs. Its flags are the training flags, and building them imports
    torch, which ``npu-parallel --help`` must not: :func:`main_train` parses them (``cli.main`` hands it the
    command line)."""
    p = sub.add_parser("train", help="fine-tune a checkpoint (flags or --config run.yaml)", add_help=False)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda args: main_train(list(args.train_args)))


def build_train_parser() -> argparse.ArgumentParser:
    """The verb's parser: every training flag, ``--config`` and ``--nproc_per_node``."""
    from npu_parallel.training.cli import DESCRIPTION, TRAIN_DEFAULTS, build_parser

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    build_parser(p, defaults=TRAIN_DEFAULTS)
    p.add_argument(
        "--nproc_per_node",
        type=int,
        default=None,
        help="start this many ranks through torchrun (one node); under torchrun: must equal its ranks per node",
    )
    # only the flags given stay in the namespace: they are handed on as they were written (training.cli.run
    # parses them again under the --config file's values)
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            if action.help and "%(default)" in action.help:
                action.help = action.help.replace("%(default)s", str(action.default))
            action.default = argparse.SUPPRESS
    p.set_defaults(train_parser=p)
    return p


def main_train(argv: list[str]) -> int:
    """``npu-parallel train ARGV``: parse the training flags and run (exit 2 with one line on bad input)."""
    args = build_train_parser().parse_args(argv)
    try:
        return cmd_train(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def train_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The training flags given on the command line (those in ``args``), as a command line again."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", *skip) or not hasattr(args, action.dest):
            continue
        flag, value = action.option_strings[0], getattr(args, action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true / store_false: given
            out.append(flag)
        elif isinstance(value, list):
            out += [f"{flag}={v}" for v in value]
        else:
            out.append(f"{flag}={value}")  # --flag=VALUE: a value starting with '-' stays a value
    return out


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def cmd_train(args: argparse.Namespace) -> int:
    """Train in this process (alone or as a torchrun rank), or start ``--nproc_per_node`` ranks with torchrun."""
    from npu_parallel.training.cli import TRAIN_DEFAULTS, build_parser, parse, run
    from npu_parallel.training.errors import ConfigError

    nproc = getattr(args, "nproc_per_node", None)
    argv = train_argv(args.train_parser, args, skip=("nproc_per_node",))
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc_per_node {nproc}: must be at least 1")
    if "RANK" in os.environ:  # a torchrun rank: it started the ranks already
        if nproc is not None and nproc != _local_world():
            raise UserError(
                f"--nproc_per_node {nproc}: this process is a torchrun rank with {_local_world()} ranks per node "
                f"(LOCAL_WORLD_SIZE); drop --nproc_per_node or pass torchrun's"
            )
        code = run(argv, prog=PROG, defaults=TRAIN_DEFAULTS)
        if not os.environ.get(EXIT_FILE):
            return code
        # started by --nproc_per_node: rank 0 hands its code to the launcher, and a decision every rank took alike
        # (2 bad input, 3 non-finite: said in one line) is no crash for torchrun to report with a traceback
        if os.environ["RANK"] == "0":
            Path(os.environ[EXIT_FILE]).write_text(str(code))
        return EXIT_OK if code in (EXIT_BAD_INPUT, EXIT_NONFINITE) else code
    if nproc is None or nproc == 1:
        return run(argv, prog=PROG, defaults=TRAIN_DEFAULTS)
    try:  # every mistake the flags and the config file can hold, here, before a rank starts
        parse(build_parser(prog=PROG, defaults=TRAIN_DEFAULTS), argv)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    return _launch(argv, nproc)


def _launch(argv: list[str], nproc: int) -> int:
    """``nproc`` ranks of ``npu-parallel train ARGV`` under torchrun; rank 0's exit code where it is not 0 (2: bad
    input the ranks found, 3: non-finite), else torchrun's."""
    from npu_parallel.tools.launch import run_module

    print(f"{PROG}: starting {nproc} ranks with torchrun", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="npu-parallel-train-") as tmp:
        exit_file = Path(tmp) / "rank0.exit"
        try:
            rc = run_module(
                ["npu_parallel.tools.cli", "train", *argv], nproc, defaults=LAUNCH_ENV, env={EXIT_FILE: str(exit_file)}
            )
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; the ranks were stopped", file=sys.stderr, flush=True)
            return 130
        recorded = exit_file.read_text().strip() if exit_file.is_file() else ""
    return int(recorded) if recorded.isdigit() and int(recorded) else rc
