"""The training loop's pipeline-parallel branch (``--pp_size`` > 1): what :func:`~npu_parallel.training.loop.train`
does differently when its model runs as pipeline stages.

:func:`setup` builds the pipeline once, after the model is loaded (and LoRA added): the stages of this rank
(:func:`~npu_parallel.training.pipeline.build_pipeline`), each its own FSDP2 root over dp
(:func:`~npu_parallel.parallel.data_parallel.data_parallel` on the stage module, which is what the pipelining
runtime expects: it reduces a stage's gradients on its last micro-batch), so the optimizer holds this rank's
stage parameters only. Per step: :func:`~npu_parallel.training.pipeline.pipeline_step` (the same global batch
and loss normalization as ``train_step``; the losses reach every stage), clipping by the global norm over every
stage, the expert load summed over the stages (each rank routes its stages' layers only), and before a
checkpoint every rank's copy of the other stages' parameters brought up to date from their owners, so the saved
folder is a pp 1 run's (checkpoint/save.py writes from the first stage).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.moe.load import LoadReading, _update_bias, layer_index, moe_blocks, reset_load
from npu_parallel.parallel.data_parallel import Precision, data_parallel, full_tensor
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.batch import Batch
from npu_parallel.training.optim import clip_grad_norm_
from npu_parallel.training.pipeline import Pipeline, build_pipeline, pipeline_step
from npu_parallel.training.step import StepLoss

__all__ = ["PipelineRun", "setup"]

BUCKET = 1 << 24  # elements per broadcast when the stages' parameters are brought up to date (64 MiB of fp32)


@dataclass
class PipelineRun:
    """One run's pipeline: its stages on this rank and who owns every trainable parameter."""

    pipe: Pipeline
    state: ParallelState
    owners: dict[str, int]  # trainable parameter name -> the pp rank whose stages train it (the first, if several)
    names: dict[int, str] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.pipe.model

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates on this rank: its stages' parameters, each once."""
        return self.pipe.parameters()

    def step(self, batches: Sequence[Batch]) -> StepLoss:
        """One step's forward and backward through the stages (``train_step``'s twin)."""
        return pipeline_step(self.pipe, batches, self.state)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip by the global norm over every stage (the last stage's embedding copy counted on the first only)."""
        stages = nn.ModuleList(self.pipe.modules)
        skip = []
        if self.pipe.shared_embedding and not any(m.first for m in self.pipe.modules):
            base: Any = self.model.model
            skip = [base.embed_tokens.weight]
        return clip_grad_norm_(stages, max_norm, self.state, skip)

    def warmup(self, steps: int, micro: int, shape: tuple[int, int], vocab: int) -> float:
        """JIT warmup through the stages: ``steps`` pipeline passes on a batch of ``shape``; gradients dropped."""
        if steps <= 0:
            return 0.0
        t0 = time.perf_counter()
        ids = torch.arange(shape[0] * shape[1], device=self.state.device).remainder(vocab).view(shape)
        batches = [Batch.from_windows(ids.cpu()).to(self.state.device) for _ in range(micro)]
        devices = [] if self.state.device.type == "cpu" else [self.state.device]
        with torch.random.fork_rng(devices=devices, device_type=self.state.device.type):
            for _ in range(steps):
                pipeline_step(self.pipe, batches, self.state)
        for p in self.model.parameters():
            p.grad = None
        return time.perf_counter() - t0

    def read_load(self, model: nn.Module, state: ParallelState, *, bias_update_rate: float = 0.0, update: bool = True):
        """:func:`~npu_parallel.moe.load.read_load` over the stages: every MoE block of the model in one int64
        all-reduce over the world (the layers of other stages count zero here), rows no stage routed left out; the
        bias update then moves every rank's copy of every router alike."""
        blocks = moe_blocks(model)
        if not blocks:
            return None
        e = max(b.experts.num_experts for _, b in blocks)
        packed = torch.zeros(len(blocks), e + 2, dtype=torch.int64, device=state.device)  # [L, E + dropped + seen]
        for i, (_, b) in enumerate(blocks):
            if b.expert_load is not None:
                packed[i, : b.expert_load.numel()] = b.expert_load
                packed[i, e] = 0 if b.dropped is None else b.dropped
                packed[i, e + 1] = 1
        if dist.is_initialized() and state.world_size > 1:
            dist.all_reduce(packed)
        rows = packed.tolist()  # the one host sync of the step
        kept = [i for i, r in enumerate(rows) if r[e + 1]]
        if not kept:
            return None
        load = packed[kept, :e] // state.tp_size  # every rank of a tp group routes the same tokens
        if update and bias_update_rate > 0:
            _update_bias([blocks[i] for i in kept], load, bias_update_rate)
        reset_load(model)
        paths = [blocks[i][0] for i in kept]
        return LoadReading(
            paths=paths,
            layers=[layer_index(p) for p in paths],
            load=[[x // state.tp_size for x in rows[i][:e]] for i in kept],
            dropped=[rows[i][e] for i in kept],
        )

    def sync_weights(self) -> None:
        """Every rank's copy of the other stages' trainable parameters set to their owners' values (a broadcast
        over the pp group per bucket); before a checkpoint is written, so that the first stage writes them all."""
        state = self.state
        params = dict(self.model.named_parameters())
        order = [n for n in params if n in self.owners]
        start = 0
        while start < len(order):
            owner, size = self.owners[order[start]], 0
            bucket: list[str] = []
            while start < len(order) and self.owners[order[start]] == owner and (not bucket or size < BUCKET):
                bucket.append(order[start])
                size += params[order[start]].numel()
                start += 1
            mine = owner == state.pp_rank
            if mine:
                flat = torch.cat([full_tensor(params[n]).detach().float().reshape(-1) for n in bucket])
            else:
                flat = torch.empty(size, dtype=torch.float32, device=state.device)
            dist.broadcast(flat, src=state.pp_ranks[owner], group=state.pp_group)
            if mine:
                continue
            offset = 0
            with torch.no_grad():
                for n in bucket:
                    p = params[n]
                    if n not in self.local:  # a parameter this rank trains too (the shared embedding) is current
                        p.copy_(flat[offset : offset + p.numel()].view(p.shape).to(p.dtype))
                    offset += p.numel()

    @property
    def local(self) -> set[str]:
        return {self.names[id(p)] for p in self.parameters() if id(p) in self.names}


def setup(cfg: Any, model: nn.Module, state: ParallelState, mode: Precision) -> PipelineRun | None:
    """The run's pipeline when ``state.pp_size`` > 1 (None at pp 1: the loop's own path); the stages sharded by
    FSDP2 over dp with the run's precision. Collective (every rank calls it)."""
    if state.pp_size == 1:
        return None
    pipe = build_pipeline(
        model,
        state,
        schedule=cfg.pp_schedule,
        virtual=cfg.pp_virtual,
        pp_layers=cfg.pp_layers,
        mtp_weight=cfg.mtp_loss_weight,
        vocab_parallel=cfg.vocab_parallel_loss,
        hidden_dtype=mode.compute,
    )
    for m in pipe.modules:
        data_parallel(m, state, precision=mode)
    names = {id(p): n for n, p in model.named_parameters()}
    mine = [names[id(p)] for p in pipe.parameters() if p.requires_grad]
    everyone: list = [None] * state.pp_size
    dist.all_gather_object(everyone, mine, group=state.pp_group)
    owners: dict[str, int] = {}
    for rank, trained in enumerate(everyone):
        for n in trained:
            owners.setdefault(n, rank)
    return PipelineRun(pipe, state, owners, names=names)
