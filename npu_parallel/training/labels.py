"""Token ids and labels of one example: only the assistant's tokens are targets (-100 elsewhere).

The assistant spans come from token positions, by render-and-tokenize: for assistant turn k the conversation is
rendered up to turn k with the generation prompt (its header) and up to the end of turn k, each tokenized, and
compared token by token with the whole conversation's tokens. The span starts where the header's tokens stop
matching (so a token that merges the header's last character with the answer's first is trained: it holds
answer text) and runs through the end-of-turn token that closes the turn (chatml's ``<|im_end|>``, DeepSeek's
EOS); a separator after it (chatml's newline) and the next role header are not trained. No string is searched, so
multi-turn conversations, system prompts and tokens merging across a boundary all come out right.

Labels are aligned with the ids as in Hugging Face (``labels[t]`` is token ``t`` where trained; the loss shifts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npu_parallel.training.batch import IGNORE_INDEX
from npu_parallel.training.formats import Completion, Conversation, Example, RecordError, Text
from npu_parallel.training.templates import ChatTemplate

__all__ = ["Encoded", "Encoder"]


@dataclass
class Encoded:
    """One example's ``ids`` and ``labels`` (same length; labels -100 where not trained)."""

    ids: list[int]
    labels: list[int]

    @property
    def targets(self) -> int:
        """Supervised targets (a document's first token is never one)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Encoder:
    """Tokenizes examples into :class:`Encoded` with one tokenizer, template and label policy."""

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate | None,
        *,
        train_on_prompt: bool = False,
        last_turn_only: bool = False,
    ):
        self.tok = tokenizer
        self.template = template
        self.train_on_prompt = train_on_prompt
        self.last_turn_only = last_turn_only
        self.eos = tokenizer.eos_token_id
        bos = getattr(tokenizer, "bos_token_id", None)
        # a tokenizer whose plain encode adds BOS (DeepSeek's, Llama's) expects it first: kept exactly once
        self.bos = bos if bos is not None and self._encode_plain("a")[:1] == [bos] else None

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def tokens(self, text: str) -> list[int]:
        """``text`` (special tokens written out, as a template renders them) as ids, with at most one BOS."""
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        if self.bos is not None:
            while ids[:2] == [self.bos, self.bos]:
                ids.pop(0)
            if ids[:1] != [self.bos]:
                ids.insert(0, self.bos)
        return ids

    def encode(self, example: Example) -> Encoded:
        """The example's ids and labels; RecordError when the template cannot mark its assistant spans."""
        if isinstance(example, Text):
            ids = self.tokens(example.text) + ([self.eos] if self.eos is not None else [])
            return Encoded(ids, [IGNORE_INDEX, *ids[1:]])
        if isinstance(example, Completion):
            return self._completion(example)
        return self._conversation(example)

    def _completion(self, example: Completion) -> Encoded:
        prompt = self.tokens(example.prompt) if example.prompt else ([self.bos] if self.bos is not None else [])
        ids = self.tokens(example.prompt + example.completion) + ([self.eos] if self.eos is not None else [])
        start = _common(prompt, ids)
        labels = list(ids) if self.train_on_prompt else [IGNORE_INDEX] * start + ids[start:]
        labels[0] = IGNORE_INDEX
        return Encoded(ids, labels)

    def _conversation(self, example: Conversation) -> Encoded:
        template = self.template
        if template is None:
            raise RecordError("is a conversation but no chat template is set")
        messages = example.messages
        full = self.tokens(template.render(self.tok, messages))
        labels = [IGNORE_INDEX] * len(full)
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if self.last_turn_only:
            turns = turns[-1:]
        for n, k in enumerate(turns, 1):
            start, end = self._span(template, messages, k, full)
            if end <= start:
                raise RecordError(f"assistant turn {n} renders to no token with template {template.name}")
            labels[start:end] = full[start:end]
        if self.train_on_prompt:
            labels = list(full)
        if labels:
            labels[0] = IGNORE_INDEX
        return Encoded(full, labels)

    def _span(self, template: ChatTemplate, messages: list[dict], k: int, full: list[int]) -> tuple[int, int]:
        """[start, end) of assistant message ``k`` in ``full``: its content and the end-of-turn token closing it."""
        head = self.tokens(template.render(self.tok, messages[:k], add_generation_prompt=True))
        upto = self.tokens(template.render(self.tok, messages[: k + 1]))
        start, stop = _common(head, full), _common(upto, full)
        # a template that renders a turn differently alone than inside the conversation cannot mark spans
        # (one merged token at the boundary is allowed: that is the merge case above)
        if start < len(head) - 1 or stop < len(upto) - 1:
            raise RecordError(
                f"template {template.name} renders assistant turn {k} differently when the conversation stops "
                f"there than inside the whole conversation, so its tokens cannot be found; pass a built-in "
                f"--template (e.g. chatml, deepseek_v2)"
            )
        closing = [p for p in range(start, stop) if full[p] in template.end_of_turn_ids]
        return start, (closing[-1] + 1 if closing else stop)
