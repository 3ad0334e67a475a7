"""``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system": ...}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_parallel.training.formats.base import Conversation, Format, check_conversation, field_of, text_of
from npu_parallel.training.formats.messages import to_messages

ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


def parse(record: Mapping[str, Any], names: Mapping[str, str]) -> Conversation:
    messages = to_messages(field_of(record, names, "conversations"), names, "from", "value", ROLE_NAMES)
    system = field_of(record, names, "system", "")
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": text_of(system, "field 'system'")})
    return check_conversation(messages)


FORMAT = Format("sharegpt", ("conversations", "from", "value", "system"), ("conversations",), parse)
