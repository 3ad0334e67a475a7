"""The sharded checkpoint format: one safetensors file per tp rank plus ``manifest.json``.

Rank ``r`` of ``N`` writes ``rank-0000r-of-0000N.safetensors`` holding, for every split tensor, exactly
its global rows ``[start, stop)`` (no padding), and rank 0 also holds the replicated tensors. The
manifest names every tensor's global shape, dtype and split, the HF config, and each file's sha256.
A directory is published by renaming a finished ``.partial`` directory, so a crash never leaves a
checkpoint that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.convert.conversion import conversion_info
from npu_parallel.parallel.state import ParallelState
from npu_parallel.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, SafetensorsWriter, TORCH_DTYPES, ST_DTYPES, sha256_file
from npu_parallel.parallel.shard_spec import ShardSpec, mark, pad_to_spec, spec_of

logger = logging.getLogger(__name__)

FORMAT = "npu_parallel.sharded"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def rank_file(rank: int, tp: int) -> str:
    return f"rank-{rank:05d}-of-{tp:05d}.safetensors"


def train_file(rank: int, world: int) -> str:
    return f"train-rank-{rank:05d}-of-{world:05d}.pt"


# -- output directories --------------------------------------------------------------------------------

MARKER = "npu_parallel.json"  # provenance file a merged HF directory carries


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse a non-empty directory unless overwrite, anything we did not write, and the source itself."""
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise CheckpointError(f"{out}: is inside the source checkpoint {source}; nothing is written there, choose another --out")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out}: directory exists and is not empty; pass --overwrite or choose another --out")
        if not ((out / MANIFEST).is_file() or (out / MARKER).is_file()):
            raise CheckpointError(f"{out}: was not written by npu-parallel; refusing to replace it, choose another --out")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished ``tmp`` into ``out`` (the previous ``out``, if any, is removed afterwards)."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.time_ns()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- what a converted model holds ------------------------------------------------------------------------

def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, ShardSpec | None]]:
    """Each parameter once (tied weights under their first name) with its spec, and each persistent buffer."""
    from npu_parallel.checkpoint.load import tensors_to_load

    return [(name, t, spec_of(t) if is_param else None) for name, _, _, t, is_param in tensors_to_load(model)]


def trim(t: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """The local tensor without vocab padding: exactly the global rows it stands for."""
    return t if spec is None or spec.padded == spec.length else t.narrow(spec.dim, 0, spec.length)


def tensor_entry(shape, dtype: torch.dtype, specs: list[ShardSpec | None]) -> dict:
    """Manifest entry from the global shape and every rank's spec (all None when replicated)."""
    entry = {"shape": list(shape), "dtype": ST_DTYPES[dtype], "split": None}
    if specs[0] is not None:
        entry["split"] = {"dim": specs[0].dim, "ranges": [[s.start, s.stop] for s in specs]}
    return entry


def build_manifest(config, plan_name: str, tp: int, tensors: dict, files: dict, expert_layout: dict | None,
                   training: dict | None = None, key_aliases=()) -> dict:
    cfg = config.to_dict()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": (cfg.get("architectures") or [type(config).__name__])[0],
        "model_type": cfg.get("model_type"), "plan": plan_name, "tp_size": tp,
        "expert_layout": expert_layout,
        "key_aliases": [list(a) for a in key_aliases],
        "config": cfg, "tensors": tensors, "files": files, "training": training,
    }


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    tmp.rename(path)


# -- reading ------------------------------------------------------------------------------------------

