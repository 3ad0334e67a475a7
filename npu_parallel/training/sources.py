"""Data sources: ``--data PATH[:WEIGHT]`` specs, their records (.jsonl, .json, .parquet, a ``datasets``
``save_to_disk`` folder, plain .txt) and the examples a format makes of them, every problem a ConfigError naming
the file, the line (or record) and the fields found."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu_parallel.training.data import _decode, file_documents, jsonl_records
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.formats import FORMATS, Example, Format, RecordError, detect_format, get_format

__all__ = ["Source", "load_examples", "parse_field_map", "parse_sources", "read_records"]


@dataclass(frozen=True)
class Source:
    """One ``--data`` entry: a path and how often its examples appear per epoch (1: each once)."""

    path: str
    weight: float = 1.0


def parse_sources(data: str | list[str] | tuple[str, ...] | None) -> list[Source]:
    """``PATH[:WEIGHT]`` entries (a string or a list; a path may hold ':' when what follows is no number)."""
    if data is None:
        return []
    specs = [data] if isinstance(data, str) else list(data)
    out = []
    for spec in specs:
        path, weight = str(spec), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                pass
            else:
                path = head
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--data {spec}: weight {tail} must be a finite number above 0 (PATH:WEIGHT)")
        out.append(Source(path, weight))
    return out


def parse_field_map(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"messages=conversation,role=speaker"`` (or a mapping): our field name -> the data's field name."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, Mapping) else (p.partition("=")[::2] for p in str(spec).split(","))
    known = sorted({f for fmt in FORMATS.values() for f in fmt.fields})
    out = {}
    for ours, theirs in pairs:
        ours, theirs = str(ours).strip(), str(theirs).strip()
        if not ours or not theirs:
            raise ConfigError(f"--field_map {spec!r}: each entry is OURS=THEIRS, e.g. messages=conversation")
        if ours not in known:
            raise ConfigError(f"--field_map {ours}={theirs}: unknown field {ours!r}; known: {', '.join(known)}")
        out[ours] = theirs
    return out


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for n, record in jsonl_records(path):
        yield f"{path}:{n}", record


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    text = _decode(raw, path, 0, 1).removeprefix("\ufeff")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # JSON lines under a .json name
        yield from _jsonl(path)
        return
    if not isinstance(value, list):
        raise ConfigError(f"--data {path}: a JSON {type(value).__name__}; a .json file holds a list of records")
    for n, record in enumerate(value, 1):
        yield f"{path}: record {n}", record


def _table(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--data {path}: not a datasets save_to_disk folder ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds), None)
            if split is None:
                raise ConfigError(f"--data {path}: the DatasetDict holds no split")
            ds = ds[split]
        rows = ds.to_list()
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise ConfigError(f"--data {path}: not a readable parquet file ({exc})") from None
    for n, record in enumerate(rows, 1):
        yield f"{path}: row {n}", record


def read_records(path: str | Path, text_field: str = "text") -> Iterator[tuple[str, Any]]:
    """(where, record) of every record of ``path``; a .txt file gives ``{text_field: document}`` records."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"--data {path}: no such file; pass a .jsonl, .json, .parquet, .txt file or a datasets folder"
        )
    try:
        if path.is_dir() or path.suffix == ".parquet":
            yield from _table(path)
        elif path.suffix == ".jsonl":
            yield from _jsonl(path)
        elif path.suffix == ".json":
            yield from _json(path)
        else:
            for n, doc in enumerate(file_documents(path), 1):
                yield f"{path}: document {n}", {text_field: doc}
    except OSError as exc:
        raise ConfigError(f"--data {path}: cannot be read ({exc.strerror or exc}); check the path") from None


def _fields(record: Any) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    return "fields: " + (", ".join(repr(k) for k in list(record)[:8]) or "none")


def load_examples(
    path: str | Path,
    fmt: str = "auto",
    field_map: Mapping[str, str] | None = None,
    text_field: str = "text",
) -> tuple[Format, list[Example], list[str]]:
    """The format of ``path`` (``fmt``, or detected from its first record), its examples and where each is."""
    names = dict(field_map or {})
    if text_field != "text":
        names.setdefault("text", text_field)
    chosen = None if fmt == "auto" else get_format(fmt)
    examples: list[Example] = []
    wheres: list[str] = []
    for where, record in read_records(path, names.get("text", "text")):
        if not isinstance(record, dict):
            raise ConfigError(f"--data {where}: {_fields(record)}; one object per record")
        if chosen is None:
            chosen = detect_format(record, names)
            if chosen is None:
                wants = "; ".join(
                    f"{f.name}: {', '.join(names.get(x, x) for x in f.required)}" for f in FORMATS.values()
                )
                raise ConfigError(
                    f"--data {where}: no known format has these fields ({_fields(record)}); formats need "
                    f"{wants}; rename with --field_map OURS=THEIRS or pass --format"
                )
        try:
            examples.append(chosen.parse(record, names))
            wheres.append(where)
        except RecordError as exc:
            raise ConfigError(f"--data {where}: {chosen.name} record {exc} ({_fields(record)})") from None
    if chosen is None:
        raise ConfigError(f"--data {path}: holds no record; give it at least one example")
    return chosen, examples, wheres
