"""load_pretrained() and load_sharded(): source -> meta model -> plan -> materialize, each rank reading its slices."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel

from npu_parallel.checkpoint.fp8 import is_quantized
from npu_parallel.checkpoint.hf_source import HFSource
from npu_parallel.checkpoint.materialize import (
    CopyInto,
    Item,
    RebindInto,
    empty_model,
    materialize,
    plan_tensors,
    resolve_dtype,
)
from npu_parallel.checkpoint.mtp_keys import check_mtp_complete, check_shared_copies, mtp_count
from npu_parallel.checkpoint.remote_code import load_hf_model
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.checkpoint.source import TensorSource
from npu_parallel.convert.conversion import ConversionInfo, apply_plan, conversion_info
from npu_parallel.convert.options import ConversionOptions, fold_options
from npu_parallel.hf_compat import dtype_kwargs, is_remote_code
from npu_parallel.moe.dispatchers import Dispatcher
from npu_parallel.moe.gate_options import GateOptions
from npu_parallel.parallel.state import ParallelState

logger = logging.getLogger(__name__)


def _build(
    source: TensorSource, state: ParallelState, dtype, options: ConversionOptions
) -> tuple[PreTrainedModel, ConversionInfo, list[Item]]:
    """The converted model on the meta device and what it needs from ``source``; no byte read yet."""
    plan = source.plan
    target = resolve_dtype(dtype, source.config, source.first_float_dtype())
    mtp = mtp_count(source)
    model = empty_model(source.config, target, mtp=mtp)
    info = apply_plan(
        model,
        state.tp,
        device_type=state.device.type,
        plan=plan,
        options=options,
        world_size=state.world_size,
        ep=state.ep,
    )  # checks tp, same on every rank
    check_mtp_complete(model, source, mtp)
    if state.rank == 0:
        check_shared_copies(source, mtp)
    return model, info, plan_tensors(model, source, target)


def _record(info: ConversionInfo, source: TensorSource, state: ParallelState, started: float, count: int) -> None:
    seconds = time.perf_counter() - started
    info.expert_layout = source.expert_layout()
    info.load_stats = {"bytes_read": source.bytes_read, "seconds": seconds, "keys_read": sorted(source.keys_read)}
    if state.rank == 0 or logger.isEnabledFor(logging.DEBUG):
        logger.info(
            "rank %d: loaded %d tensors, %.1f MB read in %.2f s (%.0f MB/s)",
            state.rank,
            count,
            source.bytes_read / 1e6,
            seconds,
            source.bytes_read / 1e6 / max(seconds, 1e-9),
        )


def load_pretrained(
    path: str | Path,
    state: ParallelState,
    *,
    dtype=None,
    moe_impl: str | Dispatcher = "auto",
    capacity_factor: float | None = None,
    progress: bool = True,
    aux_loss_coef: float | None = None,
    trust_remote_code: bool | None = None,
    gate_options: GateOptions | None = None,
    options: ConversionOptions | None = None,
) -> PreTrainedModel:
    """The converted model, built without ever holding the full weights: each rank reads only its slices.

    Identical, bit for bit, to ``convert_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), state)``,
    plus the MTP layers the checkpoint stores (which transformers drops); fp8 weights come dequantized.
    ``moe_impl``, ``capacity_factor``, ``aux_loss_coef``, ``gate_options``, ``options``: as in convert_model.
    ``trust_remote_code=True`` builds the model from the checkpoint's own code (``auto_map``) even where
    transformers has a class for it; a checkpoint whose model type transformers lacks needs it (the rule:
    :mod:`npu_parallel.checkpoint.remote_code`). None: ``NPU_PARALLEL_TRUST_REMOTE_CODE``, else no.
    """
    opts = fold_options(
        options, moe_impl=moe_impl, capacity_factor=capacity_factor, aux_loss_coef=aux_loss_coef,
        gate_options=gate_options,
    )  # fmt: skip
    started = time.perf_counter()
    with HFSource(path, trust_remote_code) as source:
        model, info, items = _build(source, state, dtype, opts)
        with tqdm(
            total=len(items), desc="loading", unit="tensor", disable=None if (progress and state.rank == 0) else True
        ) as bar:
            materialize(items, source, RebindInto(model, state.device, source), bar)
    _record(info, source, state, started, len(items))
    info.source_path = str(Path(path).resolve())
    return model.eval()  # as from_pretrained returns it


def load_unconverted(path: str | Path, dtype, trust_remote_code: bool | None = None, **kwargs: Any) -> PreTrainedModel:
    """The plain Hugging Face model (no plan, no MTP): ``from_pretrained`` (remote code by the rule of
    :mod:`npu_parallel.checkpoint.remote_code`), or for an fp8 checkpoint (which transformers cannot load on a
    device without fp8) every weight read dequantized through HFSource.

    ``kwargs`` go to ``from_pretrained`` / ``from_config`` (e.g. ``experts_implementation``).
    """
    from transformers import AutoModelForCausalLM

    if not is_quantized(path):
        return load_hf_model(path, dtype, trust_remote_code, **kwargs)
    with HFSource(path, trust_remote_code) as source:
        config = copy.deepcopy(source.config)
        del config.quantization_config
        target = resolve_dtype(dtype, config, source.first_float_dtype())
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=is_remote_code(config), **dtype_kwargs(target), **kwargs
        )
        materialize(plan_tensors(model, source, target), source, CopyInto())
    return model.eval()


def load_sharded(
    path: str | Path,
    state: ParallelState,
    *,
    model: PreTrainedModel | None = None,
    moe_impl: str | Dispatcher = "auto",
    dtype=None,
    verify: bool = True,
    aux_loss_coef: float | None = None,
    trust_remote_code: bool | None = None,
    gate_options: GateOptions | None = None,
    capacity_factor: float | None = None,
    options: ConversionOptions | None = None,
) -> PreTrainedModel:
    """Restore a model saved by save_sharded or `npu-parallel convert`, at this tp size (resharded if it differs).

    With ``model``, weights are copied into its parameters in place (an optimizer built on them stays valid); it
    keeps the choices it was converted with (others given are a ValueError). ``moe_impl``, ``capacity_factor``,
    ``aux_loss_coef``, ``gate_options``, ``options``: as in convert_model. ``trust_remote_code``: as in
    load_pretrained, for the model code saved with the checkpoint (its ``auto_map`` files, checksummed in the manifest).
    """
    opts = fold_options(
        options, moe_impl=moe_impl, capacity_factor=capacity_factor, aux_loss_coef=aux_loss_coef,
        gate_options=gate_options,
    )  # fmt: skip
    if model is not None and opts != ConversionOptions() and opts != conversion_info(model).options:
        raise ValueError(
            f"load_sharded(model=...) copies weights into a model converted already, with its own choices: leave "
            f"out {opts} (or pass model=None for a new model built with them)"
        )
    started = time.perf_counter()
    with ShardedSource(path, verify=verify, trust_remote_code=trust_remote_code) as source:
        if model is None:
            model, info, items = _build(source, state, dtype, opts)
            materialize(items, source, RebindInto(model, state.device, source))
            model.eval()
            recorded = source.manifest.get("source_path")
            info.source_path = recorded if isinstance(recorded, str) else None
        else:
            m = source.manifest
            mine = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
            if m["model_type"] != model.config.model_type or m["architecture"] != mine:
                raise CheckpointError(
                    f"{source.path}: checkpoint is {m['architecture']} ({m['model_type']}), "
                    f"the model is {mine} ({model.config.model_type}); load it into a matching model"
                )
            info = conversion_info(model)
            items = plan_tensors(model, source, None)
            materialize(items, source, CopyInto())
    _record(info, source, state, started, len(items))
    return model
