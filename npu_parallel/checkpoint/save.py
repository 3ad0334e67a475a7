"""save_sharded() from a live converted model, and the training state (optimizer, scheduler, RNG) beside it.

The training state is written by ``train_state`` as safetensors plus JSON and checksummed in the manifest;
``load_training_state`` verifies it and never unpickles anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.checkpoint.manifest import (
    MANIFEST,
    build_manifest,
    check_output_dir,
    copy_code,
    discard_partial,
    fresh_partial_dir,
    legacy_train_file,
    partial_dir,
    publish,
    rank_file,
    tensor_entry,
    train_file,
    write_error,
    write_json,
)
from npu_parallel.checkpoint.materialize import global_shape, local_shape, tensors_to_load
from npu_parallel.checkpoint.remote_code import model_code
from npu_parallel.checkpoint.safetensors_io import CheckpointError, SafetensorsWriter
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.checkpoint.train_layout import merge_by_name, param_names, same_stage_layout, source_ranks
from npu_parallel.checkpoint.train_layout import saved_layout as layout_of
from npu_parallel.checkpoint.train_state import STATE_FORMAT, read_state, rng_state, set_rng_state, write_state
from npu_parallel.convert.conversion import conversion_info
from npu_parallel.parallel.data_parallel import full_tensor, local_state, shard_state
from npu_parallel.parallel.shard_spec import ShardSpec, spec_of
from npu_parallel.parallel.state import ParallelState

logger = logging.getLogger(__name__)
WHAT = "--save_dir"  # the training loop's flag for where checkpoints go, named in write errors


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, ShardSpec | None]]:
    """Each parameter once (tied weights under their first name) with its spec, and each persistent buffer."""
    return [(name, t, spec_of(t) if is_param else None) for name, _, _, t, is_param in tensors_to_load(model)]


def trim(t: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """The local tensor without vocab padding: exactly the global rows it stands for."""
    return t if spec is None else spec.trim(t)


def writer(state: ParallelState) -> bool:
    """The ranks of the first ep group write the rank files (file = ep rank); the other ep groups hold copies. Under
    pipeline parallelism the first stage's: every rank holds the whole model, its other stages' parameters
    brought up to date from their owners before the save (training/pipeline_run.py), so the files are a pp 1 run's."""
    return state.edp.rank == 0 and state.pp_rank == 0


def holds(spec: ShardSpec | None, state: ParallelState) -> bool:
    """Whether this writer's file holds the tensor: experts in every file, tp shards in the first tp files
    (their ep rank is their tp rank), replicated tensors in file 0."""
    if spec is None:
        return state.ep_rank == 0
    return spec.axis == "ep" or state.ep_rank < state.tp_size


def gathers(spec: ShardSpec | None, state: ParallelState) -> bool:
    """Whether this rank takes part in the gather of a tensor over its data_parallel mesh: the same answer on every
    member of a mesh (dense: a dp group, one tp rank; experts: an edp group) and True wherever a writer
    :func:`holds` it. At ep > tp a dense tensor's dp group spans several ep ranks, writers or not: all gather."""
    if spec is None:
        return state.tp_rank == 0
    return True


def _gather(obj, state: ParallelState) -> list:
    if state.world_size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier(state: ParallelState) -> None:
    if state.world_size > 1 and dist.is_initialized():
        dist.barrier()


def save_sharded(
    model: nn.Module,
    out_dir: str | Path,
    state: ParallelState,
    *,
    optimizer=None,
    scheduler=None,
    extra: dict | None = None,
    overwrite: bool = True,
    trainable_only: bool = False,
) -> Path:
    """Write this model's shards (the ranks of the first ep group) and, with an optimizer, every rank's training state.

    Collective: every rank calls it. ``extra`` (JSON: step, data position...) goes into the manifest. A failed
    write (disk full, read-only) on any rank raises the same one-line CheckpointError on every rank and
    removes the ``.partial`` folder; an earlier checkpoint in ``out_dir`` is left as it was. ``trainable_only``:
    only the parameters that train (LoRA adapters).
    """
    out = Path(out_dir)
    conv = conversion_info(model)
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"save_sharded: extra must be JSON (numbers, strings, lists, dicts): {exc}") from None
    writes = [rank_file(r, state.ep_size) for r in range(state.ep_size)]
    if optimizer is not None:
        writes += [train_file(r, state.world_size) for r in range(state.world_size)]
    error, owned = None, set()
    if state.rank == 0:
        try:
            owned = check_output_dir(out, overwrite, writes=writes, what=WHAT)
            fresh_partial_dir(out, WHAT)
        except CheckpointError as exc:
            error = str(exc)
    error = _gather(error, state)[0]  # every rank learns of a refusal before anyone writes
    if error:
        raise CheckpointError(error)
    tmp = partial_dir(out)

    local = named_tensors(model)
    if trainable_only:  # a LoRA run's checkpoint: the adapters, not the frozen base (checkpoint/lora_checkpoint.py)
        local = [(n, t, s) for n, t, s in local if t.requires_grad]
    files: dict = {}
    current = tmp
    try:
        # under data_parallel each tensor is whole only once gathered over its mesh: every member takes part in
        # each gather (one tensor at a time, the same tensors in the same order), the writer writes what its file
        # holds, and keeps gathering if its write fails
        mine = [(n, t, s) for n, t, s in local if holds(s, state)]
        gathered = ((n, trim(full_tensor(t), s), holds(s, state)) for n, t, s in local if gathers(s, state))
        try:
            if writer(state):
                current = tmp / rank_file(state.ep_rank, state.ep_size)
                with SafetensorsWriter(current, [(n, t.dtype, local_shape(t, s)) for n, t, s in mine]) as w:
                    for n, t, keep in gathered:
                        if keep:
                            w.write(n, t)
                    files[current.name] = {"sha256": w.close(), "bytes": current.stat().st_size}
        finally:
            for _ in gathered:
                pass
        if optimizer is not None:
            current = tmp / train_file(state.rank, state.world_size)
            training_state = {
                "optimizer": local_state(optimizer.state_dict()),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(state.device),
            }
            if (names := param_names(optimizer)) is not None:  # resume at another pp (checkpoint/train_layout.py)
                training_state["param_names"] = names
            files[current.name] = write_state(current, training_state)
    except OSError as exc:
        error = str(write_error(exc, out, current, WHAT))
    except CheckpointError as exc:  # a training state that cannot be saved without pickle
        error = str(exc)
    specs = {n: s for n, _, s in local}
    everyone = _gather((files, specs if writer(state) else None, error), state)
    error = next((e for _, _, e in everyone if e), None)
    if error is None and state.rank == 0:
        try:
            _write_manifest(model, conv, state, tmp, out, local, everyone, optimizer, extra, owned)
        except OSError as exc:
            error = str(write_error(exc, out, tmp / MANIFEST, WHAT))
        except CheckpointError as exc:  # the model's own code cannot be found to keep with it
            error = str(exc)
    error = _gather(error, state)[0]  # also the barrier: nobody returns before the checkpoint is published
    if error:
        if state.rank == 0:
            discard_partial(out)
        raise CheckpointError(error)
    if state.rank == 0:
        logger.info("saved %s (tp=%d, ep=%d, %d tensors)", out, state.tp_size, state.ep_size, len(local))
    return out


