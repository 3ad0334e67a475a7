"""A Hugging Face checkpoint directory read lazily: config, which file holds each tensor, slices on demand.

Maps the converted model's parameter names back to the checkpoint's keys: the same name, per-expert
keys (``mlp.experts.N.gate_proj.weight``, the layout of every published DeepSeek checkpoint) for our
fused ``experts.gate_up_proj``/``experts.down_proj``, and the embedding for a tied ``lm_head``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from npu_parallel.checkpoint.safetensors_io import CheckpointError, SafetensorsFile
from npu_parallel.parallel.shard_spec import ShardSpec

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# (gate, up, down) per-expert module names, in the order checkpoints of each family use them
PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def load_config(path: str | Path, **kwargs):
    """The checkpoint's ``config.json`` as a transformers config, or a CheckpointError naming the problem."""
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
    try:
        return AutoConfig.from_pretrained(str(path), **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{cfg}: transformers cannot read it ({str(exc).splitlines()[0]})") from None


def expert_key_layout(names, expert_prefix: str) -> tuple[str, tuple[str, str, str]] | None:
    """('fused', names) or ('per_expert', (gate, up, down)) for the experts under ``expert_prefix``."""
    if f"{expert_prefix}.gate_up_proj" in names:
        return "fused", FUSED_EXPERT_PARAMS
    for gate, up, down in PER_EXPERT_NAMES:
        if f"{expert_prefix}.0.{gate}.weight" in names:
            return "per_expert", (gate, up, down)
    return None


class HFCheckpoint:
    """Lazy access to a (single-file or sharded) safetensors checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = load_config(self.path)
        self.file_of = self._index()
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.keys_read: set[str] = set()
        self.aliases: tuple[tuple[str, str], ...] = ()  # the plan's (memory, checkpoint) name fragments

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            for name in sorted(set(weight_map.values())):
                if not (self.path / name).is_file():
                    raise CheckpointError(f"{index} names shard {name!r}, which is not in {self.path}; copy the missing file")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are read")
        return {k: SINGLE_FILE for k in SafetensorsFile(single).keys()}

    def handle(self, filename: str) -> SafetensorsFile:
        if filename not in self._handles:
            self._handles[filename] = SafetensorsFile(self.path / filename)
        return self._handles[filename]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def files(self) -> list[str]:
        return sorted(set(self.file_of.values()))

    def disk_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files())

    def key_info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.handle(self.file_of[key]).info(key)

    def _read(self, key: str, dim=None, start=0, stop=None, out=None) -> torch.Tensor:
        t = self.handle(self.file_of[key]).read(key, dim, start, stop, out)
        self.bytes_read += t.numel() * t.element_size()
        self.keys_read.add(key)
        return t

    # -- the converted model's names ------------------------------------------------------------------

    def source_of(self, name: str) -> tuple[str, object]:
        """How global tensor ``name`` is stored: ('same', key), ('experts', (prefix, names, which)), ('tied', key)."""
        candidates = [name] + [name.replace(mem, ck, 1) for mem, ck in self.aliases if mem in name]
        for cand in candidates:
            if cand in self.file_of:
                return "same", cand
            prefix, _, leaf = cand.rpartition(".")
            if leaf in FUSED_EXPERT_PARAMS:
                layout = expert_key_layout(self.file_of, prefix)
                if layout is not None and layout[0] == "per_expert":
                    return "experts", (prefix, layout[1], leaf)
        if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            for key in ("model.embed_tokens.weight", "transformer.wte.weight"):
                if key in self.file_of:
                    return "tied", key
        raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint; is it from another model?")

    def expert_layout(self) -> dict | None:
        """How this checkpoint stores routed experts: {"kind": "fused"} or per-expert with its key names."""
        for name in self.file_of:
            head, sep, _ = name.rpartition(".experts.")
            if sep and ".experts." not in head:
                found = expert_key_layout(self.file_of, head + ".experts")
                if found:
                    kind, names = found
                    return {"kind": kind} if kind == "fused" else {"kind": kind, "names": list(names)}
        return None

    def global_shape(self, name: str) -> tuple[int, ...]:
        kind, src = self.source_of(name)
        if kind != "experts":
            return self.key_info(src)[1]
        prefix, (gate, up, down), leaf = src
        num = self._count_experts(prefix, gate)
        if leaf == "gate_up_proj":
            g, u = self.key_info(f"{prefix}.0.{gate}.weight")[1], self.key_info(f"{prefix}.0.{up}.weight")[1]
            return (num, g[0] + u[0], g[1])
        return (num, *self.key_info(f"{prefix}.0.{down}.weight")[1])

    def dtype_of(self, name: str) -> torch.dtype:
        kind, src = self.source_of(name)
        if kind == "experts":
            prefix, names, _ = src
            return self.key_info(f"{prefix}.0.{names[0]}.weight")[0]
        return self.key_info(src)[0]

    def _count_experts(self, prefix: str, gate: str) -> int:
        n = 0
        while f"{prefix}.{n}.{gate}.weight" in self.file_of:
            n += 1
        return n

    def read(self, name: str, spec: ShardSpec | None) -> torch.Tensor:
        """Global tensor ``name``, or its rows ``[spec.start, spec.stop)`` along ``spec.dim`` (no padding)."""
        kind, src = self.source_of(name)
        if kind != "experts":
            return self._read(src) if spec is None else self._read(src, spec.dim, spec.start, spec.stop)
        prefix, (gate, up, down), leaf = src
        if spec is not None and spec.dim != 0:
            raise CheckpointError(f"{name}: experts can only be split by whole experts (dim 0), not dim {spec.dim}")
        first, last = (0, self._count_experts(prefix, gate)) if spec is None else (spec.start, spec.stop)
        out = torch.empty((last - first, *self.global_shape(name)[1:]), dtype=self.dtype_of(name))
        for i, e in enumerate(range(first, last)):  # each expert's matrices straight into their rows of out
            if leaf == "gate_up_proj":
                rows = self.key_info(f"{prefix}.{e}.{gate}.weight")[1][0]
                self._read(f"{prefix}.{e}.{gate}.weight", out=out[i, :rows])
                self._read(f"{prefix}.{e}.{up}.weight", out=out[i, rows:])
            else:
                self._read(f"{prefix}.{e}.{down}.weight", out=out[i])
        return out
