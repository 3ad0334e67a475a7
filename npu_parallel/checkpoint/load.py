"""load_pretrained(): build the model on the meta device, apply its plan, read only this rank's slices."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from npu_parallel.convert.conversion import apply_plan
from npu_parallel.parallel.state import ParallelState
from npu_parallel.checkpoint.hf_source import HFCheckpoint
from npu_parallel.convert.plan import plan_for
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.parallel.shard_spec import ShardSpec, mark, pad_to_spec, spec_of

logger = logging.getLogger(__name__)


def global_shape(t: torch.Tensor, spec: ShardSpec | None) -> tuple[int, ...]:
    shape = list(t.shape)
    if spec is not None:
        shape[spec.dim] = spec.full
    return tuple(shape)


def resolve_dtype(dtype, config, first_float: torch.dtype | None) -> torch.dtype:
    """transformers' "auto" rule: the requested dtype, else config.dtype, else the weights' own."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float32' or 'auto'")
        return value
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = getattr(torch, cfg, None)
    return cfg or first_float or torch.get_default_dtype()


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The HF model with parameters on the meta device and real buffers (rotary caches computed as usual)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def tensors_to_load(model: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """(global name, owner module, attribute, tensor, is_param) for each parameter once, plus persistent buffers."""
    seen, out = set(), []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for leaf, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + leaf, module, leaf, p, True))
        for leaf, b in module._buffers.items():
            if b is not None and leaf not in module._non_persistent_buffers_set:
                out.append((prefix + leaf, module, leaf, b, False))
    return out


def _keep_fp32(model: nn.Module, name: str, dtype: torch.dtype) -> bool:
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    return dtype in (torch.float16, torch.bfloat16) and any(k in name for k in strict)


def _rebind(model: nn.Module, old: torch.Tensor, new: torch.Tensor, is_param: bool) -> None:
    """Point every module that holds ``old`` (tied weights) at ``new``."""
    for module in model.modules():
        table = module._parameters if is_param else module._buffers
        for leaf, value in list(table.items()):
            if value is old:
                table[leaf] = new


def load_pretrained(path: str | Path, state: ParallelState, *, dtype=None, moe_impl: str = "auto",
                    capacity_factor: float | None = None, progress: bool = True) -> nn.Module:
    """The converted model, built without ever holding the full weights: each rank reads only its slices.

    Identical, bit for bit, to ``convert_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), state)``.
    """
    start_time = time.perf_counter()
    ckpt = HFCheckpoint(path)
    config = ckpt.config
    plan = plan_for(config)
    ckpt.aliases = plan.checkpoint_aliases
    plan.check_tp(config, state.tp_size, state.world_size)  # before reading a byte
    first_float = next((ckpt.key_info(k)[0] for k in ckpt.file_of if ckpt.key_info(k)[0].is_floating_point), None)
    target = resolve_dtype(dtype, config, first_float)

    model = empty_model(config, target)
    info = apply_plan(model, state.tp, device_type=state.device.type, plan=plan, moe_impl=moe_impl,
                      capacity_factor=capacity_factor, world_size=state.world_size)
    todo = []
    for name, module, leaf, t, is_param in tensors_to_load(model):
        spec = spec_of(t) if is_param else None
        try:
            src_shape = ckpt.global_shape(name)
        except CheckpointError:
            if not is_param:
                continue  # a buffer the checkpoint does not carry keeps its initialised value, as in transformers
            raise
        want = global_shape(t, spec)
        if tuple(src_shape) != want:  # checked for every tensor before any byte is read
            raise CheckpointError(
                f"{ckpt.path}: tensor {name} has shape {list(src_shape)} but the config implies {list(want)}; "
                f"the config.json does not belong to these weights"
            )
        todo.append((name, module, leaf, t, is_param, spec))

    for name, module, leaf, t, is_param, spec in tqdm(todo, desc="loading", unit="tensor",
                                                      disable=None if (progress and state.rank == 0) else True):
        data = pad_to_spec(ckpt.read(name, spec), spec)
        want_dtype = t.dtype if t.is_floating_point() else data.dtype
        if t.is_floating_point() and _keep_fp32(model, name, target):
            want_dtype = torch.float32
        data = data.to(device=state.device, dtype=want_dtype)
        new = mark(nn.Parameter(data, requires_grad=t.requires_grad), spec) if is_param else data
        _rebind(model, t, new, is_param)

    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: no weights for {leftover[:3]}{'...' if len(leftover) > 3 else ''}")
    model.to(state.device)
    seconds = time.perf_counter() - start_time
    ckpt.close()
    info.expert_layout = ckpt.expert_layout()
    info.load_stats = {"bytes_read": ckpt.bytes_read, "seconds": seconds, "keys_read": sorted(ckpt.keys_read)}
    if state.rank == 0 or logger.isEnabledFor(logging.DEBUG):
        logger.info("rank %d: loaded %d tensors, %.1f MB read in %.2f s (%.0f MB/s)", state.rank, len(todo),
                    ckpt.bytes_read / 1e6, seconds, ckpt.bytes_read / 1e6 / max(seconds, 1e-9))
    model.eval()  # as from_pretrained returns it
    return model