def _write_manifest(model, conv, state, tmp, out, local, everyone, optimizer, extra, owned) -> None:
    all_files = {k: v for f, _, _ in everyone for k, v in f.items()}
    rank_specs = [s for _, s, _ in everyone if s is not None]  # the writers', in ep rank order

    def specs(name: str, spec: ShardSpec | None) -> list:
        files = state.ep_size if spec is not None and spec.axis == "ep" else state.tp_size
        return [rs[name] for rs in rank_specs[:files]]

    tensors = {name: tensor_entry(global_shape(t, spec), t.dtype, specs(name, spec)) for name, t, spec in local}
    training = None
    if optimizer is not None or extra is not None:
        training = {
            "world_size": state.world_size,
            "tp_size": state.tp_size,
            "ep_size": state.ep_size,
            "pp_size": state.pp_size,
            "has_optimizer": optimizer is not None,
            "state_format": STATE_FORMAT if optimizer is not None else None,
            "extra": extra or {},
        }
    code = model_code(model, conv.source_path)  # the model's own code (auto_map) travels with its weights
    if code is not None:
        all_files.update(copy_code(*code, tmp))
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
        source_path=conv.source_path,
        ep=state.ep_size,
        remote_code=code[1] if code else None,
    )
    write_json(tmp / MANIFEST, manifest)
    publish(tmp, out, owned)


def load_training_state(path: str | Path, state: ParallelState, *, optimizer=None, scheduler=None) -> dict:
    """Restore optimizer, scheduler and RNG saved beside the weights; returns the manifest's ``extra``.

    Collective when given an optimizer or scheduler: every rank calls it, and a file that fails on one rank
    (missing, checksum mismatch) raises the same CheckpointError on all. Nothing is ever unpickled: a format
    v1 checkpoint (pickled ``train-rank-*.pt``) is refused for resume; its weights still load.
    """
    ckpt = ShardedSource(path)
    training = ckpt.manifest.get("training") or {}
    if optimizer is None and scheduler is None:
        return training.get("extra") or {}
    if not training.get("has_optimizer"):
        raise CheckpointError(f"{ckpt.path}: saved without optimizer state; resume from a training checkpoint")
    saved_layout = layout_of(training)
    if not same_stage_layout(saved_layout, state):
        pp_then = f", pp={saved_layout[3]}" if saved_layout[3] > 1 else ""
        pp_now = f", pp={state.pp_size}" if state.pp_size > 1 else ""
        raise CheckpointError(
            f"{ckpt.path}: optimizer state was saved with world={saved_layout[0]}, tp={saved_layout[1]}, "
            f"ep={saved_layout[2]}{pp_then}; resume with the same layout (now world={state.world_size}, "
            f"tp={state.tp_size}, ep={state.ep_size}{pp_now}) or load weights only; only pp may differ (same "
            f"tp, ep and dp)"
        )
    if training.get("state_format") != STATE_FORMAT:
        raise CheckpointError(
            f"{ckpt.path}: its training state is pickled ({legacy_train_file(0, state.world_size)}..., format "
            f"v{ckpt.manifest.get('format_version')}) and is never loaded, because unpickling can run code; "
            f"resume is not possible: load its weights (load_sharded, or merge it) and start a new run"
        )
    same = saved_layout[0] == state.world_size and saved_layout[3] == state.pp_size
    names = [train_file(r, saved_layout[0]) for r in ([state.rank] if same else source_ranks(saved_layout, state))]
    name = names[0]
    error = None
    try:
        ckpt.verify(names)
        stages = [read_state(ckpt.path / n) for n in names]
        saved = stages[0]
        if optimizer is not None:
            mine = saved["optimizer"] if same else merge_by_name(stages, optimizer)
            optimizer.load_state_dict(shard_state(mine, optimizer))
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], state.device)
    except CheckpointError as exc:
        error = str(exc)
    except OSError as exc:
        error = f"{ckpt.path / name}: unreadable ({exc.strerror or exc}); restore the checkpoint"
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        error = f"{ckpt.path / name}: does not fit this optimizer or scheduler ({str(exc).splitlines()[0]})"
    errors = _gather(error, state)
    error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)
    return training.get("extra") or {}
