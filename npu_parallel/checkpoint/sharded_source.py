"""A sharded checkpoint folder (``manifest.json`` + one safetensors file per ep rank) as a TensorSource.

The manifest says, per tensor, its global shape, dtype and which global rows each rank file holds; any
global slice is read from exactly the rank files that overlap it, so resharding reads no foreign rows.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from npu_parallel.checkpoint.keys import KeyMap
from npu_parallel.checkpoint.manifest import FORMAT, FORMAT_VERSION, MANIFEST, rank_file
from npu_parallel.checkpoint.remote_code import RemoteCodeError, code_files, config_from_code, remote_rule
from npu_parallel.checkpoint.safetensors_io import (
    TORCH_DTYPES,
    CheckpointError,
    SafetensorsFile,
    sha256_file,
)
from npu_parallel.checkpoint.source import TensorSource
from npu_parallel.parallel.shard_spec import ShardSpec


class ShardedSource(TensorSource):
    """A checkpoint written by save_sharded or `npu-parallel convert`: its manifest and lazy reads of any slice."""

    mismatch_hint = "the checkpoint is from a different model"

    def __init__(self, path: str | Path, verify: bool = False, trust_remote_code: bool | None = None):
        super().__init__(path)
        self.trust_remote_code = trust_remote_code
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise CheckpointError(
                f"{self.path}: no {MANIFEST}; not a checkpoint written by save_sharded or `npu-parallel convert`"
            )
        try:
            self.manifest = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{mf}: unreadable ({exc})") from None
        if not isinstance(self.manifest, dict):
            raise CheckpointError(f"{mf}: not a checkpoint manifest (a JSON object is expected)")
        version = self.manifest.get("format_version", 0)
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(
                f"{mf}: format {self.manifest.get('format')!r} is not {FORMAT}; not a checkpoint written by "
                f"save_sharded or `npu-parallel convert`"
            )
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{mf}: {FORMAT} v{version} is newer than this npu_parallel reads (v<={FORMAT_VERSION}); "
                f"upgrade npu_parallel"
            )
        tp, tensors = self.manifest.get("tp_size"), self.manifest.get("tensors")
        if not isinstance(tp, int) or tp < 1 or not isinstance(tensors, dict):
            raise CheckpointError(f"{mf}: damaged (no valid tp_size or tensors); restore the checkpoint")
        ep = self.manifest.get("ep_size", tp)  # absent before expert parallelism had its own group: ep = tp
        if not isinstance(ep, int) or ep < tp or ep % tp:
            raise CheckpointError(f"{mf}: damaged (ep_size={ep!r} is not a multiple of tp_size={tp}); restore it")
        self.tp: int = tp
        self.ep: int = ep  # the number of rank files
        self.tensors: dict = tensors
        for f in self.files():
            if not (self.path / f).is_file():
                raise CheckpointError(
                    f"{self.path}: rank file {f} is missing (tp={self.tp}, ep={self.ep} needs all {self.ep})"
                )
        if verify:
            self.verify()
        self._handles: dict[int, SafetensorsFile] = {}

    def verify(self, names: list[str] | None = None) -> None:
        """Compare files (default: every rank file) with their manifest sha256; a file it does not list is refused."""
        files = self.manifest.get("files")
        for name in self.files() if names is None else names:
            info = files.get(name) if isinstance(files, dict) else None
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
                raise CheckpointError(
                    f"{self.path / name}: has no checksum in {MANIFEST}; the manifest is damaged, restore it"
                )
            digest = sha256_file(self.path / name)
            if digest != info["sha256"]:
                raise CheckpointError(
                    f"{self.path / name}: checksum mismatch (manifest {info['sha256'][:12]}..., "
                    f"file {digest[:12]}...); the file is corrupted, restore it"
                )

    def code_files(self) -> list[str]:
        """The checkpoint's own ``*.py`` files (``auto_map`` and what it imports) saved beside the rank files."""
        return list((self.manifest.get("remote_code") or {}).get("files") or [])

    def saved_config(self) -> Any:
        """The saved config's values as attributes, read without transformers (nor the checkpoint's code)."""
        return SimpleNamespace(**self.manifest["config"])

    def read_config(self) -> Any:
        """The saved config; from the checkpoint's own code only by the rule of :mod:`.remote_code`."""
        from transformers import AutoConfig

        cfg = dict(self.manifest["config"])
        if remote_rule(self.path, cfg, self.trust_remote_code):
            names = self.code_files()
            listed = bool(names)
            names = names or code_files(self.path, cfg["auto_map"])  # copied in by hand: not checksummed
            if not names:
                raise RemoteCodeError(
                    f"{self.path}: its config maps to the checkpoint's own code "
                    f"({cfg['auto_map']['AutoModelForCausalLM']}), which was not saved with it (written before "
                    f"sharded checkpoints kept it); copy the model's *.py files from its Hugging Face folder "
                    f"into {self.path}"
                )
            if listed:
                self.verify(names)  # the code that runs is the code that was saved
            return config_from_code(self.path, cfg)
        try:
            return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{self.path / MANIFEST}: its config cannot be read by transformers "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None

    @cached_property
    def keys(self) -> KeyMap:
        """The key mapping this checkpoint's HF source used: how ``merge`` writes HF keys back."""
        return KeyMap.from_manifest(self.manifest)

    def names(self) -> list[str]:
        return list(self.tensors)

    def files(self) -> list[str]:
        return [rank_file(r, self.ep) for r in range(self.ep)]

    def disk_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files())

    def handle(self, rank: int) -> SafetensorsFile:
        if rank not in self._handles:
            self._handles[rank] = SafetensorsFile(self.path / rank_file(rank, self.ep))
        return self._handles[rank]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def global_shape(self, name: str) -> tuple[int, ...] | None:
        info = self.tensors.get(name)
        return None if info is None else tuple(info["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self._info(name)["dtype"]]

    def first_float_dtype(self) -> torch.dtype | None:
        return next((d for info in self.tensors.values() if (d := TORCH_DTYPES[info["dtype"]]).is_floating_point), None)

    def expert_layout(self) -> dict | None:
        return self.manifest.get("expert_layout")

    def _info(self, name: str) -> dict:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this checkpoint")
        return self.tensors[name]

    def _get(self, rank: int, name: str, dim=None, start=0, stop=None) -> torch.Tensor:
        return self._count(self.handle(rank).read(name, dim, start, stop), name)

    def read(self, name: str, spec: ShardSpec | None) -> torch.Tensor:
        split = self._info(name)["split"]
        if split is None:
            return self._get(0, name) if spec is None else self._get(0, name, spec.dim, spec.start, spec.stop)
        sdim, ranges = split["dim"], split["ranges"]
        if spec is None or spec.dim != sdim:
            whole = torch.cat([self._get(r, name) for r in range(len(ranges))], dim=sdim)
            return whole if spec is None else whole.narrow(spec.dim, spec.start, spec.length).clone()
        parts = []
        for r, (s, e) in enumerate(ranges):
            lo, hi = max(spec.start, s), min(spec.stop, e)
            if lo < hi:
                parts.append(self._get(r, name, sdim, lo - s, hi - s))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=sdim)
