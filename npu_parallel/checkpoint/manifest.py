"""The sharded checkpoint format: file names, ``manifest.json``, and publishing a finished directory.

Rank ``r`` of ``N`` writes ``rank-0000r-of-0000N.safetensors`` holding, for every split tensor, exactly
its global rows ``[start, stop)`` (no padding), and rank 0 also holds the replicated tensors. The
manifest names every tensor's global shape, dtype and split, the HF config, and each file's sha256.
A directory is published by renaming a finished ``.partial`` directory, so a crash never leaves a
checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from npu_parallel.checkpoint.safetensors_io import ST_DTYPES, CheckpointError
from npu_parallel.parallel.shard_spec import ShardSpec

FORMAT = "npu_parallel.sharded"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MARKER = "npu_parallel.json"  # provenance file a merged HF directory carries


def rank_file(rank: int, tp: int) -> str:
    return f"rank-{rank:05d}-of-{tp:05d}.safetensors"


def train_file(rank: int, world: int) -> str:
    return f"train-rank-{rank:05d}-of-{world:05d}.pt"


def tensor_entry(shape, dtype: torch.dtype, specs: list[ShardSpec | None]) -> dict:
    """Manifest entry from the global shape and every rank's spec (all None when replicated)."""
    entry: dict = {"shape": list(shape), "dtype": ST_DTYPES[dtype], "split": None}
    split = [s for s in specs if s is not None]
    if split:
        entry["split"] = {"dim": split[0].dim, "ranges": [[s.start, s.stop] for s in split]}
    return entry


def build_manifest(
    config,
    plan_name: str,
    tp: int,
    tensors: dict,
    files: dict,
    expert_layout: dict | None,
    training: dict | None = None,
    key_aliases=(),
) -> dict:
    """The manifest.json object; field order and names are the on-disk format."""
    cfg = config.to_dict()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": (cfg.get("architectures") or [type(config).__name__])[0],
        "model_type": cfg.get("model_type"),
        "plan": plan_name,
        "tp_size": tp,
        "expert_layout": expert_layout,
        "key_aliases": [list(a) for a in key_aliases],
        "config": cfg,
        "tensors": tensors,
        "files": files,
        "training": training,
    }


def write_json(path: Path, obj) -> None:
    """Write ``obj`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    tmp.rename(path)


# -- output directories --------------------------------------------------------------------------------


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse a non-empty directory unless overwrite, anything we did not write, and the source itself."""
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise CheckpointError(
                f"{out}: is inside the source checkpoint {source}; nothing is written there, choose another --out"
            )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out}: directory exists and is not empty; pass --overwrite or choose another --out")
        if not ((out / MANIFEST).is_file() or (out / MARKER).is_file()):
            raise CheckpointError(
                f"{out}: was not written by npu-parallel; refusing to replace it, choose another --out"
            )


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def fresh_partial_dir(out: Path) -> Path:
    """An empty ``.partial`` directory beside ``out`` (a crashed earlier attempt's is removed)."""
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished ``tmp`` into ``out`` (the previous ``out``, if any, is removed afterwards)."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.time_ns()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
