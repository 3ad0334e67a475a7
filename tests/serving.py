"""A tiny word-level tokenizer with a ChatML-style chat template, trained locally (no network), for serving tests.

Its end of turn (``<|im_end|>``) is not its eos (``</s>``), as in most chat models: a merged folder's
generation_config.json must stop on both.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "user assistant system says hi to the fox"]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def add_tokenizer(folder: Path, chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Save the tiny tokenizer into ``folder`` (a checkpoint) as transformers does; returns it."""
    tok = tiny_tokenizer(chat_template)
    tok.save_pretrained(folder)
    return tok
