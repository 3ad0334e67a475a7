"""Pipeline-parallel training step on ``torch.distributed.pipelining``: :func:`build_pipeline` once, then
:func:`pipeline_step` per step (the pp twin of :func:`~npu_parallel.training.step.train_step`).

The step's grad_accum micro-batches are the schedule's micro-batches, so a pp step consumes the same global batch
and gives the same loss as at pp 1: the cross-entropy summed over the global batch's supervised targets divided by
their count (counted with one all-reduce over dp before the schedule starts; every stage of a pipeline holds the
same micro-batches), the load-balancing term averaged over the micro-batches x dp (summed over every stage's layers
exactly once, :mod:`~npu_parallel.training.pipeline_stage`), DeepSeek-V3's MTP term per depth on the last stage.
The schedule never rescales gradients (``scale_grads=False``: each micro-batch's loss is already its share of the
global loss; torchtitan #1558 and pytorch #164756 are about getting this scale wrong).

The embedding is the first stage's, and the last stage holds a copy when the MTP layers (or a tied head) use it;
the two copies' gradients are summed over the ``pp_ends`` group after the schedule, so both stay equal after every
optimizer step (Megatron's tied-embedding rule). Without FSDP2 the stage gradients are averaged over dp here; with
FSDP2 on the stage modules the pipelining runtime reduces them on the last micro-batch.

Schedules (``--pp_schedule``): ``1f1b`` (default), ``interleaved_1f1b`` (``virtual`` stages per rank, looped),
``gpipe``, and where the installed torch has them ``looped_bfs``, ``interleaved_zero_bubble``, ``zbv`` and
``dualpipev`` (two stages per rank in a V).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.convert.mtp import mtp_layers
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.batch import Batch
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.pipeline_split import StageSplit, resolve_split
from npu_parallel.training.pipeline_stage import StageContext, StageModule
from npu_parallel.training.step import StepLoss, global_counts

__all__ = ["SCHEDULES", "Pipeline", "build_pipeline", "check_schedule", "pipeline_step", "stage_indices"]

# name -> (torch class, stages per rank: None = ``virtual``, placement "loop" or "v")
SCHEDULES: dict[str, tuple[str, int | None, str]] = {
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "gpipe": ("ScheduleGPipe", 1, "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", None, "loop"),
    "looped_bfs": ("ScheduleLoopedBFS", None, "loop"),
    "interleaved_zero_bubble": ("ScheduleInterleavedZeroBubble", None, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}


def available_schedules() -> list[str]:
    """The schedule names the installed torch offers."""
    from torch.distributed import pipelining

    return [name for name, (cls, _, _) in SCHEDULES.items() if hasattr(pipelining.schedules, cls)]


def stages_per_rank(schedule: str, virtual: int) -> int:
    per = SCHEDULES[schedule][1]
    return virtual if per is None else per


def stage_indices(schedule: str, pp_size: int, pp_rank: int, virtual: int = 1) -> list[int]:
    """The global stage indices this pp rank runs: looped (``r, r + p, ..``) or V-shaped (``r, 2p - 1 - r``)."""
    per = stages_per_rank(schedule, virtual)
    if SCHEDULES[schedule][2] == "v":
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + v * pp_size for v in range(per)]


def check_schedule(schedule: str, pp_size: int, micro: int, virtual: int = 1) -> None:
    """ConfigError (one line, before any collective) for a schedule this torch lacks or too few micro-batches."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"--pp_schedule {schedule!r} is not a schedule; use one of {sorted(SCHEDULES)}")
    if schedule not in available_schedules():
        raise ConfigError(
            f"--pp_schedule {schedule}: torch {torch.__version__} has no {SCHEDULES[schedule][0]}; "
            f"use one of {available_schedules()}"
        )
    if SCHEDULES[schedule][1] is None and virtual < 1:
        raise ConfigError(f"--pp_virtual {virtual}: give at least 1 stage per rank")
    if SCHEDULES[schedule][1] == 1 and virtual != 1:
        raise ConfigError(
            f"--pp_schedule {schedule} runs one stage per rank; --pp_virtual {virtual} needs interleaved_1f1b"
        )
    stages = pp_size * stages_per_rank(schedule, virtual)
    need = {"1f1b": pp_size, "zbv": stages, "dualpipev": stages}.get(schedule, 1)
    if micro < need:
        raise ConfigError(
            f"--grad_accum {micro}: the {schedule} schedule at pp {pp_size} needs at least {need} micro-batches "
            f"per step; raise --grad_accum to {need} or use --pp_schedule gpipe"
        )
    rounds = max(1, micro // pp_size)
    if schedule in ("interleaved_1f1b", "interleaved_zero_bubble") and micro % rounds:
        raise ConfigError(
            f"--grad_accum {micro}: {schedule} at pp {pp_size} needs a multiple of {rounds} micro-batches "
            f"(or fewer than {2 * pp_size}); e.g. --grad_accum {rounds * pp_size}"
        )


@dataclass
class Pipeline:
    """A model's stages on this rank and the schedules built for them (one per micro-batch count)."""

    model: nn.Module
    state: ParallelState
    schedule: str
    split: StageSplit
    modules: list[StageModule]
    context: StageContext
    virtual: int = 1
    shared_embedding: bool = False  # the first and last stage both hold the embedding (MTP or a tied head)
    hidden_dtype: torch.dtype = torch.float32  # what the stages send: the compute dtype
    _built: dict[tuple[int, ...], Any] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.split.counts)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's stage parameters, each once."""
        seen: dict[int, nn.Parameter] = {}
        for m in self.modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def runner(self, micro: int, shape: tuple[int, ...]) -> Any:
        """The torch schedule for ``micro`` micro-batches of ``shape`` [rows, tokens], built once per pair.

        The stages get their inputs' and outputs' shapes up front (static mode): torch's runtime inference would
        run each stage's forward an extra time on placeholder tensors, and a stage's forward reads its micro-batch.
        """
        key = (micro, *shape)
        if key not in self._built:
            from torch.distributed import pipelining

            indices = stage_indices(self.schedule, self.state.pp_size, self.state.pp_rank, self.virtual)
            stages = [
                pipelining.PipelineStage(
                    m, i, self.num_stages, self.state.device, *self._example(m, shape), group=self.state.pp_group
                )
                for m, i in zip(self.modules, indices, strict=True)
            ]
            cls = getattr(pipelining.schedules, SCHEDULES[self.schedule][0])
            single = SCHEDULES[self.schedule][1] == 1
            self._built[key] = cls(
                stages[0] if single else stages, n_microbatches=micro, loss_fn=_identity_loss, scale_grads=False
            )
        return self._built[key]

    def _example(self, m: StageModule, shape: tuple[int, ...]) -> tuple[tuple, tuple]:
        """(inputs, outputs) of stage ``m`` for one micro-batch, as meta tensors."""
        meta = torch.device("meta")
        width = int(getattr(self.model.config, "hidden_size"))  # noqa: B009
        hidden = torch.empty(*shape, width, dtype=self.hidden_dtype, device=meta)
        hidden.requires_grad_(True)
        # the side vector carries gradient when there is a load-balancing loss (its router probabilities)
        side = torch.empty(m.side_size(), dtype=torch.float32, device=meta).requires_grad_(m.balance is not None)
        index = torch.empty(1, 1, dtype=torch.float32, device=meta)
        inputs = (index,) if m.first else (hidden, side)
        outputs = (torch.empty((), dtype=torch.float32, device=meta),) if m.last else (hidden, side)
        return inputs, outputs


