"""Chat templates: the tokenizer's own (``apply_chat_template``) by default, a built-in by name, or a jinja file.

``resolve_template(spec, tokenizer)`` gives the :class:`ChatTemplate` a run renders its conversations with;
``builtin_templates()`` lists the built-ins (training/templates/builtin.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu_parallel.training.errors import ConfigError
from npu_parallel.training.templates.builtin import BUILTINS, Builtin

__all__ = ["ChatTemplate", "builtin_templates", "resolve_template"]

# end-of-turn tokens of templates we did not write, recognised where the tokenizer has them
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class ChatTemplate:
    """A template to render with: ``source`` (jinja), its ``name`` (a built-in's, 'tokenizer' or the file) and the
    token ids that may close an assistant turn (the last one inside a turn's span is trained, what follows not)."""

    name: str
    source: str
    end_of_turn_ids: tuple[int, ...]

    def render(self, tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (special tokens as text; tokenize it with ``add_special_tokens=False``)."""
        return tokenizer.apply_chat_template(
            messages, chat_template=self.source, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def builtin_templates() -> dict[str, str]:
    """Built-in template name -> the families it is for."""
    return {name: b.families for name, b in BUILTINS.items()}


def _ids(tokenizer: Any, tokens: list[str | None]) -> tuple[int, ...]:
    vocab = tokenizer.get_vocab()
    return tuple(dict.fromkeys(vocab[t] for t in tokens if t is not None and t in vocab))


def resolve_template(spec: str | None, tokenizer: Any) -> ChatTemplate:
    """``spec`` None: the tokenizer's own template; a built-in name; or a ``.jinja`` file. ConfigError if none."""
    names = ", ".join(BUILTINS)
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        raise ConfigError(
            "chat data needs the checkpoint's tokenizer (tokenizer.json or tokenizer.model beside config.json); "
            "copy the published tokenizer files into --model_path"
        )
    eos = getattr(tokenizer, "eos_token", None)
    if spec is None:
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # several named templates: the default one
            source = source.get("default")
        if not source:
            raise ConfigError(
                f"no chat template: the tokenizer of --model_path has none; pass --template NAME ({names}) "
                f"or --template FILE.jinja"
            )
        return ChatTemplate("tokenizer", source, _ids(tokenizer, [*KNOWN_END_OF_TURN, eos]))
    builtin: Builtin | None = BUILTINS.get(spec)
    if builtin is not None:
        if builtin.end_of_turn is not None and builtin.end_of_turn not in tokenizer.get_vocab():
            raise ConfigError(
                f"--template {spec}: the tokenizer has no {builtin.end_of_turn!r} token that closes its assistant "
                f"turns; pick the template of this model's family ({names})"
            )
        return ChatTemplate(spec, builtin.source, _ids(tokenizer, [builtin.end_of_turn or eos]))
    path = Path(spec)
    if path.suffix != ".jinja" or not path.is_file():
        raise ConfigError(f"--template {spec!r}: not a built-in ({names}) and not a .jinja file; pass one of them")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--template {spec}: cannot be read as UTF-8 text ({exc})") from None
    return ChatTemplate(str(path), source, _ids(tokenizer, [*KNOWN_END_OF_TURN, eos]))
