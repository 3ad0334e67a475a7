"""Offline checkpoint tools (no process group): HF -> tp rank files (``convert``) and back (``merge``).

``convert`` plans each tp rank on a meta model and streams it through the same loop as load_pretrained
into that rank's :class:`SafetensorsWriter`; ``merge`` writes HF keys back through the same key map the
HF source reads with. Peak memory is one tensor slice, never the model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from npu_parallel.checkpoint.hf_source import INDEX_FILE, HFSource
from npu_parallel.checkpoint.manifest import (
    GENERATION_CONFIG,
    MANIFEST,
    MARKER,
    MERGED_FORMAT,
    TOKENIZER_FILES,
    build_manifest,
    check_output_dir,
    copy_code,
    discard_partial,
    fresh_partial_dir,
    is_tokenizer_file,
    publish,
    rank_file,
    tensor_entry,
    write_error,
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
from npu_parallel.checkpoint.mtp_keys import check_mtp_complete, check_shared_copies, mtp_count, shared_copies
from npu_parallel.checkpoint.remote_code import code_files
from npu_parallel.checkpoint.safetensors_io import (
    CheckpointError,
    SafetensorsWriter,
    nbytes,
)
from npu_parallel.checkpoint.serving_files import write_serving_files
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.convert.conversion import apply_plan
from npu_parallel.parallel.shard_spec import ShardSpec
from npu_parallel.parallel.state import Group

logger = logging.getLogger(__name__)
ST_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def rank_items(source: HFSource, tp: int, dtype: torch.dtype | None, ep: int | None = None) -> list[list[Item]]:
    """Per rank file (one per ep rank), the tensors it holds, shapes checked: the routed experts' slice in every
    file, tp shards in the first tp files, the replicated tensors in file 0 (as save_sharded writes them)."""
    ep = ep or tp
    out = []
    mtp = mtp_count(source)
    for r in range(ep):
        model = empty_model(source.config, dtype or torch.get_default_dtype(), meta_buffers=True, mtp=mtp)
        apply_plan(model, Group.offline(r % tp, tp), device_type="meta", plan=source.plan, ep=Group.offline(r, ep))
        check_mtp_complete(model, source, mtp)
        items = plan_tensors(model, source, dtype)
        out.append([i for i in items if (r == 0 if i.spec is None else i.spec.axis == "ep" or r < tp)])
    check_shared_copies(source, mtp)
    return out


def convert_checkpoint(
    src: str | Path,
    tp: int,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    ep: int | None = None,
) -> Path:
    """Stream a Hugging Face checkpoint into ``ep`` (default: ``tp``) rank files in the save_sharded format."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    source = HFSource(src)
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"--tp {tp!r} must be a positive integer")
    ep = tp if ep is None else ep
    if not isinstance(ep, int) or ep < tp or ep % tp:
        raise CheckpointError(f"--ep {ep!r} must be a multiple of --tp {tp} (an ep group is whole tp groups)")
    try:
        source.plan.check_ep(source.config, ep, tp)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    per_rank = rank_items(source, tp, dtype, ep)
    owned = check_output_dir(out, overwrite, source=src, writes=[rank_file(r, ep) for r in range(ep)])

    spec_of_rank = [{i.name: i.spec for i in items} for items in per_rank]
    tensors = {
        i.name: tensor_entry(global_shape(i.tensor, i.spec), i.dtype, [s.get(i.name) for s in spec_of_rank])
        for items in per_rank
        for i in items
    }
    tmp = fresh_partial_dir(out)
    with _writing(out) as at:
        files = {}
        with (
            source,
            tqdm(total=sum(map(len, per_rank)), desc=f"convert tp={tp}", unit="tensor", disable=not progress) as bar,
        ):
            for r, items in enumerate(per_rank):
                entries = [(i.name, i.dtype, local_shape(i.tensor, i.spec)) for i in items]
                at.path = tmp / rank_file(r, ep)
                with SafetensorsWriter(at.path, entries, ST_METADATA) as w:
                    materialize(items, source, WriteTo(w), bar)
                    files[w.path.name] = {"sha256": w.close(), "bytes": w.path.stat().st_size}
        config = source.config
        if dtype is not None:
            config.dtype = str(dtype).removeprefix("torch.")
        code = code_files(src, getattr(config, "auto_map", None))  # the checkpoint's own code travels with it
        at.path = tmp
        files.update(copy_code(src, code, tmp))
        at.path = tmp / MANIFEST
        write_json(
            at.path,
            build_manifest(
                config,
                source.plan.name,
                tp,
                tensors,
                files,
                source.expert_layout(),
                key_aliases=source.plan.checkpoint_aliases,
                source_path=str(src.resolve()),
                ep=ep,
                remote_code=code,
            ),
        )
        at.path = out
        publish(tmp, out, owned)
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
    copies: dict[str, list[str]] = {}
    for key, main in shared_copies(source.saved_config(), set(source.tensors)):
        copies.setdefault(main, []).append(key)
    for name, info in source.tensors.items():
        dtype, shape = source.dtype(name), tuple(info["shape"])
        parts = keys.expert_parts(name) if per_expert else None
        if not parts:
            yield keys.to_checkpoint(name), dtype, shape, partial(source.read, name, None)
            if name in copies:  # the MTP layers' published copies of the shared embedding and head
                for key in copies[name]:
                    yield key, dtype, shape, partial(source.read, name, None)
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


