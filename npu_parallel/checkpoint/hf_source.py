"""A Hugging Face checkpoint folder as a TensorSource: config, which file holds each key, slices on demand.

The converted model's names reach the checkpoint's keys through the plan's :class:`KeyMap`: the same name
or its alias, per-expert keys (``mlp.experts.N.gate_proj.weight``, the layout of every published DeepSeek
checkpoint) for our fused ``experts.gate_up_proj``/``experts.down_proj``, and the embedding for a tied
``lm_head``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from npu_parallel.checkpoint.fp8 import (
    DEQUANT_DTYPE,
    FP8_DTYPES,
    SCALE_SUFFIX,
    check_scale,
    dequantize_rows,
    quantization_of,
)
from npu_parallel.checkpoint.keys import KeyMap
from npu_parallel.checkpoint.remote_code import remote_code_failed, use_remote_code
from npu_parallel.checkpoint.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    read_header,
)
from npu_parallel.checkpoint.source import TensorSource
from npu_parallel.parallel.shard_spec import ShardSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TIED_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


def load_config(path: str | Path, trust_remote_code: bool | None = None, **kwargs):
    """The checkpoint's ``config.json`` as a transformers config, or a CheckpointError naming the problem.

    ``trust_remote_code``: whether the checkpoint's own code may run (:mod:`~npu_parallel.checkpoint.remote_code`).
    """
    from transformers import AutoConfig

    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the folder that holds config.json and *.safetensors")
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing; a Hugging Face checkpoint folder needs its config.json")
    try:
        json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg}: unreadable ({exc}); restore the file from the original checkpoint") from None
    remote = use_remote_code(path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=remote, **kwargs)
    except (ImportError, AttributeError) as exc:
        if not remote:
            raise
        raise remote_code_failed(path, exc) from None
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{cfg}: transformers cannot read it ({str(exc).splitlines()[0]})") from None


class HFSource(TensorSource):
    """A (single-file or index-sharded) safetensors checkpoint folder, read lazily."""

    mismatch_hint = "the config.json does not belong to these weights"

    def read_config(self) -> Any:
        return load_config(self.path, self.trust_remote_code)

    def __init__(self, path: str | Path, trust_remote_code: bool | None = None):
        super().__init__(path)
        self.trust_remote_code = trust_remote_code
        self.config  # noqa: B018 (read now: a missing or broken config.json is the first error to report)
        self.quant = quantization_of(self.config, str(self.path / "config.json"))
        self.file_of = self._index()
        self._handles: dict[str, SafetensorsFile] = {}
        self._where: dict[str, tuple[str, str] | None] = {}

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            for name in sorted(set(weight_map.values())):
                if not (self.path / name).is_file():
                    raise CheckpointError(
                        f"{index} names shard {name!r}, which is not in {self.path}; copy the missing file"
                    )
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are read"
            )
        return {k: SINGLE_FILE for k in read_header(single)}

    @cached_property
    def keys(self) -> KeyMap:
        return KeyMap.from_plan(self.plan)

    def handle(self, filename: str) -> SafetensorsFile:
        if filename not in self._handles:
            self._handles[filename] = SafetensorsFile(self.path / filename)
        return self._handles[filename]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def files(self) -> list[str]:
        return sorted(set(self.file_of.values()))

    def names(self) -> list[str]:
        return list(self.file_of)

    def disk_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files())

    def key_info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.handle(self.file_of[key]).info(key)

    def _raw(self, key: str, dim=None, start=0, stop=None, out=None) -> torch.Tensor:
        return self._count(self.handle(self.file_of[key]).read(key, dim, start, stop, out), key)

    def is_fp8(self, key: str) -> bool:
        """Whether ``key`` is a quantized weight (read dequantized, in float32); checks its scale once."""
        dtype, shape = self.key_info(key)
        if dtype not in FP8_DTYPES:
            return False
        where = str(self.path)
        if self.quant is None:
            raise CheckpointError(
                f"{where}: tensor {key} is {dtype} but config.json has no quantization_config, so its scales are "
                f"unknown; add the checkpoint's original quantization_config (fp8 weights are never cast as they are)"
            )
        scale = key + SCALE_SUFFIX
        check_scale(key, shape, self.key_info(scale)[1] if scale in self.file_of else None, self.quant, where)
        return True

    def _read(self, key: str, dim=None, start=0, stop=None, out=None) -> torch.Tensor:
        """Rows of ``key`` as stored, or dequantized (fp8.float() * scale, float32) for an fp8 weight."""
        if not self.is_fp8(key):
            return self._raw(key, dim, start, stop, out)
        assert self.quant is not None  # is_fp8 refuses fp8 without a quantization_config
        data = dequantize_rows(self._raw, key, self.key_info(key)[1], self.quant.block, dim, start, stop)
        return data if out is None else out.copy_(data)

    def first_float_dtype(self) -> torch.dtype | None:
        for k in self.file_of:
            d = self.key_info(k)[0]
            if d.is_floating_point and not k.endswith(SCALE_SUFFIX):
                return DEQUANT_DTYPE if d in FP8_DTYPES else d
        return None

    def expert_layout(self) -> dict | None:
        return self.keys.expert_layout(self.file_of)

    # -- the converted model's names ------------------------------------------------------------------

    def _locate(self, name: str) -> tuple[str, str] | None:
        """How ``name`` is stored: ('same', key), ('experts', fused name in checkpoint terms), ('tied', key)."""
        if name not in self._where:
            self._where[name] = self._find(name)
        return self._where[name]

    def _find(self, name: str) -> tuple[str, str] | None:
        for cand in self.keys.candidates(name):
            if cand in self.file_of:
                return "same", cand
            if self.keys.expert_parts(cand) and self.keys.expert_keys(cand, 0)[0] in self.file_of:
                return "experts", cand
        if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            key = next((k for k in TIED_EMBEDDINGS if k in self.file_of), None)
            if key is not None:
                return "tied", key
        return None

    def _num_experts(self, fused: str) -> int:
        n = 0
        while self.keys.expert_keys(fused, n)[0] in self.file_of:
            n += 1
        return n

    def global_shape(self, name: str) -> tuple[int, ...] | None:
        where = self._locate(name)
        if where is None:
            return None
        kind, key = where
        if kind != "experts":
            return self.key_info(key)[1]
        shapes = [self.key_info(k)[1] for k in self.keys.expert_keys(key, 0)]
        return (self._num_experts(key), sum(s[0] for s in shapes), shapes[0][1])

    def _located(self, name: str) -> tuple[str, str]:
        where = self._locate(name)
        if where is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint; is it from another model?")
        return where

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype; bfloat16 for an fp8 weight (what it is dequantized to unless asked otherwise)."""
        kind, key = self._located(name)
        key = self.keys.expert_keys(key, 0)[0] if kind == "experts" else key
        return DEQUANT_DTYPE if self.is_fp8(key) else self.key_info(key)[0]

    def read(self, name: str, spec: ShardSpec | None) -> torch.Tensor:
        kind, key = self._located(name)
        if kind != "experts":
            return self._read(key) if spec is None else self._read(key, spec.dim, spec.start, spec.stop)
        if spec is not None and spec.dim != 0:
            raise CheckpointError(f"{name}: experts can only be split by whole experts (dim 0), not dim {spec.dim}")
        first, last = (0, self._num_experts(key)) if spec is None else (spec.start, spec.stop)
        shape = self.global_shape(name)
        assert shape is not None  # _located found the experts' keys
        fp8 = self.is_fp8(self.keys.expert_keys(key, 0)[0])
        out = torch.empty((last - first, *shape[1:]), dtype=torch.float32 if fp8 else self.dtype(name))
        for i, e in enumerate(range(first, last)):  # each expert's matrices straight into their rows of out
            row = 0
            for part in self.keys.expert_keys(key, e):
                rows = self.key_info(part)[1][0]
                self._read(part, out=out[i, row : row + rows])
                row += rows
        return out
