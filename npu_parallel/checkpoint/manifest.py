"""The sharded checkpoint format: file names, ``manifest.json``, and publishing a finished directory.

Rank ``r`` of ``N`` writes ``rank-0000r-of-0000N.safetensors`` holding, for every split tensor, exactly
its global rows ``[start, stop)`` (no padding), and rank 0 also holds the replicated tensors. With an
optimizer, every rank ``r`` of world ``W`` also writes ``train-rank-0000r-of-0000W.safetensors`` (its
optimizer, scheduler and RNG state: tensors plus a JSON tree, never a pickle). The manifest names every
tensor's global shape, dtype and split, the HF config, the folder the weights came from, and every file's
sha256. Format v1 (before 0.2) kept the training state in pickled ``train-rank-*.pt`` files, unchecksummed:
its weights still load, its training state is never unpickled.

A directory is published by renaming a finished ``.partial`` directory, so a crash never leaves a
checkpoint that looks complete. ``--overwrite`` replaces a folder only when its manifest (or a merged
folder's ``npu_parallel.json``) proves npu-parallel wrote it, and then only the files it lists.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Collection
from pathlib import Path

import torch

from npu_parallel.checkpoint.hf_source import INDEX_FILE
from npu_parallel.checkpoint.safetensors_io import ST_DTYPES, CheckpointError, sha256_file
from npu_parallel.parallel.shard_spec import ShardSpec

logger = logging.getLogger(__name__)

FORMAT = "npu_parallel.sharded"
FORMAT_VERSION = 2  # v2: training state in safetensors + JSON and checksummed, source_path; v1 is still read
MANIFEST = "manifest.json"
MARKER = "npu_parallel.json"  # provenance file a merged HF directory carries, listing every file merge wrote
MERGED_FORMAT = "npu_parallel.merged"
# what `merge` copies beside the weights from the source checkpoint (or --tokenizer DIR)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "*.tiktoken",
)
GENERATION_CONFIG = "generation_config.json"
_SHARDED_NAME = re.compile(r"(train-)?rank-\d{5}-of-\d{5}\.safetensors")
_MERGED_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|config\.json")
_CODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.py")  # a checkpoint's own code (auto_map), copied as it is


def rank_file(rank: int, tp: int) -> str:
    return f"rank-{rank:05d}-of-{tp:05d}.safetensors"


def train_file(rank: int, world: int) -> str:
    return f"train-rank-{rank:05d}-of-{world:05d}.safetensors"


def legacy_train_file(rank: int, world: int) -> str:
    """Format v1's pickled training state: never loaded, only named in the refusal and replaced by --overwrite."""
    return f"train-rank-{rank:05d}-of-{world:05d}.pt"


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_FILES)


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
    source_path: str | None = None,
    ep: int | None = None,
    remote_code: list[str] | None = None,
) -> dict:
    """The manifest.json object; field order and names are the on-disk format.

    The config loses any ``quantization_config``: rank files always hold dequantized weights. ``remote_code``:
    the checkpoint's own ``*.py`` files copied beside the rank files (listed in ``files`` with their sha256 too).
    """
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": (cfg.get("architectures") or [type(config).__name__])[0],
        "model_type": cfg.get("model_type"),
        "plan": plan_name,
        "tp_size": tp,
        # rank files: one per ep rank (ep >= tp); tp-split tensors in the first tp files, experts in all of them
        "ep_size": ep or tp,
        "expert_layout": expert_layout,
        "key_aliases": [list(a) for a in key_aliases],
        "config": cfg,
        "tensors": tensors,
        "files": files,
        "training": training,
        "source_path": source_path,  # the Hugging Face folder the weights came from (merge copies its tokenizer)
        # the model's own code (auto_map): what load_sharded runs with trust_remote_code and merge writes out
        "remote_code": {"auto_map": cfg.get("auto_map"), "files": sorted(remote_code)} if remote_code else None,
    }


