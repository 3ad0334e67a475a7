"""Bad input, found before anything slow starts: one line on stderr and exit code 2 (``npu-parallel``).

:class:`UserError` is the one exception the command reports that way (with the checkpoint layer's
ValueErrors). :func:`check_args` holds every numeric flag to its range, :func:`check_weights` reads a
checkpoint's config and every safetensors header and checks each weight's shape against the config before
a model is built (a corrupt file or a config of another model would otherwise surface as a traceback from
transformers, or from a rank), :func:`check_output_file` refuses an output a run could not write at its end,
and :func:`read_text` reads a sample file as UTF-8 or names the file and the first bad byte.
Only the standard library is imported at module level: ``npu-parallel --help`` must not load torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

__all__ = ["UserError", "check_args", "check_moe_impl", "check_output_file", "check_weights", "read_text"]


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line with exit code 2."""


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _percent(v) -> bool:
    return 0 <= v <= 100


# argparse dest -> (rule, what the rule says); a flag absent from a verb, or None (its default), is skipped
ARG_RULES = {
    "tp": (_positive, "a positive integer"),
    "tokens": (_positive, "a positive integer"),
    "batch": (_positive, "a positive integer"),
    "seq": (_positive, "a positive integer"),
    "max_shard_gb": (_positive, "a positive number of GB"),
    "atol": (_non_negative, "a number >= 0"),
    "grad_atol": (_non_negative, "a number >= 0"),
    "min_agree": (_percent, "a percentage in [0, 100]"),
}


def flag(dest: str) -> str:
    return "--" + dest


def check_args(args: argparse.Namespace) -> None:
    """Every numeric flag of the verb within its range (string-valued ones, e.g. verify's ``--tp 1,2``, elsewhere)."""
    for dest, (ok, rule) in ARG_RULES.items():
        value = getattr(args, dest, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise UserError(f"{flag(dest)} {value}: must be {rule}")


def check_output_file(path: str | None, option: str) -> None:
    """``path`` (a file the run writes at its end) is not a folder, and a file can be created where it goes.

    Probed for real (a temporary file in the nearest existing folder, removed at once): permission bits say
    nothing for root or on a read-only mount.
    """
    if not path:
        return
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise UserError(f"{option} {path}: is a directory; name a file")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is not a directory; name a file under a folder")
    try:
        if target.exists():
            with open(target, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".npu-parallel-probe-"):
                pass
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write there ({exc.strerror or exc}); pick a writable path") from None


def write_output(path: str, option: str, write) -> None:
    """``write(path)`` after creating its folder; an OSError (disk full, permissions) becomes a UserError."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(path)
    except OSError as exc:
        raise UserError(
            f"{option} {path}: cannot write it ({exc.strerror or exc}); free space or pick another path"
        ) from None


def read_text(path: str, option: str = "--data") -> str:
    """The file as UTF-8 text; a UserError naming the file, and the offset of the first byte that is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{option} {path}: is a directory; pass a text file") from None
    except OSError as exc:
        raise UserError(f"{option} {path}: unreadable ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{option} {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > sample.txt"
        ) from None


def check_weights(path: str | Path, *, need_plan: bool = True) -> None:
    """The checkpoint loads: config.json, every safetensors file's header against its size, every weight's shape.

    Shapes are checked as ``npu-parallel convert --tp 1`` checks them (the plan maps the model's names to the
    checkpoint's keys); an architecture without a plan is then a CheckpointError, unless ``need_plan=False``
    (transformers' own model: the headers are still checked). Raises CheckpointError (a ValueError).
    """
    from npu_parallel.checkpoint.hf_source import HFSource
    from npu_parallel.checkpoint.offline import rank_items
    from npu_parallel.checkpoint.safetensors_io import read_header
    from npu_parallel.convert.plans import plan_for

    with HFSource(path) as source:  # closes the files the shape checks open
        for name in source.files():
            read_header(source.path / name)
        if not need_plan:
            try:
                plan_for(source.config)
            except ValueError:
                return
        planner = logging.getLogger("npu_parallel.convert")
        level = planner.level
        planner.setLevel(max(level, logging.WARNING))  # planning a tp=1 conversion is not news to the user
        try:
            rank_items(source, 1, None)
        finally:
            planner.setLevel(level)


def check_moe_impl(moe_impl: str) -> None:
    """An implementation the ranks can build on this machine's device type (else a UserError listing them)."""
    from npu_parallel.moe.dispatchers import resolve_dispatcher
    from npu_parallel.parallel.device import device_type

    try:
        resolve_dispatcher(moe_impl, device_type())
    except ValueError as exc:
        raise UserError(f"--moe_impl: {str(exc).splitlines()[0]}") from None
