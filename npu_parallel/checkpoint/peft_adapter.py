"""PEFT adapter folders in and out of a converted model: ``apply_lora`` and ``save_lora``.

A folder is what ``peft.PeftModel.save_pretrained`` writes (``adapter_config.json`` + ``adapter_model.safetensors``,
keys like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so ``PeftModel.from_pretrained``
loads ``save_lora``'s output onto the unconverted model. Loading reads each rank's slices only (safetensors
``get_slice``); saving gathers the slices to rank 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.convert.conversion import conversion_info
from npu_parallel.convert.lora import (
    LoraError,
    LoraTarget,
    Read,
    adapter_of,
    attach,
    find_targets,
    freeze_base,
    memory_reader,
    peft_init,
    peft_tensors,
    prepare_config,
)
from npu_parallel.parallel.shard_spec import spec_of
from npu_parallel.parallel.state import ParallelState

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
INFO_ATTR = "npu_parallel_lora"


@dataclass
class LoraInfo:
    """The LoRA a model carries: the (prepared) LoraConfig and the weights it adapts."""

    config: Any
    targets: list[LoraTarget]


def lora_info(model: nn.Module) -> LoraInfo | None:
    return getattr(model, INFO_ATTR, None)


def _load_config(path: Path) -> Any:
    from peft import LoraConfig

    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LoraError(
            f"{path}: not a PEFT adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "pass the folder peft's save_pretrained or npu_parallel.save_lora wrote"
        )
    config = LoraConfig.from_pretrained(str(path))
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise LoraError(f"{path}: a {config.peft_type} adapter, not LoRA")
    return config


def _file_reader(handle, path: Path, target: LoraTarget) -> Read:
    def read(which: str, dim: int, start: int, stop: int) -> torch.Tensor:
        key = f"{target.key}.{which}.weight"
        if key not in handle.keys():
            raise LoraError(
                f"{path / WEIGHTS_FILE}: no tensor {key} for {target.name}; the adapter was saved for another "
                "model or with other target_modules/target_parameters"
            )
        piece = handle.get_slice(key)
        rows = target.r * target.num_experts
        want = [rows, target.in_features] if which == "lora_A" else [target.out_features, rows]
        if list(piece.get_shape()) != want:
            raise LoraError(f"{path / WEIGHTS_FILE}: {key} has shape {piece.get_shape()}, this model needs {want}")
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        return piece[index]

    return read


def apply_lora(model: nn.Module, state: ParallelState, adapter: Any) -> nn.Module:
    """Add LoRA adapters to a converted model in place and return it; only the adapters stay trainable.

    ``adapter``: a ``peft.LoraConfig`` (new adapters, PEFT's own initialisation from the global generator, so one
    seed gives the same adapters at any tp) or the path of a PEFT adapter folder (each rank reads its slices).
    Raises LoraError (before any collective) for a config or folder this model cannot take.
    """
    if lora_info(model) is not None:
        raise LoraError("the model carries LoRA adapters already; merge_lora it or load the base model again")
    tp = conversion_info(model).tp
    folder = None if hasattr(adapter, "peft_type") else Path(adapter)
    config = prepare_config(_load_config(folder) if folder is not None else adapter, model)
    targets = find_targets(model, config)
    if folder is None:
        for t in targets:
            attach(t, memory_reader(*peft_init(t, config.init_lora_weights)), config.lora_dropout, tp)
    else:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
            for t in targets:
                attach(t, _file_reader(handle, folder, t), config.lora_dropout, tp)
    freeze_base(model)
    setattr(model, INFO_ATTR, LoraInfo(config, targets))
    if state.rank == 0:
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("LoRA: %d weights adapted, %d trainable parameters on rank 0", len(targets), count)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor under FSDP2: this rank's whole tp/ep slice
    return (full() if callable(full) else t).detach().to("cpu", torch.float32)


def _assemble(pieces: list[tuple[torch.Tensor, Any]]) -> torch.Tensor:
    """Slices with their ShardSpecs (None: the whole tensor) -> the whole tensor."""
    tensor, spec = pieces[0]
    if spec is None:
        return tensor
    out = tensor.new_zeros(spec.global_shape(tensor.shape))
    for piece, s in pieces:
        s.place(piece, out)
    return out


def save_lora(model: nn.Module, out_dir: str | Path, state: ParallelState) -> Path:
    """Write the model's adapters as a PEFT adapter folder (collective: every rank calls it; rank 0 writes)."""
    info = lora_info(model)
    if info is None:
        raise LoraError("the model carries no LoRA adapters: call npu_parallel.apply_lora first")
    mine: dict[str, tuple] = {}
    for t in info.targets:
        lora = adapter_of(t)
        a, b = lora.lora_A, lora.lora_B
        mine[t.key] = ((_local(a), spec_of(a)), (_local(b), spec_of(b)))
    everyone: list[Any] = [mine]
    if state.world_size > 1 and dist.is_initialized():
        everyone = [None] * state.world_size
        dist.all_gather_object(everyone, mine)  # every rank: experts may sit on other dp replicas (ep > tp)
    out = Path(out_dir)
    error = None
    if state.rank == 0:
        try:
            _write(out, info, everyone, conversion_info(model).source_path)
        except OSError as exc:
            error = f"{out}: cannot write the adapter ({exc.strerror or exc})"
    if state.world_size > 1 and dist.is_initialized():
        errors = [None] * state.world_size
        dist.all_gather_object(errors, error)
        error = errors[0]
    if error:
        raise LoraError(error)
    return out


def _write(out: Path, info: LoraInfo, everyone: list, source_path: str | None) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for t in info.targets:
        seen: dict[tuple, tuple] = {}
        for rank_pieces in everyone:
            (a, sa), (b, sb) = rank_pieces[t.key]
            key = (sa.start if sa else None, sb.start if sb else None)
            seen.setdefault(key, ((a, sa), (b, sb)))
        a_full = _assemble([p[0] for p in seen.values()])
        b_full = _assemble([p[1] for p in seen.values()])
        tensors.update(peft_tensors(t, a_full, b_full))
    out.mkdir(parents=True, exist_ok=True)
    config = info.config
    if source_path and not config.base_model_name_or_path:
        config.base_model_name_or_path = source_path
    config.save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
