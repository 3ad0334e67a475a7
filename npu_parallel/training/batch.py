"""A micro-batch as the model sees it: the one currency of the data code, the step, the pipeline and eval.

Conventions (every producer keeps them, every consumer relies on them):

- ``labels`` are aligned with ``input_ids`` as in Hugging Face (the loss shifts: position ``i`` predicts
  ``labels[i + 1]``), -100 where a token is not a target. The first token of every document is -100, so no
  document is ever predicted from the one before it in a packed row.
- ``position_ids`` restart at 0 at each document.
- ``document_ids`` number the documents of a row from 0; padding is -1 (its labels are -100). None means one
  document per row and no padding (fixed windows of text): the model's plain causal attention is exact.
- ``lengths`` are the same boundaries on the host (per row, the documents' token counts, padding excluded),
  for kernels that take sequence lengths (torch_npu's TND layout) without a device-to-host copy.

Shapes: B rows, L tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

IGNORE_INDEX = -100
PAD_DOCUMENT = -1

__all__ = ["IGNORE_INDEX", "PAD_DOCUMENT", "Batch"]


@dataclass
class Batch:
    """One micro-batch: ``input_ids``, ``labels``, ``position_ids`` and ``document_ids`` are ``[B, L]`` int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor | None = None
    lengths: tuple[tuple[int, ...], ...] = ()
    # supervised targets (labels[:, 1:] != -100), counted on the host where the batch was made
    num_targets: int = field(default=-1)
    # the labels and document ids where the batch was made (the host), for counts that must not sync a device
    host: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"Batch.input_ids must be [rows, tokens], got shape {shape}")
        for name in ("labels", "position_ids", "document_ids"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"Batch.{name} has shape {tuple(t.shape)}, input_ids {shape}; they must match")
        if self.host is None:
            self.host = (self.labels, self.document_ids)
        if self.num_targets < 0:
            self.num_targets = self.count_targets(0)
        if not self.lengths:
            self.lengths = tuple((shape[1],) for _ in range(shape[0])) if self.document_ids is None else ()

    @classmethod
    def from_windows(cls, input_ids: torch.Tensor) -> Batch:
        """Fixed windows of text ``[B, L]``: every token a label, one document per row."""
        positions = torch.arange(input_ids.shape[1], dtype=torch.long).expand_as(input_ids).contiguous()
        return cls(input_ids, input_ids.clone(), positions)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Tokens in the batch, padding included."""
        return int(self.input_ids.numel())

    @property
    def packed(self) -> bool:
        """Whether a row holds more than one document or padding (the attention must see the boundaries)."""
        return self.document_ids is not None

    def targets(self, depth: int = 0) -> torch.Tensor:
        """What position ``i`` predicts at ``depth`` (0: the next token; k: DeepSeek-V3's MTP depth k, token
        ``i + k + 1``): ``labels[:, depth + 1:]`` ``[B, L - depth - 1]``, -100 where that token lies in another
        document than position ``i`` (so no target crosses a document)."""
        return _targets(self.labels, self.document_ids, depth)

    def count_targets(self, depth: int = 0) -> int:
        """How many of :meth:`targets` are supervised, counted on the host copy (no device sync)."""
        assert self.host is not None
        labels, docs = self.host
        return int((_targets(labels, docs, depth) != IGNORE_INDEX).sum())

    def padding_mask(self) -> torch.Tensor | None:
        """``[B, L]`` bool, True on real tokens; None when the batch has no padding."""
        return None if self.document_ids is None else self.document_ids != PAD_DOCUMENT

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device`` (the host-side counts and lengths kept)."""
        docs = None if self.document_ids is None else self.document_ids.to(device, non_blocking=True)
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            document_ids=docs,
        )


def _targets(labels: torch.Tensor, document_ids: torch.Tensor | None, depth: int) -> torch.Tensor:
    target = labels[:, depth + 1 :]
    if document_ids is None or depth == 0:  # depth 0: a document's first token is -100 already
        return target
    crossed = document_ids[:, depth + 1 :] != document_ids[:, : -(depth + 1)]
    return torch.where(crossed, torch.full_like(target, IGNORE_INDEX), target)
