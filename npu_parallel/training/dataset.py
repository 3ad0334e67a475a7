"""The SFT data of a run: every ``--data`` source read, rendered and labelled (training/labels.py), over-long
examples truncated or dropped, an eval hold-out set aside, and the rest served as per-step micro-batches.

The order makes the global batch of a step a fixed set of rows whatever the layout: epoch ``e`` is a seeded
shuffle of the sources' examples (each source repeated or subsampled by its weight), packed best-fit into rows
(``--packing``) or one example per row; the rows of all epochs form one sequence and step ``s`` holds rows
``[s G, (s + 1) G)`` with ``G = batch_size x grad_accum x dp``. Those rows are sorted by length (least padding),
and micro-batch ``m`` of dp rank ``r`` takes chunk ``m x dp + r`` of ``batch_size`` rows. So dp1/ga4, dp2/ga2 and
dp4/ga1 see the same examples in each step, and the step loss (summed over the global batch's targets, divided by
their count) is the same.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from npu_parallel.training.batch import IGNORE_INDEX, Batch
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.formats import Conversation, RecordError
from npu_parallel.training.labels import Encoded, Encoder
from npu_parallel.training.packing import best_fit, make_batch, padding_fraction
from npu_parallel.training.sources import load_examples, parse_field_map, parse_sources
from npu_parallel.training.templates import resolve_template

__all__ = [
    "DataStats",
    "DataStream",
    "EvalSet",
    "Prepared",
    "build_datasets",
    "build_eval_batches",
    "build_train_stream",
    "prepare",
]

logger = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What became of the examples read: kept, truncated to --max_length, dropped (too long under
    ``--truncation drop``) and unsupervised (no target left, skipped)."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    unsupervised: int = 0

    def line(self) -> str:
        return (
            f"{self.examples} examples, {self.truncated} truncated, {self.dropped} dropped (too long), "
            f"{self.unsupervised} unsupervised (skipped)"
        )


@dataclass
class Prepared:
    """Every encoded example of the run, the source each came from, and the train / eval split of them."""

    docs: list[Encoded]
    source: list[int]
    weights: list[float]
    train: list[int]
    eval: list[int]
    stats: DataStats
    eval_stats: DataStats | None = None
    pad_id: int = 0
    names: list[str] = field(default_factory=list)


def _encoder(cfg: Any, tokenizer: Any, chat: bool) -> Encoder:
    template = resolve_template(cfg.template, tokenizer) if chat else None
    return Encoder(tokenizer, template, train_on_prompt=cfg.train_on_prompt, last_turn_only=cfg.last_turn_only)


def _read(cfg: Any, specs: Any, tokenizer: Any, stats: DataStats) -> tuple[list[Encoded], list[int], list[float]]:
    """The encoded examples of ``specs`` (PATH[:WEIGHT] entries), their source index and the sources' weights."""
    field_map = parse_field_map(cfg.field_map)
    loaded = [(s, *load_examples(s.path, cfg.format, field_map, cfg.text_field)) for s in parse_sources(specs)]
    chat = any(isinstance(x, Conversation) for _, _, examples, _ in loaded for x in examples)
    encoder = _encoder(cfg, tokenizer, chat)
    docs: list[Encoded] = []
    source: list[int] = []
    for n, (_, _, examples, wheres) in enumerate(loaded):
        for example, where in zip(examples, wheres, strict=True):
            try:
                enc = encoder.encode(example)
            except RecordError as exc:
                raise ConfigError(f"--data {where}: {exc}") from None
            stats.examples += 1
            if len(enc.ids) > cfg.max_length:
                if cfg.truncation == "drop":
                    stats.dropped += 1
                    continue
                stats.truncated += 1
                enc = Encoded(enc.ids[: cfg.max_length], enc.labels[: cfg.max_length])
            if enc.targets == 0:
                stats.unsupervised += 1
                continue
            docs.append(enc)
            source.append(n)
    return docs, source, [s.weight for s, *_ in loaded]


