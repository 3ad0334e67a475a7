"""``messages``: OpenAI chat records, ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``
(a Qwen3 assistant turn may carry ``reasoning_content``, rendered in think tags by the qwen3 template)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_parallel.training.formats.base import (
    ROLES,
    Conversation,
    Format,
    RecordError,
    check_conversation,
    field_of,
    text_of,
)


def to_messages(turns: Any, names: Mapping[str, str], role_key: str, content_key: str, roles: Mapping[str, str]):
    """Turns (dicts holding a role and a content) as canonical messages; ``roles`` maps the data's role names."""
    if not isinstance(turns, list):
        raise RecordError(f"field is a JSON {type(turns).__name__}, not a list of turns")
    out = []
    role_field, content_field = names.get(role_key, role_key), names.get(content_key, content_key)
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or role_field not in turn or content_field not in turn:
            have = ", ".join(map(repr, turn)) if isinstance(turn, dict) else f"a JSON {type(turn).__name__}"
            raise RecordError(f"turn {n} needs {role_field!r} and {content_field!r} (it has {have})")
        role = roles.get(str(turn[role_field]))
        if role is None:
            raise RecordError(
                f"turn {n} has role {turn[role_field]!r}; known roles: {', '.join(sorted(roles))} "
                f"(tool and function turns are not supported)"
            )
        message: dict[str, Any] = {"role": role, "content": text_of(turn[content_field], f"turn {n} content")}
        if role == "assistant" and turn.get("reasoning_content"):
            message["reasoning_content"] = text_of(turn["reasoning_content"], f"turn {n} reasoning_content")
        out.append(message)
    return out


def parse(record: Mapping[str, Any], names: Mapping[str, str]) -> Conversation:
    turns = field_of(record, names, "messages")
    return check_conversation(to_messages(turns, names, "role", "content", {r: r for r in ROLES}))


FORMAT = Format("messages", ("messages", "role", "content"), ("messages",), parse)
