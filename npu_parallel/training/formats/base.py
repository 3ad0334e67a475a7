"""What a data format is: the fields it reads, how it is recognised, and the example it makes of a record.

Every format turns one record (a dict) into one of three examples: :class:`Conversation` (chat messages, rendered
with a chat template), :class:`Completion` (a raw prompt and its completion, no template) or :class:`Text` (raw
text, every token trained). A record the format cannot read raises :class:`RecordError`; the reader adds the file,
the line and the fields found.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record this format cannot read (the message says what is wrong and how to fix it)."""


@dataclass
class Conversation:
    """OpenAI-style messages: an optional system message, then user/assistant turns, ending with the assistant."""

    messages: list[dict[str, Any]]


@dataclass
class Completion:
    """A raw prompt and the completion trained after it (no chat template)."""

    prompt: str
    completion: str


@dataclass
class Text:
    """Raw text, every token a target."""

    text: str


Example = Conversation | Completion | Text


@dataclass(frozen=True)
class Format:
    """One data format: ``fields`` are its canonical field names (``--field_map`` renames them), ``required``
    those a record must hold for the format to be detected, ``parse`` makes the example of a record."""

    name: str
    fields: tuple[str, ...]
    required: tuple[str, ...]
    parse: Callable[[Mapping[str, Any], Mapping[str, str]], Example]
    chat: bool = True  # rendered with a chat template (packing is its default)
    extra_keys: tuple[str, ...] = field(default=())  # canonical names --field_map may also rename

    def detects(self, record: Mapping[str, Any], names: Mapping[str, str]) -> bool:
        return all(names.get(f, f) in record for f in self.required)


def text_of(value: Any, what: str) -> str:
    """A message content as text: a string, or OpenAI content parts (``[{"type": "text", "text": ...}]``) joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise RecordError(f"{what} is a JSON {type(value).__name__}, not a string (or a list of text parts)")


def check_conversation(messages: list[dict[str, Any]]) -> Conversation:
    """The rules every chat example keeps: system first (optional), then user and assistant alternating from a
    user turn, the last an assistant turn, no assistant turn empty."""
    if not messages:
        raise RecordError("holds no messages")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            order = " ".join(x["role"] for x in messages)
            raise RecordError(
                f"roles out of order ({order}): after an optional system message, user and assistant must "
                f"alternate, starting with user"
            )
        if want == "assistant" and not m["content"].strip() and not str(m.get("reasoning_content") or "").strip():
            raise RecordError(f"assistant turn {i // 2 + 1} is empty; give it content or remove the record")
    if not turns or turns[-1]["role"] != "assistant":
        raise RecordError("ends without an assistant turn (nothing to train); end it with the assistant's answer")
    return Conversation(messages)


def field_of(record: Mapping[str, Any], names: Mapping[str, str], name: str, default: Any = ...) -> Any:
    """``record[names[name]]`` (the field ``--field_map`` names for ``name``), or ``default`` when absent."""
    key = names.get(name, name)
    if key in record and record[key] is not None:
        return record[key]
    if default is ...:
        raise RecordError(f"has no {key!r} field")
    return default
