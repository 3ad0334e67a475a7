"""LoRA training checkpoints: step folders that hold only the adapters (and their optimizer state).

``save_sharded(..., trainable_only=True)`` writes the adapter slices under their parameter names; the manifest's
training ``extra`` carries the LoraConfig (``lora``) and the base model's folder. From such a folder,
``load_adapter_weights`` continues a run and ``export_lora_checkpoint`` writes a PEFT adapter folder, or, with
``merge=True``, the base model with the adapters folded in (a Hugging Face folder, through ``merge``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.checkpoint.manifest import check_output_dir
from npu_parallel.checkpoint.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, apply_lora, lora_info, save_lora
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.convert.lora import merge_lora
from npu_parallel.parallel.shard_spec import spec_of
from npu_parallel.parallel.state import single_rank_state

logger = logging.getLogger(__name__)

LORA_KEY = "lora"  # in the manifest's training extra: the LoraConfig, as adapter_config.json holds it


def config_dict(config: Any) -> dict:
    """A LoraConfig as JSON values (what PEFT writes to adapter_config.json)."""
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def config_from_dict(values: dict) -> Any:
    from peft import LoraConfig

    return LoraConfig.from_peft_type(**values)


def lora_extra(model: nn.Module) -> dict:
    """What a LoRA model's checkpoint adds to the manifest's extra ({} for full fine-tuning)."""
    info = lora_info(model)
    return {} if info is None else {LORA_KEY: config_dict(info.config)}


def checkpoint_lora(path: str | Path) -> dict | None:
    """The LoraConfig values a step folder was saved with; None for a full checkpoint."""
    training = ShardedSource(path).manifest.get("training") or {}
    value = (training.get("extra") or {}).get(LORA_KEY)
    return value if isinstance(value, dict) else None


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the adapters saved in a LoRA step folder into ``model``'s (this rank's slices, any tp)."""
    with ShardedSource(path, verify=True) as source:
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if source.global_shape(name) is None:
                raise CheckpointError(f"{path}: no adapter tensor {name}; resume with the run's own LoRA settings")
            p.data.copy_(source.read(name, spec_of(p)).to(p.dtype))


def _base_path(path: Path, base: str | None) -> str:
    if base:
        return base
    manifest = ShardedSource(path).manifest
    config = ((manifest.get("training") or {}).get("extra") or {}).get("config") or {}
    found = manifest.get("source_path") or config.get("model_path")
    if not found or not Path(found).is_dir():
        raise CheckpointError(f"{path}: its base model folder ({found}) is not here; pass --base DIR")
    return str(found)


def export_lora_checkpoint(
    src: str | Path, out: str | Path, *, merge: bool = False, base: str | None = None, overwrite: bool = False
) -> Path:
    """A LoRA step folder -> a PEFT adapter folder, or (``merge``) the merged Hugging Face folder. One process."""
    from npu_parallel.checkpoint.offline import merge_checkpoint
    from npu_parallel.checkpoint.save import save_sharded

    src, out = Path(src), Path(out)
    values = checkpoint_lora(src)
    if values is None:
        raise CheckpointError(f"{src}: holds no LoRA adapters (a full checkpoint); merge it without --merge_lora")
    base_path = _base_path(src, base)
    if not merge:
        check_output_dir(out, overwrite, source=src, writes=[CONFIG_FILE, WEIGHTS_FILE])
    state = single_rank_state()
    model = load_pretrained(base_path, state, progress=False)
    apply_lora(model, state, config_from_dict(values))
    load_adapter_weights(model, src)
    if not merge:
        return save_lora(model, out, state)
    merge_lora(model)
    with tempfile.TemporaryDirectory(prefix="npu-parallel-merge-lora-") as tmp:
        folded = save_sharded(model, Path(tmp) / "tp1", state)
        result = merge_checkpoint(folded, out, overwrite=overwrite, progress=False)
    return result
