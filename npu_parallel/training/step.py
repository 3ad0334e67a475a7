"""One optimizer step's forward and backward: the micro-batches, normalized by the global batch's target count.

The loss of a step is the cross-entropy summed over the supervised targets of the whole global batch (every
micro-batch of every dp rank) divided by that batch's target count, counted with ONE all-reduce per step (on
the device, before the first forward). So the loss and its gradient do not depend on how the global batch is
split into dp ranks and micro-batches (transformers #34191: a per-micro-batch mean weighs a short micro-batch's
tokens more). The load-balancing term is the mean of the micro-batches' terms (each micro-batch holds the
same number of rows whatever the layout); DeepSeek-V3's MTP term is normalized like the main loss, per depth
summed over the global batch's MTP targets.

FSDP2 averages gradients over the dp ranks, so each rank differentiates ``dp x`` its share: the reduced
gradient is that of the global loss, averaged exactly once. Gradients are reduced on the last micro-batch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.convert.mtp import mtp_layers
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.batch import Batch
from npu_parallel.training.losses import batch_loss

__all__ = ["StepLoss", "global_counts", "set_gradient_sync", "train_step"]


@dataclass
class StepLoss:
    """A step's losses as device scalars (fp32, detached), each already the global batch's value once every
    rank's share is summed (:meth:`reduce`); ``targets`` is the global supervised-target count."""

    loss: torch.Tensor  # what was differentiated: ce + aux + mtp_weight * mtp
    ce: torch.Tensor
    aux: torch.Tensor | None
    mtp: torch.Tensor | None
    targets: int

    def values(self) -> list[torch.Tensor | None]:
        return [self.loss, self.ce, self.aux, self.mtp]

    def reduce(self, state: ParallelState) -> list[float | None]:
        """The global ``[loss, ce, aux, mtp]``: every rank's share summed over the dp group (None stays None), one
        all-reduce of one fp32 vector on ``state.device`` (a dtype and a device every backend reduces), one host
        read."""
        values = self.values()
        present = [v for v in values if v is not None]
        t = torch.stack(present).to(device=state.device, dtype=torch.float32)
        if state.dp_size > 1:
            dist.all_reduce(t, group=state.dp_group)
        sums = iter(t.tolist())
        return [None if v is None else next(sums) for v in values]


def global_counts(batches: Sequence[Batch], state: ParallelState, mtp_depth: int = 0) -> torch.Tensor:
    """``[1 + depth]`` float32 on the device: supervised targets (main loss, then each MTP depth) of the global
    batch: this rank's micro-batches counted on the host, one all-reduce over the dp ranks."""
    local = [sum(b.num_targets for b in batches)] + [
        sum(b.count_targets(k) for b in batches) for k in range(1, mtp_depth + 1)
    ]
    counts = torch.tensor(local, dtype=torch.float32, device=state.device)
    if state.dp_size > 1:
        dist.all_reduce(counts, group=state.dp_group)
    return counts


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: reduce-scatter gradients after this backward (True) or accumulate them unreduced (False)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if callable(setter):
        setter(enabled)


def train_step(
    model: nn.Module,
    batches: Sequence[Batch],
    state: ParallelState,
    *,
    vocab_parallel: bool = False,
    mtp_weight: float = 0.0,
) -> StepLoss:
    """Forward and backward of this rank's micro-batches of one step (on ``state.device``); no optimizer step.

    Returns this rank's share of the global losses (:meth:`StepLoss.reduce` sums them over the dp ranks). An
    empty global batch (no supervised target anywhere) is a ValueError on every rank alike.
    """
    counts = global_counts(batches, state, len(mtp_layers(model)) if mtp_weight else 0)
    host = counts.tolist()  # the step's one host read of the counts (the divisor itself stays on the device)
    if host[0] <= 0:
        raise ValueError("the global batch of this step holds no supervised target (every label is -100)")
    n = counts[0].clamp(min=1)
    scale = float(state.dp_size)  # FSDP2 divides the reduced gradient by dp
    micro = len(batches)
    zero = torch.zeros((), dtype=torch.float32, device=state.device)
    ce_total, aux_total, mtp_total = zero.clone(), None, None
    for i, batch in enumerate(batches):
        set_gradient_sync(model, i == micro - 1)
        part = batch_loss(model, batch, vocab_parallel=vocab_parallel, mtp_weight=mtp_weight)
        ce = part.ce_sum / n
        loss = ce
        if part.aux is not None:
            aux = part.aux.float() / (micro * state.dp_size)
            loss = loss + aux
            aux_total = (zero if aux_total is None else aux_total) + aux.detach()
        if part.mtp_sums:  # DeepSeek-V3: the mean over depths of each depth's mean cross-entropy
            mtp = torch.stack([s / counts[k].clamp(min=1) for k, s in enumerate(part.mtp_sums, start=1)]).mean()
            loss = loss + mtp_weight * mtp
            mtp_total = (zero if mtp_total is None else mtp_total) + mtp.detach()
        (loss * scale).backward()
        ce_total = ce_total + ce.detach()
    set_gradient_sync(model, True)
    total = ce_total
    if aux_total is not None:
        total = total + aux_total
    if mtp_total is not None:
        total = total + mtp_weight * mtp_total
    return StepLoss(total, ce_total, aux_total, mtp_total, int(host[0]))
