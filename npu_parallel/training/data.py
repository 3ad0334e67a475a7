"""Training data: text/JSONL files (or the Python standard library as an embedded corpus), tokenized,
packed into fixed-length sequences, each data-parallel rank reading its own part, resumable by position."""

from __future__ import annotations

import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npu_parallel.training.batch import Batch
from npu_parallel.training.errors import ConfigError

logger = logging.getLogger(__name__)

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "ensurepip"}


def stdlib_documents(max_bytes: int = 8 << 20) -> Iterator[str]:
    """The ``.py`` files of this Python's standard library (sorted, so every rank sees the same order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                text = (Path(dirpath) / name).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield text
            total += len(text)
            if total >= max_bytes:
                return


def _decode(raw: bytes, path: Path, offset: int, line: int) -> str:
    """``raw`` (the bytes at ``offset`` of ``path``, from line ``line`` on) as text, or a ConfigError naming where."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
        line += raw.count(b"\n", 0, exc.start)
        raise ConfigError(
            f"--data {path}: not UTF-8 at byte {at} (line {line}, byte 0x{raw[exc.start]:02x}); "
            f"convert the file to UTF-8 (e.g. iconv -f <its encoding> -t UTF-8)"
        ) from None


def file_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a ``.jsonl`` file (its ``text_field``) or of a plain text file (blank-line separated).

    The file must be UTF-8 (a leading BOM is allowed); a problem is a ConfigError naming the file and where.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--data {path}: no such file; pass a .txt or .jsonl file")
    try:
        if path.suffix in (".jsonl", ".json"):
            yield from _jsonl_documents(path, text_field)
            return
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"--data {path}: cannot be read ({exc.strerror or exc}); check the path and its permissions"
        ) from None
    text = _decode(raw, path, 0, 1).removeprefix("\ufeff")
    for doc in text.split("\n\n"):
        if doc.strip():
            yield doc


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file, read lazily; a ConfigError names
    a line that is not UTF-8 or not JSON."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, n)
            offset += len(raw)
            if n == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--data {path}:{n}: not JSON ({exc.msg}); one JSON object per line") from None
            yield n, record


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for n, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise ConfigError(
                f"--data {path}:{n}: a JSON {type(record).__name__}, not an object; one object per line, "
                f"its text in --text_field"
            )
        if text_field not in record:
            have = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            raise ConfigError(
                f"--data {path}:{n}: no {text_field!r} field (it has {have}); pass --text_field to name the field "
                f"that holds the text, or give chat records (no known format has these fields: messages, "
                f"sharegpt conversations, alpaca instruction/output, prompt/completion; rename with --field_map)"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise ConfigError(
                f"--data {path}:{n}: field {text_field!r} is a JSON {type(value).__name__}, not a string; "
                f"pass --text_field to name the field that holds the text"
            )
        yield value


class ByteTokenizer:
    """UTF-8 bytes as token ids, for checkpoints that ship no tokenizer (folded into a vocab under 256)."""

    def __init__(self, vocab_size: int, eos_token_id: int | None):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id if eos_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]


class HFTokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def first_eos(eos: object) -> int | None:
    """A config's ``eos_token_id``, the first one when it lists several (None when it has none)."""
    return eos[0] if isinstance(eos, list | tuple) and eos else eos if isinstance(eos, int) else None


def load_tokenizer(model_path: str | Path | None, vocab_size: int, eos_token_id: int | None):
    """The checkpoint's tokenizer when it has one, else bytes."""
    if model_path is not None and any(
        (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        from transformers import AutoTokenizer

        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(str(model_path)))
        except Exception as exc:  # a broken tokenizer should not stop a smoke run
            logger.warning("tokenizer in %s failed to load (%s); using bytes", model_path, exc)
    return ByteTokenizer(vocab_size, eos_token_id)


def pack(documents: Iterator[str], tokenizer, seq_len: int, max_sequences: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into ``[n, seq_len]`` (stops once it has enough)."""
    buf: list[int] = []
    want = max_sequences * seq_len
    for doc in documents:
        buf.extend(tokenizer.encode(doc))
        buf.append(tokenizer.eos_token_id)
        if len(buf) >= want:
            break
    n = min(len(buf) // seq_len, max_sequences)
    if n == 0:
        raise ConfigError(
            f"the data holds {len(buf)} tokens, fewer than one sequence of {seq_len}; "
            f"use more data or a smaller --max_length"
        )
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class PackedData:
    """Sequences in a seeded order; micro-batch ``g`` of dp rank ``r`` is a fixed function of (g, r)."""

    sequences: torch.Tensor
    batch_size: int
    dp_size: int
    dp_rank: int
    seed: int = 0
    position: int = 0  # micro-batches consumed by each dp rank
    grad_accum: int = 1

    def __post_init__(self):
        self._order = torch.randperm(len(self.sequences), generator=torch.Generator().manual_seed(self.seed))

    def batch(self, g: int) -> Batch:
        n = len(self.sequences)
        start = (g * self.dp_size + self.dp_rank) * self.batch_size
        idx = self._order[torch.arange(start, start + self.batch_size) % n]
        return Batch.from_windows(self.sequences[idx])

    def next(self) -> Batch:
        b = self.batch(self.position)
        self.position += 1
        return b

    def next_step(self) -> list[Batch]:
        """The ``grad_accum`` micro-batches of the next step (the same interface as training.dataset.DataStream)."""
        return [self.next() for _ in range(self.grad_accum)]

    padding_fraction = 0.0  # fixed windows: no padding

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.sequences.shape[1]


def build_data(
    model_path,
    data_path,
    *,
    vocab_size: int,
    eos_token_id: int | None,
    seq_len: int,
    batch_size: int,
    micro_batches: int,
    dp_size: int,
    dp_rank: int,
    seed: int = 0,
    text_field: str = "text",
    grad_accum: int = 1,
) -> PackedData:
    """Enough packed sequences for ``micro_batches`` per dp rank (cycled when the corpus is smaller)."""
    tokenizer = load_tokenizer(model_path, vocab_size, eos_token_id)
    docs = file_documents(data_path, text_field) if data_path else stdlib_documents()
    sequences = pack(docs, tokenizer, seq_len, max(micro_batches * batch_size * dp_size, 1))
    source = data_path or "the Python standard library (.py files)"
    logger.info(
        "data: %d sequences of %d tokens from %s (%s)", len(sequences), seq_len, source, type(tokenizer).__name__
    )
    return PackedData(sequences, batch_size, dp_size, dp_rank, seed, grad_accum=grad_accum)
