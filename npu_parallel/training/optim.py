"""Optimizer, LR schedule and gradient clipping by the true global norm of a tensor-parallel model."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.parallel.data_parallel import is_dtensor, local_tensor
from npu_parallel.parallel.shard_spec import spec_of
from npu_parallel.parallel.state import ParallelState


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def global_grad_norm(model: nn.Module, state: ParallelState, skip: Collection[nn.Parameter] = ()) -> torch.Tensor:
    """L2 norm of the full model's gradient, fp32 on ``state.device``: each sharded parameter counted once across
    the group that splits it (tp; the ep group for routed experts), each replicated one once (its gradient is
    identical on every TP rank), not tp times; a gradient that data_parallel sharded (a DTensor, over dp or, for
    experts at ep > tp, over edp) is summed over its mesh's ranks, each row once.

    Under pipeline parallelism (``state.pp_size > 1``) ``model`` holds this rank's stages only and the squares are
    summed over the pp group too (one sqrt of the sum over every stage); ``skip``: parameters another stage
    counts already (the last stage's copy of the first stage's embedding)."""
    skipped = {id(p) for p in skip}
    # per process group a DTensor gradient is sharded over (None: not sharded): [tp-sharded, experts, replicated]
    buckets: dict[dist.ProcessGroup | None, torch.Tensor] = {}
    for p in unique_params(model):
        if p.grad is None or id(p) in skipped:
            continue
        group = p.grad.device_mesh.get_group() if is_dtensor(p.grad) else None
        sums = buckets.setdefault(group, torch.zeros(3, dtype=torch.float32, device=state.device))
        sq = local_tensor(p.grad).detach().float().pow(2).sum()
        spec = spec_of(p)
        sums[2 if spec is None else 1 if spec.axis == "ep" else 0] += sq
    total = torch.zeros(3, dtype=torch.float32, device=state.device)
    for group, sums in buckets.items():  # the same groups in the same order on every member: parameter order
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        total += sums
    if state.ep_group is state.tp_group:  # ep = tp: the experts split over the tp ranks, one reduction
        parts = [(total[:2], state.tp)]
    else:
        parts = [(total[:1], state.tp), (total[1:2], state.ep)]
    reduced = []
    for part, g in parts:
        part = part.clone()
        if g.size > 1:
            dist.all_reduce(part, group=g.group)
        reduced.append(part)
    squares = torch.cat(reduced).sum() + total[2]
    if state.pp_size > 1:  # every stage's squares, the same parameters counted once across the pipeline
        dist.all_reduce(squares, group=state.pp_group)
    return squares.sqrt()


def clip_grad_norm_(
    model: nn.Module, max_norm: float, state: ParallelState, skip: Collection[nn.Parameter] = ()
) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping (``skip``: see
    :func:`global_grad_norm`; skipped gradients are scaled too)."""
    norm = global_grad_norm(model, state, skip)
    if max_norm and max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in unique_params(model):
            if p.grad is not None:
                grad = local_tensor(p.grad)  # this rank's rows: every rank scales its own
                grad.mul_(coef.to(grad.dtype))
    return norm


FUSED_DEVICES = ("cpu", "cuda")  # torch's fused AdamW kernels; elsewhere (npu) the foreach implementation


def fused_adamw(params: Sequence[torch.Tensor]) -> bool:
    """Whether AdamW runs as torch's fused kernel: every parameter floating point on a device that has it (the
    default of transformers' Trainer since torch 2.8; one pass over the states, about 3x the foreach path on CPU)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas=(0.9, 0.95),
    *,
    params: Sequence[nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over ``params`` (default: every parameter of ``model`` that trains; a pipeline rank's: its stages'),
    fused where :func:`fused_adamw` allows; no weight decay on biases, norms and other 1-D parameters. The
    optimizer records each group's parameter names (in ``model``, as ``np_param_names``), so a checkpoint's
    optimizer state resumes at another pipeline size by name."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in unique_params(model) if params is None else list({id(p): p for p in params}.values()):
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused_adamw(decay + no_decay))
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    opt.np_param_names = [[names.get(id(p), "") for p in g["params"]] for g in groups]  # type: ignore[attr-defined]
    return opt


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warmup to the base LR, then cosine decay to ``min_ratio`` of it at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
