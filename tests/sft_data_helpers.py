"""Helpers for the SFT data tests: an encoder over a tiny chat tokenizer, and a token-by-token view of labels."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from transformers import AutoTokenizer

from npu_parallel.training.config import TrainConfig
from npu_parallel.training.labels import Encoded, Encoder
from npu_parallel.training.templates import resolve_template


def tokenizer(chat_tokenizers, kind: str):
    return AutoTokenizer.from_pretrained(chat_tokenizers[kind])


def encoder(tok, template: str | None = None, **options) -> Encoder:
    return Encoder(tok, resolve_template(template, tok), **options)


def show(tok, enc: Encoded) -> str:
    """The tokens joined by '|', trained ones in brackets (and their label checked equal to the id)."""
    out = []
    for i, (t, lab) in enumerate(zip(enc.ids, enc.labels, strict=True)):
        text = tok.convert_ids_to_tokens(t)
        if lab != -100:
            assert lab == t and i > 0
            text = f"[{text}]"
        out.append(text)
    return "|".join(out)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cfg(**values) -> TrainConfig:
    values.setdefault("max_length", 64)
    return TrainConfig(**values)


def layout(dp: int = 1, rank: int = 0) -> SimpleNamespace:
    """The parts of a ParallelState the data code reads."""
    return SimpleNamespace(dp_size=dp, dp_rank=rank, rank=rank)


def chat(n: int) -> dict:
    """A varied two-turn conversation (its length grows with n)."""
    return {
        "messages": [
            {"role": "user", "content": "Hi " * (n % 5 + 1)},
            {"role": "assistant", "content": "Hello " * (n % 3 + 1)},
            {"role": "user", "content": "What is " + str(n % 10)},
            {"role": "assistant", "content": "yes " * (n % 4 + 1)},
        ]
    }
