"""Tiny chat tokenizers trained locally with `tokenizers` (no network), for every SFT, eval and serve test.

Two kinds, each a folder that ``AutoTokenizer.from_pretrained`` loads, with a real chat template:

- ``deepseek``: DeepSeek-V2-chat style, ``<｜begin▁of▁sentence｜>`` (BOS, id 1, which ``encode`` adds as DeepSeek's
  tokenizers do) and ``<｜end▁of▁sentence｜>`` (EOS, id 2), turns ``User: ...\\n\\n`` / ``Assistant: ...<EOS>``,
  generation prompt ``Assistant:``;
- ``chatml``: Qwen style, ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (id 1), ``<|im_end|>`` (EOS, id 2), no BOS,
  ``<think>``/``</think>`` as added tokens.

Both fit the tiny models' vocab (250, ids 1 and 2 as their bos/eos), are BPE over characters with a GPT-2-like
split (a word keeps its leading space, so a template's ``": "`` merges with the content's first word: the
across-the-boundary case the label code must get right), and turn every word of :data:`WORDS` into one token.

Use: ``build_tokenizer("chatml", folder)``; ``add_tokenizer(checkpoint_dir, "deepseek")`` copies one into a tiny
checkpoint; the session fixture ``chat_tokenizers`` (tests/sft_fixtures.py) builds both once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 250  # the tiny models' vocab (tests/models.py)

DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

DEEPSEEK_CHAT = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# every word a test writes, each one token (with and without its leading space)
WORDS = "User Assistant system user assistant Hi Hello there What is Thanks Be brief yes no ok think"
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?'\"+-=*/()[]<>_|#"

SPECIAL = {
    "deepseek": ["<unk>", DEEPSEEK_BOS, DEEPSEEK_EOS],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def _corpus() -> list[str]:
    words = WORDS.split()
    line = " ".join(words)
    # frequent enough that every word (and " word") is merged whole before the vocab fills up
    return [line, "\n".join(words), ": " + line + "\n\n", *(f" {w}" for w in words)] * 50


def build_tokenizer(kind: str, folder: str | Path):
    """Train the ``kind`` tokenizer ("deepseek" or "chatml"), save it in ``folder``; returns the loaded
    ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL[kind]
    extra = ["<think>", "</think>"] if kind == "chatml" else []
    tok = Tokenizer(models.BPE(unk_token=special[0] if kind == "deepseek" else None))
    split = Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")
    tok.pre_tokenizer = pre_tokenizers.Split(split, behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(extra),
        special_tokens=special,
        initial_alphabet=list(CHARS),
        limit_alphabet=len(CHARS),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if kind == "deepseek":  # as DeepSeek's tokenizers do, a plain encode() adds BOS (the template renders it too)
        bos = (DEEPSEEK_BOS, tok.token_to_id(DEEPSEEK_BOS))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS, pad_token="<unk>"
        )
        fast.chat_template = DEEPSEEK_CHAT
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        fast.add_tokens(extra)
        fast.chat_template = CHATML
    assert len(fast) <= VOCAB_SIZE, f"tokenizer {kind} has {len(fast)} tokens, above {VOCAB_SIZE}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def add_tokenizer(checkpoint: str | Path, kind: str, built: str | Path | None = None) -> None:
    """Put the ``kind`` tokenizer's files into ``checkpoint`` (copied from ``built`` when given, else trained)."""
    checkpoint = Path(checkpoint)
    if built is None:
        build_tokenizer(kind, checkpoint)
        return
    for path in Path(built).iterdir():
        if path.is_file():
            shutil.copy2(path, checkpoint / path.name)