def copy_code(folder: Path, names: Collection[str], tmp: Path) -> dict:
    """Copy the checkpoint's own code files from ``folder`` into ``tmp``: their ``files`` entries (sha256, bytes)."""
    out = {}
    for name in names:
        shutil.copyfile(folder / name, tmp / name)
        out[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    return out


def write_json(path: Path, obj) -> None:
    """Write ``obj`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    tmp.rename(path)


# -- output directories --------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _listed(out: Path, files, allowed) -> tuple[set[str] | None, str]:
    """The names in a manifest's ``files`` if each is a name we write and is there with its recorded size."""
    if not isinstance(files, dict):
        return None, "it lists no files"
    for name, info in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or not allowed(name):
            return None, f"it lists {name!r}, which is not a file npu-parallel writes"
        size = info.get("bytes") if isinstance(info, dict) else None
        path = out / name
        if path.is_symlink() or not path.is_file() or (size is not None and path.stat().st_size != size):
            return None, f"{name}, which it lists, is missing or changed"
    return set(files), ""


def _sharded_owned(out: Path) -> tuple[set[str] | None, str]:
    m = _read_json(out / MANIFEST)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None, f"{MANIFEST} is not an {FORMAT} manifest"
    names, why = _listed(out, m.get("files"), lambda n: bool(_SHARDED_NAME.fullmatch(n) or _CODE_NAME.fullmatch(n)))
    if names is None:
        return None, f"{MANIFEST}: {why}"
    training = m.get("training")
    if m.get("format_version") == 1 and isinstance(training, dict) and isinstance(training.get("world_size"), int):
        legacy = re.compile(rf"train-rank-\d{{5}}-of-{training['world_size']:05d}\.pt")  # v1 did not list them
        names |= {p.name for p in out.iterdir() if legacy.fullmatch(p.name) and p.is_file()}
    return names | {MANIFEST}, ""


def _merged_owned(out: Path) -> tuple[set[str] | None, str]:
    mark = _read_json(out / MARKER)
    if not isinstance(mark, dict) or not (
        mark.get("format") == MERGED_FORMAT or mark.get("written_by") == "npu-parallel merge"
    ):
        return None, f"{MARKER} is not npu-parallel's merge marker"
    files = mark.get("files")
    if files is None:  # written before the marker listed its files: the index names the shards
        index = _read_json(out / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            return None, f"{INDEX_FILE} is missing or unreadable"
        files = dict.fromkeys([*weight_map.values(), INDEX_FILE, "config.json"], None)
    names, why = _listed(
        out,
        files,
        lambda n: bool(
            _MERGED_NAME.fullmatch(n) or _CODE_NAME.fullmatch(n) or n == GENERATION_CONFIG or is_tokenizer_file(n)
        ),
    )
    return (None, f"{MARKER}: {why}") if names is None else (names | {MARKER}, "")


def owned_files(out: Path) -> tuple[set[str] | None, str]:
    """What an earlier npu-parallel run wrote in ``out``, proven by its manifest or merge marker, or (None, why)."""
    found, reasons = set(), []
    for check, marker in ((_sharded_owned, MANIFEST), (_merged_owned, MARKER)):
        if not (out / marker).exists():
            continue
        names, why = check(out)
        if names is None:
            reasons.append(why)
        else:
            found |= names
    if found:
        return found, ""
    return None, "; ".join(reasons) or f"no {MANIFEST} or {MARKER}"


def check_output_dir(
    out: Path, overwrite: bool, source: Path | None = None, writes=(), what: str = "--out"
) -> set[str]:
    """Refuse the source itself, a non-empty directory unless overwrite, and anything we cannot prove we wrote.

    Returns the names an earlier npu-parallel run wrote in ``out`` (what publish replaces); a file of
    someone else's that this run would replace (one of ``writes``) is refused too.
    """
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise CheckpointError(
                f"{out}: is inside the source checkpoint {source}; nothing is written there, choose another {what}"
            )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another {what}")
    if not out.is_dir() or not any(out.iterdir()):
        return set()
    if not overwrite:
        raise CheckpointError(f"{out}: directory exists and is not empty; pass --overwrite or choose another {what}")
    owned, why = owned_files(out)
    if owned is None:
        raise CheckpointError(
            f"{out}: was not written by npu-parallel; refusing to replace it ({why}); choose another {what}"
        )
    clash = sorted(set(writes) & ({p.name for p in out.iterdir()} - owned))
    if clash:
        raise CheckpointError(
            f"{out / clash[0]}: was not written by npu-parallel and this run would replace it; "
            f"move it away or choose another {what}"
        )
    return owned


def _is_input(path: Path, out: Path) -> bool:
    """Neither in ``out`` (or its ``.partial``/``.old-*`` siblings) nor one of the folders above it."""
    path, out = Path(os.path.abspath(path)), Path(os.path.abspath(out))
    ours = any(
        p == out or (p.parent == out.parent and p.name.startswith(f"{out.name}.")) for p in (path, *path.parents)
    )
    return not (ours or path in out.parents)


def write_error(exc: OSError, out: Path, path: Path | str | None = None, what: str = "--out") -> CheckpointError:
    """One line for a failed write: disk full (ENOSPC, EDQUOT, EFBIG), read-only or no permission, or else."""
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc) or type(exc).__name__
    if exc.filename and _is_input(Path(os.fsdecode(exc.filename)), out):
        return CheckpointError(f"{exc.filename}: cannot read ({reason})")
    target = path or exc.filename or out
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CheckpointError(
            f"{out}: disk full writing {target} ({reason}); free space, raise the quota or file-size limit, "
            f"or choose another {what}"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CheckpointError(
            f"{out}: cannot write {target}: read-only or not permitted ({reason}); choose another {what}"
        )
    return CheckpointError(f"{out}: cannot write {target} ({reason}); choose another {what}")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _writes_name(name: str) -> bool:
    """A name npu-parallel writes into a ``.partial`` directory."""
    return bool(
        name in (MANIFEST, MARKER, GENERATION_CONFIG)
        or name.endswith(".tmp")
        or _SHARDED_NAME.fullmatch(name)
        or _MERGED_NAME.fullmatch(name)
        or _CODE_NAME.fullmatch(name)
        or is_tokenizer_file(name)
    )


def remove_partial(out: Path) -> None:
    """Remove ``out``'s ``.partial`` directory if it holds only what npu-parallel writes; else refuse."""
    tmp = partial_dir(out)
    if not (tmp.exists() or tmp.is_symlink()):
        return
    if tmp.is_symlink() or not tmp.is_dir():
        raise CheckpointError(f"{tmp}: is not a directory npu-parallel made; move it away")
    foreign = sorted(p.name for p in tmp.iterdir() if p.is_dir() or not _writes_name(p.name))
    if foreign:
        raise CheckpointError(
            f"{tmp}: holds {foreign[0]}, which npu-parallel does not write; move it away (into {out} if it was "
            f"there before an interrupted --overwrite) and delete {tmp}"
        )
    shutil.rmtree(tmp)


def fresh_partial_dir(out: Path, what: str = "--out") -> Path:
    """An empty ``.partial`` directory beside ``out`` (a crashed earlier attempt's is removed)."""
    tmp = partial_dir(out)
    remove_partial(out)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise write_error(exc, out, tmp, what) from None
    return tmp


def discard_partial(out: Path) -> None:
    """After a failed write: remove the ``.partial`` directory so that it does not fill the disk."""
    try:
        remove_partial(out)
    except (CheckpointError, OSError) as exc:
        logger.warning("could not remove %s: %s", partial_dir(out), exc)


def publish(tmp: Path, out: Path, owned: Collection[str] = (), keep_others: bool = True) -> None:
    """Swap the finished ``tmp`` into ``out``: of the previous ``out``, the ``owned`` files are deleted, the
    others (a user's) move into the new folder, or with ``keep_others=False`` are deleted too."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.time_ns()}")
    out.rename(old)
    if keep_others:
        for p in old.iterdir():
            if p.name not in owned and not (tmp / p.name).exists():
                p.rename(tmp / p.name)
    tmp.rename(out)
    if not keep_others:
        shutil.rmtree(old, ignore_errors=True)
        return
    for name in owned:
        (old / name).unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        logger.warning("%s: kept what could not be moved back into %s: %s", old, out, sorted(os.listdir(old)))