def _identity_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output  # the last stage's forward computes the micro-batch's loss itself (StageModule._loss)


def build_pipeline(
    model: nn.Module,
    state: ParallelState,
    *,
    schedule: str = "1f1b",
    virtual: int = 1,
    pp_layers: str | None = None,
    mtp_weight: float = 0.0,
    vocab_parallel: bool = False,
    hidden_dtype: torch.dtype | None = None,
) -> Pipeline:
    """Split a converted model into ``pp_size x stages-per-rank`` stages and keep this rank's (ConfigError for a
    split or schedule that cannot work). The model stays whole on the rank; only its stages' parameters train."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"--pp_schedule {schedule!r} is not a schedule; use one of {sorted(SCHEDULES)}")
    per = stages_per_rank(schedule, virtual)
    split = resolve_split(model.config, state.pp_size * per, pp_layers)
    context = StageContext(mtp_weight=mtp_weight, vocab_parallel=vocab_parallel, scale=float(state.dp_size))
    ranges = split.ranges()
    last = len(ranges) - 1
    modules = [
        StageModule(model, *ranges[i], first=i == 0, last=i == last, context=context)
        for i in stage_indices(schedule, state.pp_size, state.pp_rank, virtual)
    ]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    shared = (tied or bool(mtp_weight and mtp_layers(model))) and state.pp_size > 1
    base: Any = model.model
    dtype = hidden_dtype or base.embed_tokens.weight.dtype
    return Pipeline(model, state, schedule, split, modules, context, virtual, shared, dtype)


def pipeline_step(pipe: Pipeline, batches: Sequence[Batch], state: ParallelState) -> StepLoss:
    """Forward and backward of this rank's stages over one step's micro-batches (no optimizer step).

    Every rank of a pipeline passes the same micro-batches. Returns, on every rank of the pipeline, this dp
    rank's share of the step's losses (as :func:`train_step` does: sum them over dp for the global values).
    """
    micro = len(batches)
    check_schedule(pipe.schedule, state.pp_size, micro, pipe.virtual)
    shapes = {tuple(b.input_ids.shape) for b in batches}
    if len(shapes) > 1:
        raise ValueError(f"pipeline micro-batches must share one shape [rows, tokens]; this step has {sorted(shapes)}")
    ctx = pipe.context
    depth = len(mtp_layers(pipe.model)) if ctx.mtp_weight else 0
    counts = global_counts(batches, state, depth)
    host = counts.tolist()  # the step's one host read of the counts (the divisor itself stays on the device)
    if host[0] <= 0:
        raise ValueError("the global batch of this step holds no supervised target (every label is -100)")
    ctx.batches, ctx.counts, ctx.parts = batches, counts, []
    for m in pipe.modules:
        m.micro = 0
    runner = pipe.runner(micro, next(iter(shapes)))
    # the first stage's input is the micro-batch index (its ids come from the context); the target is unused
    index = torch.arange(micro, dtype=torch.float32, device=state.device).unsqueeze(1)  # [m, 1]
    args = (index,) if any(m.first for m in pipe.modules) else ()
    target = index if any(m.last for m in pipe.modules) else None
    runner.step(*args, target=target, return_outputs=False)
    _sync_embedding(pipe, state)
    _average_over_dp(pipe, state)
    return _gather_losses(pipe, state, ctx, int(host[0]))


def _sync_embedding(pipe: Pipeline, state: ParallelState) -> None:
    """Sum the embedding copies' gradients of the first and the last stage (MTP or a tied head uses it there)."""
    if not pipe.shared_embedding or state.pp_ends.group is None:
        return
    base: Any = pipe.model.model
    weight = base.embed_tokens.weight
    if not weight.requires_grad:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    from npu_parallel.parallel.data_parallel import local_tensor

    # under FSDP2 both copies are sharded alike over dp (each a stage's root): this rank's rows of each
    dist.all_reduce(local_tensor(weight.grad), group=state.pp_ends.group)


