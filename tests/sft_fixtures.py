"""Session fixtures for the SFT tests: the tiny chat tokenizers (tests/tokenizers_fixture.py), built once."""

from __future__ import annotations

import pytest

from .tokenizers_fixture import build_tokenizer


@pytest.fixture(scope="session")
def chat_tokenizers(tmp_path_factory):
    """kind ("deepseek", "chatml") -> folder holding that tokenizer (AutoTokenizer.from_pretrained loads it)."""
    root = tmp_path_factory.mktemp("chat_tokenizers")
    for kind in ("deepseek", "chatml"):
        build_tokenizer(kind, root / kind)
    return {kind: root / kind for kind in ("deepseek", "chatml")}