def prepare(cfg: Any, tokenizer: Any, with_train: bool | None = None) -> Prepared:
    """Read, encode and split the run's data (``cfg`` a TrainConfig; ``with_train`` False, or None without --data:
    its --eval_data only, as ``npu-parallel eval`` needs); ConfigError on any bad input."""
    if with_train is None:
        with_train = bool(cfg.data) or not cfg.eval_data
    stats = DataStats()
    docs, source, weights = _read(cfg, cfg.data, tokenizer, stats) if with_train else ([], [], [])
    if with_train and not docs:
        raise ConfigError(f"--data {cfg.data}: no example left to train on ({stats.line()}); raise --max_length")
    train, held = list(range(len(docs))), []
    if cfg.eval_split:
        k = round(cfg.eval_split * len(docs))
        if not 1 <= k < len(docs):
            raise ConfigError(
                f"--eval_split {cfg.eval_split}: holds out {k} of {len(docs)} examples, leaving "
                f"{'no eval' if k < 1 else 'no training'} data; pass a fraction that leaves both, or --eval_data"
            )
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held = sorted(order[:k])
        train = sorted(order[k:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prepared = Prepared(docs, source, weights, train, held, stats, pad_id=int(pad or 0))
    if cfg.eval_data:
        eval_stats = DataStats()
        eval_docs, _, _ = _read(cfg, cfg.eval_data, tokenizer, eval_stats)
        if not eval_docs:
            raise ConfigError(f"--eval_data {cfg.eval_data}: no example left to evaluate ({eval_stats.line()})")
        prepared.eval = list(range(len(docs), len(docs) + len(eval_docs)))
        prepared.docs = docs + eval_docs
        prepared.source = source + [-1] * len(eval_docs)
        prepared.eval_stats = eval_stats
    return prepared


class DataStream:
    """Per-step micro-batches of one dp rank: ``next_step()`` gives the ``grad_accum`` micro-batches of the next
    step, ``next()`` one micro-batch; ``position`` counts the micro-batches consumed (resume sets it)."""

    def __init__(
        self,
        prepared: Prepared,
        *,
        packing: bool,
        max_length: int,
        batch_size: int,
        grad_accum: int,
        dp_size: int,
        dp_rank: int,
        seed: int = 0,
        fixed_width: bool = False,
    ):
        self.p = prepared
        self.packing, self.max_length, self.seed = packing, max_length, seed
        # pipeline stages send one shape for every micro-batch: each padded to max_length, not its longest row
        self.fixed_width = fixed_width
        self.batch_size, self.grad_accum, self.dp_size, self.dp_rank = batch_size, grad_accum, dp_size, dp_rank
        self.position = 0
        self._epochs: list[list[list[int]]] = []
        self._starts = [0]
        self._cached: tuple[int, list[list[list[int]]]] | None = None
        if not self._epoch(0):
            raise ConfigError("--data: the weights leave no example in an epoch; raise them")
        rows = self._epoch(0)
        per_micro = sum(self._tokens(r) for r in rows) / max(1, len(rows)) * batch_size
        self.tokens_per_batch = max(1, round(per_micro))
        steps = max(1, len(rows) // self.global_rows)
        micro = [[self._tokens(r) for r in chunk] for s in range(steps) for chunk in self._step(s)]
        if fixed_width:  # every row padded to max_length
            total = sum(len(rows) for rows in micro) * max_length
            self.padding_fraction = 1.0 - sum(map(sum, micro)) / total if total else 0.0
        else:
            self.padding_fraction = padding_fraction(micro)

    @property
    def global_rows(self) -> int:
        return self.batch_size * self.grad_accum * self.dp_size

    def _tokens(self, row: list[int]) -> int:
        return sum(len(self.p.docs[i].ids) for i in row)

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            self._epochs.append(self._build_epoch(len(self._epochs)))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
        return self._epochs[e]

    def _build_epoch(self, e: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        pool: list[int] = []
        for s, weight in enumerate(self.p.weights):
            mine = [i for i in self.p.train if self.p.source[i] == s]
            whole, frac = int(weight), weight - int(weight)
            pool += mine * whole
            if frac and mine:  # a seeded share of the source for the fractional part of its weight
                pick = torch.randperm(len(mine), generator=g)[: round(frac * len(mine))].tolist()
                pool += [mine[i] for i in sorted(pick)]
        pool = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        if not self.packing:
            return [[i] for i in pool]
        rows = [[pool[j] for j in row] for row in best_fit([len(self.p.docs[i].ids) for i in pool], self.max_length)]
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]

    def _row(self, j: int) -> list[int]:
        e = 0
        while True:
            rows = self._epoch(e)
            if j < self._starts[e + 1]:
                return rows[j - self._starts[e]]
            e += 1

    def _step(self, s: int) -> list[list[list[int]]]:
        """The rows of step ``s`` (by length, longest first) in chunks of ``batch_size``: chunk m x dp + r is
        micro-batch m of dp rank r."""
        if self._cached is not None and self._cached[0] == s:
            return self._cached[1]
        g = self.global_rows
        rows = [self._row(j) for j in range(s * g, (s + 1) * g)]
        rows.sort(key=self._tokens, reverse=True)  # stable: equal lengths keep the sequence order
        chunks = [rows[c : c + self.batch_size] for c in range(0, g, self.batch_size)]
        self._cached = (s, chunks)
        return chunks

    def batch(self, g: int) -> Batch:
        """Micro-batch ``g`` (counted over the steps) of this dp rank."""
        s, m = divmod(g, self.grad_accum)
        chunk = self._step(s)[m * self.dp_size + self.dp_rank]
        width = self.max_length if self.fixed_width else None
        return make_batch([[self.p.docs[i] for i in row] for row in chunk], self.p.pad_id, width)

    def next(self) -> Batch:
        b = self.batch(self.position)
        self.position += 1
        return b

    def next_step(self) -> list[Batch]:
        """The ``grad_accum`` micro-batches of the next step."""
        return [self.next() for _ in range(self.grad_accum)]

    def __iter__(self):
        while True:
            yield self.next_step()


@dataclass
class EvalSet:
    """This dp rank's eval micro-batches (the same count on every rank: a filler holds no target), and the whole
    eval set's example and supervised-target counts."""

    batches: list[Batch]
    examples: int
    targets: int
    padding_fraction: float


def _no_targets(batch: Batch) -> Batch:
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    return replace(batch, labels=labels, num_targets=-1, host=None)


def eval_set(p: Prepared, *, packing: bool, max_length: int, batch_size: int, dp_size: int, dp_rank: int) -> EvalSet:
    """Every eval example exactly once: packed (or one per row) in order, micro-batches dealt round-robin."""
    idx = p.eval
    if packing:
        rows = [[idx[j] for j in row] for row in best_fit([len(p.docs[i].ids) for i in idx], max_length)]
    else:
        rows = [[i] for i in idx]
    chunks = [rows[c : c + batch_size] for c in range(0, len(rows), batch_size)]
    mine = chunks[dp_rank::dp_size]
    batches = [make_batch([[p.docs[i] for i in row] for row in chunk], p.pad_id) for chunk in mine]
    per_rank = math.ceil(len(chunks) / dp_size)
    filler = _no_targets(make_batch([[p.docs[i] for i in row] for row in chunks[0]], p.pad_id))
    batches += [filler] * (per_rank - len(batches))
    lengths = [[sum(len(p.docs[i].ids) for i in row) for row in chunk] for chunk in chunks]
    targets = sum(p.docs[i].targets for i in idx)
    return EvalSet(batches, len(idx), targets, padding_fraction(lengths))


def _packing(cfg: Any) -> bool:
    return True if cfg.packing is None else bool(cfg.packing)


def build_train_stream(cfg: Any, tokenizer: Any, state: Any, prepared: Prepared | None = None) -> DataStream:
    """The run's training micro-batches for this dp rank (``state`` a ParallelState: dp_size, dp_rank)."""
    p = prepared or prepare(cfg, tokenizer)
    return DataStream(
        p,
        packing=_packing(cfg),
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        dp_size=state.dp_size,
        dp_rank=state.dp_rank,
        seed=cfg.seed,
        fixed_width=getattr(cfg, "pp_size", 1) > 1,  # pipeline stages: one shape per micro-batch
    )


def build_eval_batches(cfg: Any, tokenizer: Any, state: Any, prepared: Prepared | None = None) -> EvalSet | None:
    """This dp rank's share of the eval set (``--eval_data`` or ``--eval_split``); None when the run has none."""
    p = prepared or prepare(cfg, tokenizer)
    if not p.eval:
        return None
    packing = _packing(cfg)
    return eval_set(
        p,
        packing=packing,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        dp_size=state.dp_size,
        dp_rank=state.dp_rank,
    )


def build_datasets(cfg: Any, tokenizer: Any, state: Any, main: bool = True) -> tuple[DataStream, EvalSet | None]:
    """The training stream and the eval set of a run, its data read once; logs what became of the examples."""
    p = prepare(cfg, tokenizer)
    stream = build_train_stream(cfg, tokenizer, state, p)
    evals = build_eval_batches(cfg, tokenizer, state, p)
    if main:
        how = f"packed best-fit into rows of {cfg.max_length}" if stream.packing else "one per row, padded"
        logger.info(
            "data: %s; %d train examples %s, padding %.1f%%",
            p.stats.line(),
            len(p.train),
            how,
            100 * stream.padding_fraction,
        )
        if evals is not None:
            logger.info("eval data: %d examples, %d targets", evals.examples, evals.targets)
    return stream, evals