def _average_over_dp(pipe: Pipeline, state: ParallelState) -> None:
    """Without FSDP2 on the stages: the mean over dp of the stage gradients (FSDP2 reduces them itself)."""
    from npu_parallel.parallel.data_parallel import is_sharded

    if state.dp_size == 1 or any(is_sharded(m) for m in pipe.modules):
        return
    for p in pipe.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=state.dp_group)
            p.grad.div_(state.dp_size)


def _gather_losses(pipe: Pipeline, state: ParallelState, ctx: StageContext, targets: int) -> StepLoss:
    """The last stage's terms summed over micro-batches, broadcast to every stage of the pipeline (one send)."""
    names = ("ce", "aux", "mtp")
    vec = torch.zeros(3, dtype=torch.float32, device=state.device)
    if any(m.last for m in pipe.modules):
        for j, name in enumerate(names):
            got = [p[name] for p in ctx.parts if name in p]
            if got:
                vec[j] = torch.stack(got).sum()
    if state.pp_size > 1:
        owner = next(r for r in range(state.pp_size) if pipe.num_stages - 1 in _indices(pipe, r))
        dist.broadcast(vec, src=state.pp_ranks[owner], group=state.pp_group)
    # which terms exist is known on every rank alike (no host read of the values)
    has_aux = pipe.modules[0].balance is not None
    has_mtp = bool(ctx.mtp_weight and mtp_layers(pipe.model))
    ce = vec[0]
    aux = vec[1] if has_aux else None
    mtp = vec[2] if has_mtp else None
    total = ce + (aux if aux is not None else 0) + (ctx.mtp_weight * mtp if mtp is not None else 0)
    return StepLoss(total, ce, aux, mtp, targets)


def _indices(pipe: Pipeline, rank: int) -> list[int]:
    return stage_indices(pipe.schedule, pipe.state.pp_size, rank, pipe.virtual)
