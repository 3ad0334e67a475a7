"""SFT data: formats, chat templates, assistant-only labels, packing, mixing and the errors of bad input (issue 21)."""

from __future__ import annotations

from transformers import AutoTokenizer

from .tokenizers_fixture import WORDS


def test_the_chat_tokenizers_fit_the_tiny_models_and_keep_the_test_words_whole(chat_tokenizers):
    for kind, folder in chat_tokenizers.items():
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) <= 250 and tok.eos_token_id == 2 and tok.chat_template, kind
        for word in WORDS.split():
            assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, (kind, word)
            assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, (kind, word)
    assert AutoTokenizer.from_pretrained(chat_tokenizers["deepseek"])("Hi")["input_ids"][0] == 1  # encode adds BOS
