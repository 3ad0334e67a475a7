"""save_sharded() from a live converted model, and the training state (optimizer, scheduler, RNG) beside it."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.checkpoint.manifest import (
    MANIFEST,
    build_manifest,
    check_output_dir,
    fresh_partial_dir,
    partial_dir,
    publish,
    rank_file,
    tensor_entry,
    train_file,
    write_json,
)
from npu_parallel.checkpoint.materialize import global_shape, tensors_to_load
from npu_parallel.checkpoint.safetensors_io import CheckpointError, SafetensorsWriter
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.convert.conversion import conversion_info
from npu_parallel.parallel.shard_spec import ShardSpec, spec_of
from npu_parallel.parallel.state import ParallelState

logger = logging.getLogger(__name__)


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, ShardSpec | None]]:
    """Each parameter once (tied weights under their first name) with its spec, and each persistent buffer."""
    return [(name, t, spec_of(t) if is_param else None) for name, _, _, t, is_param in tensors_to_load(model)]


def trim(t: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """The local tensor without vocab padding: exactly the global rows it stands for."""
    return t if spec is None or spec.padded == spec.length else t.narrow(spec.dim, 0, spec.length)


def _gather(obj, state: ParallelState) -> list:
    if state.world_size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier(state: ParallelState) -> None:
    if state.world_size > 1 and dist.is_initialized():
        dist.barrier()


def rng_state(device: torch.device) -> dict:
    """Every RNG a training step draws from: Python, torch (CPU and device), numpy when installed."""
    out = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        out["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if device.type in ("cuda", "npu"):
        out["device"] = getattr(torch, device.type).get_rng_state(device)
    return out


def set_rng_state(saved: dict, device: torch.device) -> None:
    random.setstate(saved["python"])
    torch.set_rng_state(saved["torch"])
    if "numpy" in saved:
        import numpy as np

        np.random.set_state(saved["numpy"])
    if "device" in saved and device.type in ("cuda", "npu"):
        getattr(torch, device.type).set_rng_state(saved["device"], device)


def save_sharded(
    model: nn.Module,
    out_dir: str | Path,
    state: ParallelState,
    *,
    optimizer=None,
    scheduler=None,
    extra: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write this model's shards (tp ranks of dp replica 0) and, with an optimizer, every rank's training state.

    Collective: every rank calls it. ``extra`` (JSON: step, data position...) goes into the manifest.
    """
    out = Path(out_dir)
    conv = conversion_info(model)
    error = None
    if state.rank == 0:
        try:
            check_output_dir(out, overwrite)
            fresh_partial_dir(out)
        except CheckpointError as exc:
            error = str(exc)
    error = _gather(error, state)[0]  # every rank learns of a refusal before anyone writes
    if error:
        raise CheckpointError(error)
    tmp = partial_dir(out)

    local = named_tensors(model)
    files = {}
    if state.dp_rank == 0:
        mine = [(n, trim(t, s)) for n, t, s in local if s is not None or state.tp_rank == 0]
        path = tmp / rank_file(state.tp_rank, state.tp_size)
        with SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in mine]) as w:
            for n, t in mine:
                w.write(n, t)
            files[path.name] = {"sha256": w.close(), "bytes": path.stat().st_size}
    if optimizer is not None:
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(state.device),
            },
            tmp / train_file(state.rank, state.world_size),
        )
    specs = {n: s for n, _, s in local}
    everyone = _gather((files, specs if state.dp_rank == 0 else None), state)
    if state.rank == 0:
        all_files = {k: v for f, _ in everyone for k, v in f.items()}
        rank_specs = [s for _, s in everyone if s is not None][: state.tp_size]
        tensors = {
            name: tensor_entry(global_shape(t, spec), t.dtype, [rs[name] for rs in rank_specs])
            for name, t, spec in local
        }
        training = None
        if optimizer is not None or extra is not None:
            training = {
                "world_size": state.world_size,
                "tp_size": state.tp_size,
                "has_optimizer": optimizer is not None,
                "extra": extra or {},
            }
        plan = conv.plan
        layout = conv.expert_layout or {"kind": "per_expert", "names": list(plan.expert_key_names)}
        manifest = build_manifest(
            model.config,
            plan.name,
            state.tp_size,
            tensors,
            all_files,
            layout,
            training,
            key_aliases=plan.checkpoint_aliases,
        )
        write_json(tmp / MANIFEST, manifest)
        publish(tmp, out)
    _barrier(state)
    if state.rank == 0:
        logger.info("saved %s (tp=%d, %d tensors)", out, state.tp_size, len(local))
    return out


def load_training_state(path: str | Path, state: ParallelState, *, optimizer=None, scheduler=None) -> dict:
    """Restore optimizer, scheduler and RNG saved beside the weights; returns the manifest's ``extra``."""
    ckpt = ShardedSource(path)
    training = ckpt.manifest.get("training") or {}
    if optimizer is not None or scheduler is not None:
        if not training.get("has_optimizer"):
            raise CheckpointError(f"{ckpt.path}: saved without optimizer state; resume from a training checkpoint")
        if (training["world_size"], training["tp_size"]) != (state.world_size, state.tp_size):
            raise CheckpointError(
                f"{ckpt.path}: optimizer state was saved with world={training['world_size']}, "
                f"tp={training['tp_size']}; resume with the same layout (now world={state.world_size}, "
                f"tp={state.tp_size}) or load weights only"
            )
        saved = torch.load(
            ckpt.path / train_file(state.rank, state.world_size), map_location=state.device, weights_only=False
        )
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], state.device)
    return training.get("extra") or {}
