"""``npu-parallel verify --pp N``: the converted model run as pipeline stages, captured stage by stage.

Every rank keeps the whole converted model and runs its stage of one 1F1B step (:func:`~npu_parallel.training.
pipeline.pipeline_step`) over ``micro`` copies of the verify batch, so the step's loss is the batch's mean
cross-entropy and its gradients are the unsplit model's gradients of it. The same forward hooks as at pp 1
(:class:`~npu_parallel.tools.verify_capture.Capture`) record the layers this stage runs (the copies give the same
figures: the last one's are kept); the last stage's output head gives the logits. Each stage's captures and its own
parameters' full gradients (gathered over tp first) travel to the pipeline's first rank over the pp group, so rank 0
compares every layer and every gradient exactly as at pp 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.verify_capture import Capture, full_grads
from npu_parallel.training.batch import Batch
from npu_parallel.training.pipeline import Pipeline, build_pipeline, pipeline_step

__all__ = ["pipelined_capture", "stage_layout"]


def stage_layout(pipe: Pipeline) -> list[dict]:
    """Per stage: its index, its decoder layers ``[start, stop)`` and what else it holds."""
    ranges = pipe.split.ranges()
    out = []
    for s, (start, stop) in enumerate(ranges):
        extra = (["embedding"] if s == 0 else []) + (["norm", "head"] if s == len(ranges) - 1 else [])
        out.append({"stage": s, "layers": [start, stop], "extra": extra})
    return out


def pipelined_capture(
    model: nn.Module, ids: torch.Tensor, state: ParallelState, *, backward: bool, micro: int
) -> tuple[Capture, dict, dict[str, torch.Tensor], dict]:
    """(every layer's capture, model outputs, full gradients, layout) of one pipelined step; complete on the
    pipeline's first rank (the others hold their stage's part only). ``ids`` ``[B, L]``."""
    pipe = build_pipeline(model, state, schedule="1f1b")
    batches = [Batch.from_windows(ids.cpu()).to(state.device)] * micro
    cap = Capture(model)
    seen: dict[str, torch.Tensor] = {}

    def keep_logits(module: nn.Module, args: Any, out: Any) -> None:
        seen["logits"] = out.detach().float().clone()  # [B, L, V], gathered (verify never runs vocab-parallel)

    head: Any = getattr(model, "get_output_embeddings")()  # noqa: B009 (typed as a Tensor)
    handle = head.register_forward_hook(keep_logits) if state.pp_rank == state.pp_size - 1 else None
    model.train()  # routers' auxiliary losses, as at pp 1
    try:
        step = pipeline_step(pipe, batches, state)
    finally:
        cap.remove()
        if handle is not None:
            handle.remove()
    grads: dict[str, torch.Tensor] = {}
    if backward:  # every rank of a tp group gathers every parameter (collectives in one order); keep the stage's
        own = {id(p) for p in pipe.parameters()}
        names = {n for n, p in model.named_parameters() if id(p) in own}
        grads = {n: g for n, g in full_grads(model, state).items() if n in names}
    mine = {"data": {i: d for i, d in cap.data.items() if d}, "grads": grads, "logits": seen.get("logits")}
    parts: list[Any] = [None] * state.pp_size
    first = state.pp_rank == 0
    dist.gather_object(mine, parts if first else None, group=state.pp_group, group_dst=0)
    if first:
        grads = {}
        for part in parts:  # a shared embedding's copies hold the same (summed) gradient: the first stage's wins
            cap.data.update(part["data"])
            for name, g in part["grads"].items():
                grads.setdefault(name, g)
    logits = parts[-1]["logits"] if first else seen.get("logits")
    aux = step.aux.detach().float() if step.aux is not None else None
    outs = {"logits": logits, "loss": step.ce.detach().float(), "aux_loss": aux}
    layout = {"pp": state.pp_size, "micro": micro, "schedule": pipe.schedule, "stages": stage_layout(pipe)}
    return cap, outs, grads, layout
