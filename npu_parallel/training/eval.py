"""Evaluation: the loss and perplexity of a model over a whole eval set, every example once, token-weighted.

The eval loss is the cross-entropy summed over every supervised target of the eval set divided by their count
(the same normalization as a training step, :mod:`npu_parallel.training.step`), so it does not depend on the
batch size, the number of dp ranks or how examples are packed. Each dp rank runs its share of the eval
micro-batches (the same number on every rank: a filler holds no target), then one all-reduce sums the shares.

The eval set is anything with ``batches`` (this rank's list of :class:`Batch`) and ``examples`` (the whole set's
example count): the data code's ``build_eval_batches`` (chat and instruction formats) or :func:`text_eval_set`
(fixed windows of raw text, each window one example).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.batch import IGNORE_INDEX, Batch
from npu_parallel.training.data import file_documents, first_eos, load_tokenizer, pack
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.losses import batch_loss

__all__ = ["EvalResult", "EvalSet", "TextEvalSet", "check_eval_args", "evaluate", "text_eval_set"]


class EvalSet(Protocol):
    batches: list[Batch]
    examples: int


@dataclass
class EvalResult:
    """What ``npu-parallel eval`` prints and a run logs: mean loss, its exp, supervised targets, examples."""

    loss: float
    perplexity: float
    tokens: int
    examples: int

    def as_dict(self) -> dict:
        return asdict(self)

    def fields(self, prefix: str = "eval_") -> dict:
        """The metrics.jsonl fields of a run's eval: ``eval_loss``, ``eval_perplexity``, ``eval_tokens``, ..."""
        return {prefix + k: v for k, v in asdict(self).items()}


@dataclass
class TextEvalSet:
    """This dp rank's eval micro-batches of text windows and the whole set's counts (the data code's EvalSet's
    fields)."""

    batches: list[Batch]
    examples: int
    targets: int
    padding_fraction: float = 0.0


def _filler(batch: Batch) -> Batch:
    """The same shapes with no target: a dp rank with fewer eval micro-batches runs it so every rank runs as many
    forwards (FSDP2 gathers the weights in each)."""
    return replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX), num_targets=-1, host=None)


def text_eval_set(
    path: str,
    model_path: str | None,
    *,
    vocab_size: int,
    eos_token_id: int | None,
    max_length: int,
    batch_size: int,
    dp_size: int = 1,
    dp_rank: int = 0,
    text_field: str = "text",
    flag: str = "--eval_data",
) -> TextEvalSet:
    """Every window of ``max_length`` tokens of a .txt/.jsonl file once (documents joined by EOS, the tail shorter
    than a window left out), ``batch_size`` windows per micro-batch, micro-batches dealt round-robin to dp ranks."""
    tokenizer = load_tokenizer(model_path, vocab_size, eos_token_id)
    try:
        windows = pack(file_documents(path, text_field), tokenizer, max_length, sys.maxsize // max_length)
    except ConfigError as exc:
        raise ConfigError(f"{flag} {str(exc).removeprefix('--data ')}") from None
    chunks = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    batches = [Batch.from_windows(c) for c in chunks[dp_rank::dp_size]]
    per_rank = math.ceil(len(chunks) / dp_size)
    batches += [_filler(Batch.from_windows(chunks[0]))] * (per_rank - len(batches))
    return TextEvalSet(batches, len(windows), len(windows) * (max_length - 1))


def perplexity(loss: float) -> float:
    """exp(loss); inf where it leaves float range (logged as null)."""
    return math.exp(loss) if loss < 700 else math.inf


def check_eval_args(cfg: Any) -> None:
    """--eval_every N >= 0, and an eval set to run it on."""
    if cfg.eval_every < 0:
        raise ConfigError(f"--eval_every {cfg.eval_every}: must be 0 (only at the end) or more")
    if cfg.eval_every and not (cfg.eval_data or getattr(cfg, "eval_split", 0)):
        raise ConfigError(
            f"--eval_every {cfg.eval_every}: the run has no eval data; pass --eval_data FILE "
            f"(or --eval_split FRACTION), or --eval_every 0"
        )


def evaluate(model: nn.Module, evals: EvalSet, state: ParallelState, *, vocab_parallel: bool = False) -> EvalResult:
    """The token-weighted eval loss over ``evals`` (this rank's batches; every dp rank calls it with its own).

    Runs in eval mode without gradients (no load-balancing or MTP term: the main loss only) and puts the model
    back in the mode it was in. One all-reduce of the loss sum and one of the target count over the dp group.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=state.device)
    count = 0
    try:
        with torch.no_grad():
            for batch in evals.batches:
                part = batch_loss(model, batch.to(state.device), vocab_parallel=vocab_parallel)
                total += part.ce_sum
                count += part.targets
    finally:
        model.train(was_training)
    counts = torch.tensor([count], dtype=torch.int64, device=state.device)  # exact whatever the set's size
    if state.dp_size > 1:
        dist.all_reduce(total, group=state.dp_group)
        dist.all_reduce(counts, group=state.dp_group)
    tokens = int(counts.item())
    if tokens == 0:
        raise ConfigError("the eval set holds no supervised target (every label is -100); check the eval data")
    loss = total.item() / tokens
    return EvalResult(loss, perplexity(loss), tokens, int(evals.examples))


def run_eval_set(cfg: Any, inputs: Any, state: ParallelState) -> EvalSet | None:
    """A run's eval set: the data code's (``inputs.eval``, from ``build_eval_batches``) when it built one, else
    text windows of ``--eval_data``; None when the run has no eval data. No collective (the caller agrees)."""
    found = getattr(inputs, "eval", None)
    if found is not None or not cfg.eval_data:
        return found
    config = inputs.model_config
    return text_eval_set(
        cfg.eval_data,
        inputs.model_path,
        vocab_size=config.vocab_size,
        eos_token_id=first_eos(getattr(config, "eos_token_id", None)),
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        dp_size=state.dp_size,
        dp_rank=state.dp_rank,
        text_field=cfg.text_field,
    )
