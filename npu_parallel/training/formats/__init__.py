"""Data formats, one module each defining ``FORMAT``; every module here is found and registered.

A format is detected from a source's first record (the first whose required fields it holds, in
:data:`DETECT_ORDER`) unless ``--format`` names it. Adding a format is adding one file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from npu_parallel.training.formats.base import (
    Completion,
    Conversation,
    Example,
    Format,
    RecordError,
    Text,
)

__all__ = [
    "FORMATS",
    "Completion",
    "Conversation",
    "Example",
    "Format",
    "RecordError",
    "Text",
    "detect_format",
    "get_format",
]

DETECT_ORDER = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


def _discover() -> dict[str, Format]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        fmt = getattr(module, "FORMAT", None)
        if not isinstance(fmt, Format):
            raise TypeError(f"{module.__name__} must define FORMAT = Format(...)")
        if fmt.name in found:
            raise ValueError(f"format {fmt.name!r} is defined twice")
        found[fmt.name] = fmt
    order = [n for n in DETECT_ORDER if n in found] + sorted(set(found) - set(DETECT_ORDER))
    return {n: found[n] for n in order}


FORMATS: dict[str, Format] = _discover()


def get_format(name: str) -> Format:
    """The format called ``name``; ValueError naming the known ones."""
    if name not in FORMATS:
        raise ValueError(f"--format {name!r}: unknown; pass one of auto, {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(record: Mapping[str, Any], names: Mapping[str, str]) -> Format | None:
    """The first format whose required fields (renamed by ``names``) ``record`` holds; None if none."""
    return next((f for f in FORMATS.values() if f.detects(record, names)), None)