class ShardedCheckpoint:
    """A sharded checkpoint directory: its manifest and lazy reads of any global slice."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise CheckpointError(f"{self.path}: no {MANIFEST}; not a checkpoint written by save_sharded or `npu-parallel convert`")
        try:
            self.manifest = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{mf}: unreadable ({exc})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{mf}: format {self.manifest.get('format')!r} v{self.manifest.get('format_version')} "
                                  f"is not {FORMAT} v<={FORMAT_VERSION}; upgrade npu_parallel")
        self.tp = self.manifest["tp_size"]
        self.tensors: dict = self.manifest["tensors"]
        for r in range(self.tp):
            f = self.path / rank_file(r, self.tp)
            if not f.is_file():
                raise CheckpointError(f"{self.path}: rank file {f.name} is missing (tp={self.tp} needs all {self.tp})")
        if verify:
            self.verify()
        self._handles: dict[int, object] = {}
        self.bytes_read = 0

    def verify(self) -> None:
        """Compare every rank file with its manifest sha256."""
        for name, info in self.manifest["files"].items():
            digest = sha256_file(self.path / name)
            if digest != info["sha256"]:
                raise CheckpointError(f"{self.path / name}: checksum mismatch (manifest {info['sha256'][:12]}..., "
                                      f"file {digest[:12]}...); the file is corrupted, restore it")

    def config(self):
        from transformers import AutoConfig

        cfg = dict(self.manifest["config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    def handle(self, rank: int) -> SafetensorsFile:
        if rank not in self._handles:
            self._handles[rank] = SafetensorsFile(self.path / rank_file(rank, self.tp))
        return self._handles[rank]

    def _get(self, rank, name, dim=None, start=0, stop=None) -> torch.Tensor:
        t = self.handle(rank).read(name, dim, start, stop)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Global tensor ``name``, or rows ``[start, stop)`` of dim ``dim``, from whichever rank files hold them."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this checkpoint")
        info = self.tensors[name]
        split = info["split"]
        if split is None:
            return self._get(0, name, dim, start, stop)
        sdim, ranges = split["dim"], split["ranges"]
        if dim is None or dim != sdim:
            whole = torch.cat([self._get(r, name) for r in range(len(ranges))], dim=sdim)
            return whole if dim is None else whole.narrow(dim, start, stop - start)
        parts = []
        for r, (s, e) in enumerate(ranges):
            lo, hi = max(start, s), min(stop, e)
            if lo < hi:
                parts.append(self._get(r, name, sdim, lo - s, hi - s))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=sdim)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


# -- save / load from a live model -------------------------------------------------------------------

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


def save_sharded(model: nn.Module, out_dir: str | Path, state: ParallelState, *, optimizer=None, scheduler=None,
                 extra: dict | None = None, overwrite: bool = True) -> Path:
    """Write this model's shards (tp ranks of dp replica 0) and, with an optimizer, every rank's training state.

    Collective: every rank calls it. ``extra`` (JSON: step, data position...) goes into the manifest.
    """
    out = Path(out_dir)
    conv = conversion_info(model)
    error = None
    if state.rank == 0:
        try:
            check_output_dir(out, overwrite)
            tmp = partial_dir(out)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
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
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(state.device)}, tmp / train_file(state.rank, state.world_size))
    specs = {n: s for n, _, s in local}
    everyone = _gather((files, specs if state.dp_rank == 0 else None), state)
    if state.rank == 0:
        all_files = {k: v for f, _ in everyone for k, v in f.items()}
        rank_specs = [s for _, s in everyone if s is not None][: state.tp_size]
        tensors = {}
        for name, t, spec in local:
            shape = list(t.shape)
            if spec is not None:
                shape[spec.dim] = spec.full
            tensors[name] = tensor_entry(shape, t.dtype, [rs[name] for rs in rank_specs])
        training = None
        if optimizer is not None or extra is not None:
            training = {"world_size": state.world_size, "tp_size": state.tp_size, "has_optimizer": optimizer is not None,
                        "extra": extra or {}}
        plan = conv.plan
        layout = conv.expert_layout or {"kind": "per_expert", "names": list(plan.expert_key_names)}
        manifest = build_manifest(model.config, plan.name, state.tp_size, tensors, all_files, layout, training,
                                  key_aliases=plan.checkpoint_aliases)
        write_json(tmp / MANIFEST, manifest)
        publish(tmp, out)
    _barrier(state)
    if state.rank == 0:
        logger.info("saved %s (tp=%d, %d tensors)", out, state.tp_size, len(local))
    return out


def load_sharded(path: str | Path, state: ParallelState, *, model: nn.Module | None = None, moe_impl: str = "auto",
                 dtype=None, verify: bool = True) -> nn.Module:
    """Restore a model saved by save_sharded or `npu-parallel convert`, at this tp size (resharded if it differs).

    With ``model``, weights are copied into its parameters in place (an optimizer built on them stays valid).
    """
    from npu_parallel.convert.conversion import apply_plan
    from npu_parallel.checkpoint.load import _rebind, empty_model, resolve_dtype
    from npu_parallel.convert.plan import plan_for

    ckpt = ShardedCheckpoint(path, verify=verify)
    m = ckpt.manifest
    if model is not None:
        mine = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        if m["model_type"] != model.config.model_type or m["architecture"] != mine:
            raise CheckpointError(f"{ckpt.path}: checkpoint is {m['architecture']} ({m['model_type']}), "
                                  f"the model is {mine} ({model.config.model_type}); load it into a matching model")
    config = ckpt.config()
    plan = plan_for(config)
    plan.check_tp(config, state.tp_size, state.world_size)
    if model is None:
        first = next(iter(ckpt.tensors.values()))
        model = empty_model(config, resolve_dtype(dtype, config, TORCH_DTYPES[first["dtype"]]))
        apply_plan(model, state.tp, device_type=state.device.type, plan=plan, moe_impl=moe_impl,
                   world_size=state.world_size)
        build = True
    else:
        build = False
    for name, t, spec in named_tensors(model):
        if name not in ckpt.tensors:
            if isinstance(t, nn.Parameter):
                raise CheckpointError(f"{ckpt.path}: no tensor {name!r}; the checkpoint is from a different model")
            continue
        want = list(t.shape)
        if spec is not None:
            want[spec.dim] = spec.full
        if ckpt.tensors[name]["shape"] != want:
            raise CheckpointError(f"{ckpt.path}: tensor {name} has shape {ckpt.tensors[name]['shape']}, model expects {want}")
        data = ckpt.read(name) if spec is None else ckpt.read(name, spec.dim, spec.start, spec.stop)
        data = pad_to_spec(data, spec)
        if build:
            data = data.to(device=state.device, dtype=t.dtype if t.is_floating_point() else data.dtype)
            new = mark(nn.Parameter(data, requires_grad=t.requires_grad), spec) if isinstance(t, nn.Parameter) else data
            _rebind(model, t, new, isinstance(t, nn.Parameter))
        else:
            with torch.no_grad():
                t.copy_(data)
    ckpt.close()
    conversion_info(model).expert_layout = m.get("expert_layout")
    if build:
        model.to(state.device).eval()
    return model


def load_training_state(path: str | Path, state: ParallelState, *, optimizer=None, scheduler=None) -> dict:
    """Restore optimizer, scheduler and RNG saved beside the weights; returns the manifest's ``extra``."""
    ckpt = ShardedCheckpoint(path)
    training = ckpt.manifest.get("training") or {}
    if optimizer is not None or scheduler is not None:
        if not training.get("has_optimizer"):
            raise CheckpointError(f"{ckpt.path}: saved without optimizer state; resume from a training checkpoint")
        if (training["world_size"], training["tp_size"]) != (state.world_size, state.tp_size):
            raise CheckpointError(
                f"{ckpt.path}: optimizer state was saved with world={training['world_size']}, tp={training['tp_size']}; "
                f"resume with the same layout (now world={state.world_size}, tp={state.tp_size}) or load weights only"
            )
        saved = torch.load(ckpt.path / train_file(state.rank, state.world_size), map_location=state.device,
                           weights_only=False)
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], state.device)
    return training.get("extra") or {}
