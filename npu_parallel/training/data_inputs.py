"""The data side of a run's checks: the data flags' values (``check_data_args``) and the data they name
(``build_run_data``: raw text through the fixed-window path of training/data.py, chat and instruction data,
mixtures and eval sets through training/dataset.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from npu_parallel.training.data import PackedData, build_data
from npu_parallel.training.dataset import DataStream, EvalSet, build_datasets, build_eval_batches, prepare
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.formats import FORMATS, detect_format
from npu_parallel.training.sources import parse_field_map, parse_sources, read_records

__all__ = ["TRUNCATION", "build_run_data", "check_data_args", "hf_tokenizer", "plain_text", "uses_stream"]

logger = logging.getLogger(__name__)

TRUNCATION = ("truncate", "drop")


def check_data_args(cfg: Any) -> None:
    """The data flags' rules on their own (ConfigError: the value, the rule, the fix)."""
    if cfg.format != "auto" and cfg.format not in FORMATS:
        raise ConfigError(f"--format {cfg.format!r}: unknown; pass one of auto, {', '.join(FORMATS)}")
    if cfg.truncation not in TRUNCATION:
        raise ConfigError(f"--truncation {cfg.truncation!r}: must be one of {', '.join(TRUNCATION)}")
    if not (0 <= cfg.eval_split < 1):
        raise ConfigError(f"--eval_split {cfg.eval_split}: must be a fraction within [0, 1); e.g. 0.05")
    if cfg.eval_split and cfg.eval_data:
        raise ConfigError("--eval_split and --eval_data together: pass one (a hold-out of --data, or a file)")
    if cfg.train_on_prompt and cfg.last_turn_only:
        raise ConfigError(
            "--train_on_prompt and --last_turn_only together: the first trains every token, the second only the "
            "last answer; pass one"
        )
    if cfg.eval_split and not cfg.data:
        raise ConfigError("--eval_split needs --data to hold out from")
    parse_field_map(cfg.field_map)
    parse_sources(cfg.data)


def uses_stream(cfg: Any) -> bool:
    """Whether the run's data goes through training/dataset.py (anything but one plain text file or the
    standard library, which keep the fixed-window path of training/data.py)."""
    sources = parse_sources(cfg.data)
    if not sources:
        return False
    if cfg.packing is not None or cfg.eval_split or len(sources) > 1 or sources[0].weight != 1:
        return True
    return not plain_text(cfg, sources[0].path)


def plain_text(cfg: Any, file: str) -> bool:
    """Whether ``file`` is raw text (a .txt, or a .jsonl of text records) under --format auto|text: the
    fixed-window path, which needs no tokenizer files beside the checkpoint."""
    if cfg.format not in ("auto", "text"):
        return False
    path = Path(file)
    if path.is_dir() or path.suffix in (".parquet", ".json"):
        return False
    if cfg.format == "text" or path.suffix != ".jsonl" or not path.is_file():
        return True  # a plain text file (or a missing one: the text path names it)
    names = parse_field_map(cfg.field_map)
    names.setdefault("text", cfg.text_field)
    for _, record in read_records(path, cfg.text_field):
        fmt = detect_format(record, names) if isinstance(record, dict) else None
        return fmt is None or fmt.name == "text"
    return True


def hf_tokenizer(model_path: str) -> Any:
    """The checkpoint's own tokenizer (chat data needs its template and special tokens)."""
    from transformers import AutoTokenizer

    if not any(
        (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise ConfigError(
            f"--model_path {model_path}: has no tokenizer (tokenizer.json or tokenizer.model); chat and instruction "
            f"data need it: copy the published tokenizer files beside config.json"
        )
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:  # a broken tokenizer file: the user's input
        raise ConfigError(f"--model_path {model_path}: its tokenizer does not load ({exc})") from None


def build_run_data(
    cfg: Any, state: Any, model_path: str, vocab_size: int, eos_token_id: int | None
) -> tuple[PackedData | DataStream, EvalSet | None]:
    """This rank's training data and eval set (no collective)."""
    main = state.rank == 0
    stream = uses_stream(cfg)
    chat_eval = bool(cfg.eval_data) and not plain_text(cfg, cfg.eval_data)
    tokenizer = hf_tokenizer(model_path) if stream or chat_eval else None
    if stream:
        return build_datasets(cfg, tokenizer, state, main)
    sources = parse_sources(cfg.data)
    data = build_data(
        model_path,
        sources[0].path if sources else None,
        vocab_size=vocab_size,
        eos_token_id=eos_token_id,
        seq_len=cfg.max_length,
        batch_size=cfg.batch_size,
        micro_batches=cfg.steps * cfg.grad_accum,
        dp_size=state.dp_size,
        dp_rank=state.dp_rank,
        seed=cfg.seed,
        text_field=cfg.text_field,
        grad_accum=cfg.grad_accum,
    )
    # raw-text eval data is left to training/eval.text_eval_set (run_eval_set), as raw-text training data is
    evals = build_eval_batches(cfg, tokenizer, state, prepare(cfg, tokenizer, with_train=False)) if chat_eval else None
    return data, evals
