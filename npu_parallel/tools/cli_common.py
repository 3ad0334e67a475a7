"""What every ``npu-parallel`` verb shares: the one-line argparse errors, progress lines, dtype names, and the
mapping of checkpoint errors and failed ranks to exit codes."""

from __future__ import annotations

import json
import sys

from npu_parallel.tools.checks import UserError
from npu_parallel.training.errors import EXIT_BAD_INPUT, EXIT_FAILED
from npu_parallel.training.flags import FlagParser


class Parser(FlagParser):
    """argparse whose errors are one line (no usage block) with exit code 2, like every other bad input; one
    flag spelling (``--moe_impl``, with ``--moe-impl`` accepted)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def progress(verb: str):
    """A printer of ``npu-parallel VERB: ...`` progress lines on stderr (stdout keeps the tables)."""

    def say(message: str) -> None:
        print(f"npu-parallel {verb}: {message}", file=sys.stderr, flush=True)

    return say


DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def parse_dtype(value: str | None):
    import torch

    if value is None:
        return None
    if value.lower() not in DTYPES:
        raise UserError(f"--dtype {value!r} is not one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[value.lower()])


def checkpoint_errors(fn):
    """Turn the checkpoint's and the plan's ValueErrors (bad input) into exit code 2."""

    def run(args):
        try:
            return fn(args)
        except ValueError as exc:  # CheckpointError included
            raise UserError(str(exc).splitlines()[0]) from None

    run.__doc__ = fn.__doc__
    return run


def dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def ranks_failed(verb: str, exc: RuntimeError) -> int:
    """Exit 1 for ranks that failed; a collective that failed in place (inside torchrun) is named in one line."""
    from npu_parallel.parallel.watchdog import explain

    line = explain(exc)
    print(f"npu-parallel {verb}: the ranks failed: {line or exc}", file=sys.stderr)
    return EXIT_FAILED
