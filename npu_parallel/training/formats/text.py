"""``text``: raw text, ``{"text": ...}`` (the field named by ``--text_field``), every token a target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_parallel.training.formats.base import Format, RecordError, Text, field_of


def parse(record: Mapping[str, Any], names: Mapping[str, str]) -> Text:
    value = field_of(record, names, "text")
    if not isinstance(value, str):
        raise RecordError(f"field {names.get('text', 'text')!r} is a JSON {type(value).__name__}, not a string")
    return Text(value)


FORMAT = Format("text", ("text",), ("text",), parse, chat=False)
