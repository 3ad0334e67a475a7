"""Rows of a micro-batch: best-fit packing of examples into rows of ``max_length`` tokens, and the tensors of a
micro-batch made of rows (packed or one example each), padded to its longest row.

In a packed row each document keeps its own labels (its first token -100, so nothing is predicted across a
boundary), its position ids restart at 0, and ``document_ids`` number the documents (-1 on padding), which is what
the attention needs to stay inside a document (training/batch.py).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

from npu_parallel.training.batch import IGNORE_INDEX, PAD_DOCUMENT, Batch
from npu_parallel.training.labels import Encoded

__all__ = ["best_fit", "make_batch", "padding_fraction"]


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens: best-fit decreasing (longest first,
    each into the row it leaves the least room in), ties broken by index so the result is deterministic."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a row of {capacity}")
        at = bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            insort(free, (room - n, row))
    return rows


def make_batch(rows: Sequence[Sequence[Encoded]], pad_id: int, width: int | None = None) -> Batch:
    """A micro-batch ``[B, L]`` of ``rows`` (each a list of documents), L its longest row, or ``width`` when given
    (pipeline stages send one shape for every micro-batch of a step)."""
    longest = max(sum(len(d.ids) for d in row) for row in rows)
    if width is not None and width < longest:
        raise ValueError(f"make_batch: a row of {longest} tokens does not fit the width {width}")
    width = longest if width is None else width
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    docs = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)
    lengths = []
    for r, row in enumerate(rows):
        at = 0
        for d, doc in enumerate(row):
            n = len(doc.ids)
            ids[r, at : at + n] = torch.tensor(doc.ids, dtype=torch.long)
            lab = torch.tensor(doc.labels, dtype=torch.long)
            lab[0] = IGNORE_INDEX  # a document's first token is never predicted from the one before it
            labels[r, at : at + n] = lab
            positions[r, at : at + n] = torch.arange(n)
            docs[r, at : at + n] = d
            at += n
        lengths.append(tuple(len(doc.ids) for doc in row))
    return Batch(ids, labels, positions, docs, tuple(lengths))


def padding_fraction(micro_batches: Sequence[Sequence[int]]) -> float:
    """Padding share of micro-batches given as their rows' token counts (each padded to its longest row)."""
    total = sum(max(rows) * len(rows) for rows in micro_batches if rows)
    real = sum(sum(rows) for rows in micro_batches)
    return 0.0 if total == 0 else 1.0 - real / total
