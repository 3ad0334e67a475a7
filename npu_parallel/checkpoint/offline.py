"""Offline checkpoint tools (no process group): HF -> tp rank files (``convert``) and back (``merge``).

``convert`` plans each tp rank on a meta model and streams it through the same loop as load_pretrained
into that rank's :class:`SafetensorsWriter`; ``merge`` writes HF keys back through the same key map the
HF source reads with. Peak memory is one tensor slice, never the model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from npu_parallel.checkpoint.hf_source import INDEX_FILE, HFSource
from npu_parallel.checkpoint.manifest import (
    MANIFEST,
    MARKER,
    build_manifest,
    check_output_dir,
    fresh_partial_dir,
    publish,
    rank_file,
    tensor_entry,
    write_json,
)
from npu_parallel.checkpoint.materialize import (
    Item,
    WriteTo,
    empty_model,
    global_shape,
    local_shape,
    materialize,
    plan_tensors,
)
from npu_parallel.checkpoint.safetensors_io import (
    CheckpointError,
    SafetensorsWriter,
    nbytes,
)
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.convert.conversion import apply_plan
from npu_parallel.parallel.shard_spec import ShardSpec
from npu_parallel.parallel.state import Group

logger = logging.getLogger(__name__)
ST_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def rank_items(source: HFSource, tp: int, dtype: torch.dtype | None) -> list[list[Item]]:
    """Per tp rank, the tensors its file holds (split ones; rank 0 also the replicated), shapes checked."""
    out = []
    for r in range(tp):
        model = empty_model(source.config, dtype or torch.get_default_dtype(), meta_buffers=True)
        apply_plan(model, Group.offline(r, tp), device_type="meta", plan=source.plan)
        out.append([i for i in plan_tensors(model, source, dtype) if i.spec is not None or r == 0])
    return out


def convert_checkpoint(
    src: str | Path,
    tp: int,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Stream a Hugging Face checkpoint into ``tp`` rank files in the save_sharded format."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    source = HFSource(src)
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"--tp {tp!r} must be a positive integer")
    per_rank = rank_items(source, tp, dtype)
    check_output_dir(out, overwrite, source=src)

    spec_of_rank = [{i.name: i.spec for i in items} for items in per_rank]
    tensors = {
        i.name: tensor_entry(global_shape(i.tensor, i.spec), i.dtype, [s.get(i.name) for s in spec_of_rank])
        for i in per_rank[0]
    }
    tmp = fresh_partial_dir(out)
    files = {}
    with (
        source,
        tqdm(total=sum(map(len, per_rank)), desc=f"convert tp={tp}", unit="tensor", disable=not progress) as bar,
    ):
        for r, items in enumerate(per_rank):
            entries = [(i.name, i.dtype, local_shape(i.tensor, i.spec)) for i in items]
            with SafetensorsWriter(tmp / rank_file(r, tp), entries, ST_METADATA) as w:
                materialize(items, source, WriteTo(w), bar)
                files[w.path.name] = {"sha256": w.close(), "bytes": w.path.stat().st_size}
    config = source.config
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    write_json(
        tmp / MANIFEST,
        build_manifest(
            config,
            source.plan.name,
            tp,
            tensors,
            files,
            source.expert_layout(),
            key_aliases=source.plan.checkpoint_aliases,
        ),
    )
    publish(tmp, out)
    logger.info(
        "converted %s -> %s: tp=%d, %d tensors, %.1f MB read in %.1f s",
        src,
        out,
        tp,
        len(tensors),
        source.bytes_read / 1e6,
        time.perf_counter() - t0,
    )
    return out


# -- merge ---------------------------------------------------------------------------------------------

Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def _expert_rows(source: ShardedSource, name: str, expert: int, rows: slice) -> torch.Tensor:
    """Rows of expert ``expert``'s matrix in fused tensor ``name``, read from the rank file that holds it."""
    n = source.global_shape(name)[0]  # type: ignore[index]
    return source.read(name, ShardSpec(0, expert, expert + 1, n, 1))[0, rows].contiguous()


def hf_entries(source: ShardedSource) -> Iterator[Entry]:
    """(HF key, dtype, shape, read) for every tensor, in the key layout the original checkpoint used."""
    keys = source.keys
    per_expert = (source.expert_layout() or {}).get("kind") == "per_expert"
    for name, info in source.tensors.items():
        dtype, shape = source.dtype(name), tuple(info["shape"])
        parts = keys.expert_parts(name) if per_expert else None
        if not parts:
            yield keys.to_checkpoint(name), dtype, shape, partial(source.read, name, None)
            continue
        if len(parts) == 1:
            continue  # down_proj: emitted with gate_up_proj, expert by expert
        down = name.rpartition(".")[0] + ".down_proj"
        down_dtype, down_shape = source.dtype(down), tuple(source.tensors[down]["shape"])
        half = shape[1] // 2
        fused, fused_down = keys.to_checkpoint(name), keys.to_checkpoint(down)
        for e in range(shape[0]):
            gate_key, up_key = keys.expert_keys(fused, e)
            yield gate_key, dtype, (half, shape[2]), partial(_expert_rows, source, name, e, slice(0, half))
            yield up_key, dtype, (half, shape[2]), partial(_expert_rows, source, name, e, slice(half, None))
            yield (
                keys.expert_keys(fused_down, e)[0],
                down_dtype,
                down_shape[1:],
                partial(_expert_rows, source, down, e, slice(None)),
            )


def _shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = nbytes(entry[2], entry[1])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def merge_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool = True,
) -> Path:
    """Stream rank files back into a Hugging Face checkpoint that ``from_pretrained`` loads."""
    src, out = Path(src), Path(out)
    source = ShardedSource(src, verify=True)
    check_output_dir(out, overwrite, source=src)
    entries = list(hf_entries(source))
    shards = _shards(entries, max_shard_bytes)
    tmp = fresh_partial_dir(out)
    weight_map, total = {}, 0
    with source, tqdm(total=len(entries), desc="merge", unit="tensor", disable=not progress) as bar:
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with SafetensorsWriter(tmp / fname, [(k, d, s) for k, d, s, _ in shard], ST_METADATA) as w:
                for key, dtype, shape, read in shard:
                    w.write(key, read().to(dtype))
                    weight_map[key] = fname
                    total += nbytes(shape, dtype)
                    bar.update()
                w.close()
    write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = dict(source.manifest["config"])
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_json(
        tmp / MARKER,
        {
            "written_by": "npu-parallel merge",
            "source": str(src.resolve()),
            "source_tp": source.tp,
            "tensors": len(entries),
        },
    )
    publish(tmp, out)
    logger.info("merged %s (tp=%d) -> %s: %d tensors in %d files", src, source.tp, out, len(entries), len(shards))
    return out
