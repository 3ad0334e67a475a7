"""``alpaca``: ``{"instruction", "input" (optional), "output", "system" (optional), "history" (optional
``[[user, assistant], ...]`` before it)}``; the user turn is the instruction, a blank line, then the input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_parallel.training.formats.base import Conversation, Format, RecordError, check_conversation, field_of, text_of


def parse(record: Mapping[str, Any], names: Mapping[str, str]) -> Conversation:
    instruction = text_of(field_of(record, names, "instruction"), "field 'instruction'")
    extra = text_of(field_of(record, names, "input", ""), "field 'input'")
    output = text_of(field_of(record, names, "output"), "field 'output'")
    system = text_of(field_of(record, names, "system", ""), "field 'system'")
    history = field_of(record, names, "history", [])
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if not isinstance(history, list):
        raise RecordError(f"field 'history' is a JSON {type(history).__name__}, not a list of [user, assistant]")
    for n, pair in enumerate(history, 1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError(f"history entry {n} is not a [user, assistant] pair")
        messages += [
            {"role": "user", "content": text_of(pair[0], f"history {n} user")},
            {"role": "assistant", "content": text_of(pair[1], f"history {n} assistant")},
        ]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return check_conversation(messages)


FORMAT = Format("alpaca", ("instruction", "input", "output", "system", "history"), ("instruction", "output"), parse)
