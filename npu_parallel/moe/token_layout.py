"""Which tokens of a forward are real and which document each belongs to, for the load-balancing loss and the
routed load: padding must count in neither (nor in DeepSeek-V3's bias update), and DeepSeek's sequence-wise loss
is taken per document of a packed row, as if each were alone in its own row.

Shapes: B rows, S tokens per row, T = B*S tokens, D documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from npu_parallel.moe.dispatchers.base import slot_counts

__all__ = ["TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """A forward's tokens: ``keep [T]`` float32 (1 real, 0 padding), ``segment [T]`` int64 (the document's index
    over the whole batch, padding ``D``: a bin no loss reads) and ``sizes`` (tokens per document, on the host)."""

    keep: torch.Tensor
    segment: torch.Tensor
    sizes: tuple[int, ...]

    @property
    def kept(self) -> int:
        """Real tokens (host-side: no device sync)."""
        return sum(self.sizes)

    @property
    def documents(self) -> int:
        return len(self.sizes)

    @classmethod
    def from_documents(cls, document_ids: torch.Tensor, lengths: Sequence[Sequence[int]]) -> TokenLayout:
        """From a micro-batch's ``document_ids [B, S]`` (numbered per row from 0, padding -1) and its rows' document
        lengths (host)."""
        sizes = tuple(n for row in lengths for n in row)
        offsets = [0]
        for row in lengths[:-1]:
            offsets.append(offsets[-1] + len(row))
        start = torch.tensor(offsets, dtype=torch.long, device=document_ids.device)[:, None]  # [B, 1]
        real = document_ids >= 0
        segment = torch.where(real, document_ids + start, torch.full_like(document_ids, len(sizes)))
        return cls(real.reshape(-1).float(), segment.reshape(-1), sizes)

    def slot_counts(self, indices: torch.Tensor, bins: int) -> torch.Tensor:
        """``[bins]`` float32: the real tokens' routed slots per expert (``indices [T, k]``)."""
        return slot_counts(indices, bins, torch.float32, weights=self.keep[:, None].expand_as(indices))
