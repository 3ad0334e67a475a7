"""Offline checkpoint tools (no process group): HF -> tp rank files (``convert``) and back (``merge``).

Both stream tensor by tensor through :class:`SafetensorsWriter`, so peak memory is one tensor slice,
never the model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from npu_parallel.convert.conversion import apply_plan
from npu_parallel.parallel.state import Group
from npu_parallel.checkpoint.hf_source import FUSED_EXPERT_PARAMS, HFCheckpoint
from npu_parallel.checkpoint.load import _keep_fp32, global_shape
from npu_parallel.convert.plan import plan_for
from npu_parallel.checkpoint.safetensors_io import CheckpointError, SafetensorsWriter, TORCH_DTYPES
from npu_parallel.checkpoint.sharded import (MANIFEST, MARKER, ShardedCheckpoint, build_manifest, check_output_dir, named_tensors,
                      partial_dir, publish, rank_file, tensor_entry, write_json)

logger = logging.getLogger(__name__)
ST_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def rank_layouts(config, tp: int) -> tuple[object, list[dict]]:
    """Per tp rank: global name -> (spec, local shape, dtype), from the plan applied to a meta model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    layouts, model = [], None
    for r in range(tp):
        with init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(config)
        apply_plan(model, Group.offline(r, tp), device_type="meta")
        layouts.append({n: (s, tuple(t.shape), t.dtype) for n, t, s in named_tensors(model)})
    return model, layouts


def convert_checkpoint(src: str | Path, tp: int, out: str | Path, *, dtype: torch.dtype | None = None,
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Stream a Hugging Face checkpoint into ``tp`` rank files in the save_sharded format."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    ckpt = HFCheckpoint(src)
    config = ckpt.config
    plan = plan_for(config)
    ckpt.aliases = plan.checkpoint_aliases
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"--tp {tp!r} must be a positive integer")
    plan.check_tp(config, tp)
    check_output_dir(out, overwrite, source=src)
    meta_model, layouts = rank_layouts(config, tp)

    params = {n for n, _ in meta_model.named_parameters()}
    names, entries, tensors = [], [[] for _ in range(tp)], {}
    for name, (spec0, shape0, _) in layouts[0].items():
        try:
            src_shape = ckpt.global_shape(name)
        except CheckpointError:
            if name not in params:
                continue  # a persistent buffer the checkpoint does not carry keeps its initial value
            raise
        want = global_shape(torch.empty(shape0, device="meta"), spec0)
        if tuple(src_shape) != want:
            raise CheckpointError(f"{src}: tensor {name} has shape {list(src_shape)} but the config implies {list(want)}; "
                                  f"the config.json does not belong to these weights")
        stored = ckpt.dtype_of(name)
        out_dtype = stored
        if dtype is not None and stored.is_floating_point:
            out_dtype = torch.float32 if _keep_fp32(meta_model, name, dtype) else dtype
        specs = [layouts[r][name][0] for r in range(tp)]
        for r, spec in enumerate(specs):
            if spec is not None or r == 0:
                shape = list(want)
                if spec is not None:
                    shape[spec.dim] = spec.length
                entries[r].append((name, out_dtype, tuple(shape)))
        tensors[name] = tensor_entry(want, out_dtype, specs)
        names.append((name, out_dtype, specs))

    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    writers = [SafetensorsWriter(tmp / rank_file(r, tp), entries[r], ST_METADATA) for r in range(tp)]
    for name, out_dtype, specs in tqdm(names, desc=f"convert tp={tp}", unit="tensor", disable=not progress):
        for r, spec in enumerate(specs):
            if spec is not None or r == 0:
                writers[r].write(name, ckpt.read(name, spec).to(out_dtype))
    for r, w in enumerate(writers):
        files[w.path.name] = {"sha256": w.close(), "bytes": w.path.stat().st_size}
    manifest_config = config
    if dtype is not None:
        manifest_config.dtype = str(dtype).removeprefix("torch.")
    write_json(tmp / MANIFEST, build_manifest(manifest_config, plan.name, tp, tensors, files, ckpt.expert_layout(),
                                              key_aliases=plan.checkpoint_aliases))
    publish(tmp, out)
    logger.info("converted %s -> %s: tp=%d, %d tensors, %.1f MB read in %.1f s", src, out, tp, len(names),
                ckpt.bytes_read / 1e6, time.perf_counter() - t0)
    return out