def merge_dtype(source: ShardedSource, dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype``, else the compute dtype a training run recorded in the manifest (None: keep the stored dtypes)."""
    if dtype is not None:
        return dtype
    precision = ((source.manifest.get("training") or {}).get("extra") or {}).get("precision") or {}
    compute = getattr(torch, str(precision.get("compute")), None)
    return compute if isinstance(compute, torch.dtype) else None


def _keep_fp32(source: ShardedSource) -> tuple[str, ...]:
    import transformers

    cls = getattr(transformers, str(source.manifest.get("architecture")), None)
    return tuple(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())


def _cast(entry: Entry, target: torch.dtype | None, source: ShardedSource) -> Entry:
    """``entry`` written in ``target`` when it is a floating tensor (fp32 kept where the model class asks)."""
    key, dtype, shape, read = entry
    if target is None or not dtype.is_floating_point or dtype == target:
        return entry
    if target in (torch.float16, torch.bfloat16) and any(k in key for k in _keep_fp32(source)):
        return entry
    return key, target, shape, read


def _main_dtype(entries: list[Entry]) -> torch.dtype | None:
    """The floating dtype holding most of the bytes written (None: no floating tensor)."""
    size: dict[torch.dtype, int] = {}
    for _, dtype, shape, _ in entries:
        if dtype.is_floating_point:
            size[dtype] = size.get(dtype, 0) + nbytes(shape, dtype)
    return max(size, key=size.__getitem__) if size else None


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
    tokenizer: str | Path | None = None,
    keep_others: bool = True,
    dtype: torch.dtype | None = None,
    chat_template: str | None = None,
) -> Path:
    """Stream rank files back into a Hugging Face checkpoint that ``from_pretrained`` loads.

    Floating tensors are written in ``dtype``; None: the compute dtype of the training run that saved the
    checkpoint (bf16 for a bf16 mixed-precision run, whose rank files hold the fp32 master weights), else the
    stored dtype. The model class's ``_keep_in_fp32_modules_strict`` tensors stay fp32 under a half dtype.

    The tokenizer files and ``generation_config.json`` come from ``tokenizer`` or else from the source
    folder the manifest names; without either, one warning says so (and ``npu_parallel.json`` records it).
    With ``overwrite``, files a user added to an earlier merged ``out`` stay, unless ``keep_others=False``.
    The folder serves as it is (checkpoint/serving_files.py): ``chat_template`` (a training run's Jinja template)
    becomes the tokenizer's, generation_config.json stops on the template's end of turn and sets a pad id, the
    config has no quantization_config (the weights are dequantized) and names the dtype written.
    """
    src, out = Path(src), Path(out)
    source = ShardedSource(src, verify=True)
    code = source.code_files()
    source.verify(code)
    target = merge_dtype(source, dtype)
    entries = [_cast(e, target, source) for e in hf_entries(source)]
    shards = _shards(entries, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    owned = check_output_dir(out, overwrite, source=src, writes=[*names, INDEX_FILE, "config.json", MARKER, *code])
    theirs = {p.name for p in out.iterdir()} - owned if keep_others and out.is_dir() else set()
    tok = tokenizer_source(source, tokenizer, theirs, out)
    if tok["note"]:
        logger.warning(tok["note"])
    tmp = fresh_partial_dir(out)
    weight_map, total, written = {}, 0, {}
    with _writing(out) as at:
        with source, tqdm(total=len(entries), desc="merge", unit="tensor", disable=not progress) as bar:
            for fname, shard in zip(names, shards, strict=True):
                at.path = tmp / fname
                with SafetensorsWriter(at.path, [(k, d, s) for k, d, s, _ in shard], ST_METADATA) as w:
                    for key, dtype, shape, read in shard:
                        w.write(key, read().to(dtype))
                        weight_map[key] = fname
                        total += nbytes(shape, dtype)
                        bar.update()
                    w.close()
        at.path = tmp / INDEX_FILE
        write_json(at.path, {"metadata": {"total_size": total}, "weight_map": weight_map})
        at.path = tmp / "config.json"
        config = dict(source.manifest["config"])
        config.pop("quantization_config", None)  # the rank files hold dequantized weights: nothing stale to serve by
        written_dtype = target or _main_dtype(entries)  # what from_pretrained(dtype="auto") and vLLM load it as
        if written_dtype is not None:
            config["dtype" if "torch_dtype" not in config else "torch_dtype"] = str(written_dtype).removeprefix(
                "torch."
            )
        at.path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in tok["files"]:
            at.path = tmp / name
            shutil.copyfile(Path(tok["from"]) / name, at.path)
        at.path = tmp
        own_tokenizer = any(is_tokenizer_file(f) for f in tok["files"])
        serving = write_serving_files(
            tmp,
            config,
            template=chat_template,
            tokenizer_from=tmp if own_tokenizer else out if any(is_tokenizer_file(f) for f in tok["kept"]) else None,
            write_generation=GENERATION_CONFIG not in tok["kept"],
        )
        copy_code(src, code, tmp)  # the model's own code beside config.json's auto_map: from_pretrained runs it
        written = {p.name: {"bytes": p.stat().st_size} for p in tmp.iterdir()}
        at.path = tmp / MARKER
        write_json(
            at.path,
            {
                "format": MERGED_FORMAT,
                "written_by": "npu-parallel merge",
                "dtype": str(target).removeprefix("torch.") if target else None,
                "source": str(src.resolve()),
                "source_tp": source.tp,
                "tensors": len(entries),
                "tokenizer": tok,
                "serving": serving,
                "files": written,
            },
        )
        at.path = out
        publish(tmp, out, owned, keep_others)
    logger.info("merged %s (tp=%d) -> %s: %d tensors in %d files", src, source.tp, out, len(entries), len(shards))
    return out


def _tokenizer_files(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if (is_tokenizer_file(p.name) or p.name == GENERATION_CONFIG) and p.is_file()
    )


def _other_model(folder: Path, config: dict) -> str | None:
    """How ``folder``'s config.json differs from the checkpoint's (model type, vocabulary), if it does."""
    try:
        theirs = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("model_type", "vocab_size"):
        if isinstance(theirs, dict) and theirs.get(key) != config.get(key):
            return f"its {key} is {theirs.get(key)!r}, the checkpoint's {config.get(key)!r}"
    return None


def tokenizer_source(source: ShardedSource, tokenizer: str | Path | None, theirs: set[str], out: Path) -> dict:
    """What merge puts beside the weights: ``from`` (a folder), ``files`` to copy from it, ``kept`` (tokenizer
    files a user added to ``out``: never replaced) and ``note`` (one line, logged as a warning when set).

    The folder is ``tokenizer`` (a bad one is a CheckpointError) or the source folder the manifest names
    (missing, or now holding another model: no tokenizer, and the note says so).
    """
    kept = sorted(f for f in theirs if is_tokenizer_file(f) or f == GENERATION_CONFIG)
    folder: Path | None = None
    files: list[str] = []
    why = None
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not folder.is_dir():
            raise CheckpointError(f"--tokenizer {folder}: no such folder; pass the folder holding tokenizer.json")
        files = _tokenizer_files(folder)
        if not any(is_tokenizer_file(f) for f in files):
            raise CheckpointError(
                f"--tokenizer {folder}: holds none of {', '.join(TOKENIZER_FILES)}; pass the folder holding them"
            )
    elif not isinstance(recorded := source.manifest.get("source_path"), str):
        why = f"{source.path}'s manifest names no source folder"
    elif not (folder := Path(recorded)).is_dir():
        why = f"its source folder {folder} is gone"
    elif mismatch := _other_model(folder, source.manifest["config"]):
        why = f"its source folder {folder} now holds another model ({mismatch})"
    elif not any(is_tokenizer_file(f) for f in _tokenizer_files(folder)):
        why = f"its source folder {folder} has no tokenizer files"
    else:
        files = _tokenizer_files(folder)
    if any(is_tokenizer_file(f) for f in kept):  # the user's tokenizer stays whole: none of ours mixed in
        files = [f for f in files if not is_tokenizer_file(f)]
    files = [f for f in files if f not in kept]
    note = None
    if why and not any(is_tokenizer_file(f) for f in kept):
        note = (
            f"no tokenizer: {why}; AutoTokenizer.from_pretrained({out}) fails until you copy the tokenizer "
            f"files in or pass --tokenizer DIR"
        )
        folder, files = None, []
    elif kept:
        note = f"kept {', '.join(kept)} already in {out} (not written by npu-parallel; --clean replaces them)"
    return {"from": str(folder) if folder and files else None, "files": files, "kept": kept, "note": note}


class _At:
    path: Path | None = None


@contextmanager
def _writing(out: Path) -> Iterator[_At]:
    """Around writing ``out``'s ``.partial`` folder: on any failure remove it, and a failed write
    (disk full, read-only) becomes one CheckpointError naming the file (``at.path``)."""
    at = _At()
    try:
        yield at
    except OSError as exc:
        discard_partial(out)
        raise write_error(exc, out, at.path) from None
    except BaseException:
        discard_partial(out)
        raise
