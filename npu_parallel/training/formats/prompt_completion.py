"""``prompt_completion``: ``{"prompt", "completion"}``, as TRL: strings are raw text (no chat template, the
completion and an EOS trained); lists of messages are a conversation (the prompt's turns, then the completion's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from npu_parallel.training.formats.base import (
    ROLES,
    Completion,
    Example,
    Format,
    RecordError,
    check_conversation,
    field_of,
)
from npu_parallel.training.formats.messages import to_messages


def parse(record: Mapping[str, Any], names: Mapping[str, str]) -> Example:
    prompt, completion = field_of(record, names, "prompt"), field_of(record, names, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise RecordError("the completion is empty; give it text or remove the record")
        return Completion(prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        roles = {r: r for r in ROLES}
        return check_conversation(to_messages(prompt + completion, names, "role", "content", roles))
    raise RecordError(
        f"prompt and completion must both be strings (raw text) or both lists of messages; got a JSON "
        f"{type(prompt).__name__} and a JSON {type(completion).__name__}"
    )


FORMAT = Format("prompt_completion", ("prompt", "completion", "role", "content"), ("prompt", "completion"), parse)