def _read_whole(sc: ShardedCheckpoint, name: str) -> torch.Tensor:
    return sc.read(name)


def _read_expert(sc: ShardedCheckpoint, name: str, e: int, rows: slice) -> torch.Tensor:
    """Rows of expert ``e``'s matrix in fused tensor ``name`` (gate or up half of gate_up_proj, or all)."""
    return sc.read(name, 0, e, e + 1)[0, rows].contiguous()


def _hf_entries(sc: ShardedCheckpoint):
    """(key, dtype, shape, read) for every tensor of the HF checkpoint, in the original key layout."""
    for key, dtype, shape, read in _entries_in_memory_names(sc):
        for mem, ck in sc.manifest.get("key_aliases") or ():
            key = key.replace(mem, ck, 1)
        yield key, dtype, shape, read


def _entries_in_memory_names(sc: ShardedCheckpoint):
    layout = sc.manifest.get("expert_layout") or {"kind": "fused"}
    per_expert = layout.get("kind") == "per_expert"
    for name, info in sc.tensors.items():
        dtype, shape = TORCH_DTYPES[info["dtype"]], tuple(info["shape"])
        prefix, _, leaf = name.rpartition(".")
        if not (per_expert and leaf in FUSED_EXPERT_PARAMS and prefix.endswith("experts")):
            yield name, dtype, shape, partial(_read_whole, sc, name)
            continue
        if leaf == "down_proj":
            continue  # emitted with gate_up_proj, expert by expert
        gate, up, down = layout["names"]
        down_name = f"{prefix}.down_proj"
        down_info = sc.tensors[down_name]
        half = shape[1] // 2
        for e in range(shape[0]):
            yield f"{prefix}.{e}.{gate}.weight", dtype, (half, shape[2]), partial(_read_expert, sc, name, e, slice(0, half))
            yield f"{prefix}.{e}.{up}.weight", dtype, (half, shape[2]), partial(_read_expert, sc, name, e, slice(half, None))
            yield (f"{prefix}.{e}.{down}.weight", TORCH_DTYPES[down_info["dtype"]], tuple(down_info["shape"][1:]),
                   partial(_read_expert, sc, down_name, e, slice(None)))


def merge_checkpoint(src: str | Path, out: str | Path, *, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                     progress: bool = True) -> Path:
    """Stream rank files back into a Hugging Face checkpoint that ``from_pretrained`` loads."""
    from npu_parallel.checkpoint.safetensors_io import nbytes

    src, out = Path(src), Path(out)
    sc = ShardedCheckpoint(src, verify=True)
    check_output_dir(out, overwrite, source=src)
    entries = list(_hf_entries(sc))
    shards, size = [[]], 0
    for entry in entries:
        n = nbytes(entry[2], entry[1])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    bar = tqdm(total=len(entries), desc="merge", unit="tensor", disable=not progress)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(tmp / fname, [(k, d, s) for k, d, s, _ in shard], ST_METADATA) as w:
            for key, dtype, shape, read in shard:
                w.write(key, read().to(dtype))
                weight_map[key] = fname
                total += nbytes(shape, dtype)
                bar.update()
            w.close()
    bar.close()
    write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = dict(sc.manifest["config"])
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_json(tmp / MARKER, {"written_by": "npu-parallel merge", "source": str(src.resolve()),
                              "source_tp": sc.tp, "tensors": len(entries)})
    publish(tmp, out)
    logger.info("merged %s (tp=%d) -> %s: %d tensors in %d files", src, sc.tp, out, len(entries), len(shards))
    return out
