"""Run configs: a YAML file of training flags (``--config run.yaml``) read into the parser's defaults, so the
command line overrides it, and the resolved config of a run (``config.yaml`` beside ``metrics.jsonl``) that
``--config`` takes back to repeat the run.

A key is a flag without its dashes (``max_length`` or ``max-length``); a value is what the flag takes (``data`` a
list of ``PATH[:WEIGHT]`` or one string). Relative paths are relative to the working directory, as on the command
line (not to the YAML file's folder).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from npu_parallel.training.config import TrainConfig
from npu_parallel.training.errors import ConfigError

__all__ = ["CONFIG_FILE", "add_config_arg", "config_values", "load_run_config", "parse_run_args", "write_run_config"]

CONFIG_FILE = "config.yaml"
# dests of the parser that are no run setting: a key naming one is refused with its own reason
NOT_KEYS = {
    "help": "help is no run setting",
    "config": "a run config cannot name another (--config); merge the two files into one",
    "nproc_per_node": "nproc_per_node is how many ranks start, not a run setting: pass --nproc_per_node N to "
    "npu-parallel train (or to torchrun)",
}


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """``--config run.yaml``: every flag of the run as a key; the command line overrides it."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="RUN.yaml",
        help="a YAML run config: every flag below as a key (max_length: 4096; data: a list of PATH[:WEIGHT]); "
        f"flags on the command line override it; a run writes its resolved config as {CONFIG_FILE} in --log_dir",
    )


def _settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags a run config may set, by dest."""
    return {
        a.dest: a
        for a in parser._actions
        if a.option_strings and a.dest not in NOT_KEYS and a.dest != argparse.SUPPRESS and a.help != argparse.SUPPRESS
    }


def _optional(dest: str) -> bool:
    """Whether TrainConfig's field takes None (``tp_size: null``: the default, all ranks)."""
    kinds = {f.name: str(f.type) for f in fields(TrainConfig)}
    return "None" in kinds.get(dest, "")


def _lists(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)  # --data PATH ... (extend): a list of strings


def _expected(action: argparse.Action, none_ok: bool) -> str:
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        kind = "true or false"
    elif _lists(action):
        kind = f"a list of {action.metavar or 'strings'} (or one string)"
    else:
        kind = {int: "an integer", float: "a number"}.get(action.type, "a string")  # type: ignore[call-overload]
    return kind + (" or null" if none_ok else "")


def _coerce(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """The value as the flag takes it, or ConfigError naming the key, the value and the type it wants."""
    none_ok = action.default is None or _optional(action.dest)
    expected = _expected(action, none_ok)

    def bad() -> ConfigError:
        return ConfigError(f"{where}: {key}: {value!r} is not {expected}; write e.g. {key}: {_example(action)}")

    if value is None:
        if none_ok:
            return None
        raise bad()
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if isinstance(value, bool):
            return value
        raise bad()
    if _lists(action):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise bad()
        return list(items)
    if isinstance(value, bool | list | dict):
        raise bad()
    if action.type in (int, float):
        if isinstance(value, float) and action.type is int:
            raise bad()
        try:  # a string is read as on the command line: YAML takes 1e-5 for a string (1.0e-5 for a number)
            value = action.type(value)
        except (TypeError, ValueError):
            raise bad() from None
    elif not isinstance(value, str):
        raise bad()
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _example(action: argparse.Action) -> str:
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return "true"
    if _lists(action):
        return "[train.jsonl, extra.jsonl:0.5]"
    return {int: "8", float: "1.0e-5"}.get(action.type, "VALUE")  # type: ignore[call-overload]


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key written twice in one mapping (PyYAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"{key} given twice (lines {seen[key]} and {line}); keep one")
            if isinstance(key, str):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read(path: str) -> dict:
    """The YAML mapping in ``path`` (an empty file is an empty mapping)."""
    where = f"--config {path}"
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{where}: no such file; pass the path of a YAML run config")
    if not file.is_file():
        raise ConfigError(f"{where}: is not a file; pass the path of a YAML run config")
    try:
        loaded = yaml.load(file.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader: no Python objects
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not YAML ({problem}{at}); write one `flag: value` per line") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{where}: holds a {type(loaded).__name__}, not a mapping of flags to values; write one `flag: value` "
            f"per line, e.g. steps: 100"
        )
    return loaded


def load_run_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The run config at ``path`` checked against ``parser``'s flags: dest -> value (ConfigError on a mistake)."""
    where = f"--config {path}"
    settable = _settable(parser)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in _read(path).items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a flag name; write e.g. steps: 100")
        dest = key.strip().lstrip("-").replace("-", "_")
        if dest in NOT_KEYS:
            raise ConfigError(f"{where}: key {key!r}: {NOT_KEYS[dest]}")
        if dest not in settable:
            close = difflib.get_close_matches(dest, list(settable), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint}; every key is a flag of {parser.prog} without its dashes "
                f"(see {parser.prog} --help)"
            )
        if dest in spelled:
            raise ConfigError(f"{where}: {dest} given twice (as {spelled[dest]!r} and {key!r}); keep one")
        spelled[dest] = key
        values[dest] = _coerce(key, value, settable[dest], where)
    return values


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the ``--config`` file's values as the defaults: the command line overrides them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    values = load_run_config(known.config, parser)
    settable = _settable(parser)
    # a list flag (--data) extends its default: the YAML's list is set after parsing, where the command line
    # gave none, so that --data on the command line replaces it
    lists = {d: v for d, v in values.items() if _lists(settable[d])}
    parser.set_defaults(**{d: v for d, v in values.items() if d not in lists})
    args = parser.parse_args(argv)
    for dest, value in lists.items():
        if getattr(args, dest) in (None, settable[dest].default):
            setattr(args, dest, value)
    return args


def config_values(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of a run: TrainConfig's fields as resolved, then the script's own flags."""
    values = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    for dest in _settable(parser):
        if dest not in values and hasattr(args, dest):
            values[dest] = getattr(args, dest)
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    plain = (str, int, float, bool, list, type(None))
    return {k: v if isinstance(v, plain) else str(v) for k, v in values.items()}  # a script's Path, as text


def _versions() -> str:
    import torch

    from npu_parallel._version import __version__

    return f"npu_parallel {__version__}, torch {torch.__version__}"


def write_run_config(
    out_dir: str | Path, values: dict[str, Any], prog: str, argv: list[str], world: str | None = None
) -> Path:
    """``out_dir/config.yaml``: ``values`` with a header (how to repeat it, the command, the working directory, the
    ranks, the versions)."""
    out = Path(out_dir) / CONFIG_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = [
        "# The resolved config of a run: every flag after the command line's overrides. Repeat the run with",
        f"#   {prog} --config {shlex.quote(str(out))} --log_dir NEW_DIR",
        f"# command: {' '.join([prog, shlex.join(argv)]).strip()}",
        f"# working directory: {os.getcwd()} (relative paths below are relative to it)",
    ]
    header += [f"# ranks: {world}"] if world else []
    header += [f"# {_versions()}, python {sys.version.split()[0]}; written {when}"]
    header = [line.replace("\r", "\\r").replace("\n", "\\n") for line in header]  # a comment stays one line
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n" + body, encoding="utf-8")
    tmp.replace(out)
    return out
