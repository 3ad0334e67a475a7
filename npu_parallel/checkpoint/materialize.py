"""The one loop that fills a model's tensors from a TensorSource: plan, then read -> pad -> cast -> sink.

:func:`plan_tensors` lists what a (usually meta) converted model needs and checks every global shape
against the source before any byte is read; :func:`materialize` then reads each tensor's slice once and
hands it to a sink: :class:`RebindInto` (build the model on a device: load_pretrained, load_sharded),
:class:`CopyInto` (an existing model, in place: load_sharded(model=...)) or :class:`WriteTo` (a rank's
safetensors file: offline convert). Memory held at any time: the model plus one tensor slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from npu_parallel.checkpoint.remote_code import remote_code_failed
from npu_parallel.checkpoint.safetensors_io import CheckpointError, SafetensorsWriter
from npu_parallel.checkpoint.source import TensorSource
from npu_parallel.convert.mtp import add_mtp_layers
from npu_parallel.hf_compat import dtype_kwargs, is_remote_code
from npu_parallel.parallel.data_parallel import copy_full_into
from npu_parallel.parallel.shard_spec import ShardSpec, mark, pad_to_spec, spec_of


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


def global_shape(t: torch.Tensor, spec: ShardSpec | None) -> tuple[int, ...]:
    return tuple(t.shape) if spec is None else spec.global_shape(t.shape)


def local_shape(t: torch.Tensor, spec: ShardSpec | None) -> tuple[int, ...]:
    """The shape of this rank's rows without vocab padding (what a rank file stores)."""
    return tuple(t.shape) if spec is None else tuple(spec.trim(t).shape)


def keep_fp32(model: nn.Module, name: str, dtype: torch.dtype) -> bool:
    """transformers' ``_keep_in_fp32_modules_strict``: these stay fp32 when the model is fp16/bf16."""
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    return dtype in (torch.float16, torch.bfloat16) and any(k in name for k in strict)


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


def empty_model(config, dtype: torch.dtype, *, meta_buffers: bool = False, mtp: int = 0) -> PreTrainedModel:
    """The HF model with parameters on the meta device; buffers real (rotary caches computed as usual) unless
    ``meta_buffers`` (offline planning, where nothing is computed). ``mtp``: MTP layers to append."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    remote = is_remote_code(config)  # a config built from the checkpoint's own code: its model class too
    try:
        with init_empty_weights(include_buffers=meta_buffers):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote, **dtype_kwargs(dtype))
            if mtp:
                add_mtp_layers(model, mtp, dtype)
            return model
    except (ImportError, AttributeError, TypeError) as exc:
        if not remote:
            raise
        raise remote_code_failed(getattr(config, "_name_or_path", "") or "the checkpoint", exc) from None


@dataclass(frozen=True)
class Item:
    """One tensor to fill: its global name, the model's tensor, its shard, and the dtype the sink gets."""

    name: str
    tensor: torch.Tensor
    spec: ShardSpec | None
    is_param: bool
    dtype: torch.dtype


def plan_tensors(model: nn.Module, source: TensorSource, dtype: torch.dtype | None) -> list[Item]:
    """What ``model`` needs from ``source``, every global shape checked before any byte is read.

    A float tensor gets the model's dtype (fp32 for ``_keep_in_fp32_modules_strict`` when ``dtype`` is
    half precision); integer tensors, and every tensor when ``dtype`` is None, keep the stored dtype.
    Buffers the checkpoint lacks keep their initial value, as in transformers.
    """
    items = []
    for name, _, _, t, is_param in tensors_to_load(model):
        spec = spec_of(t) if is_param else None
        stored = source.global_shape(name)
        if stored is None:
            if not is_param:
                continue
            raise CheckpointError(f"{source.path}: tensor {name!r} is not in the checkpoint; is it from another model?")
        want = global_shape(t, spec)
        if tuple(stored) != want:
            raise CheckpointError(
                f"{source.path}: tensor {name} has shape {list(stored)} but the config implies "
                f"{list(want)}; {source.mismatch_hint}"
            )
        target = source.dtype(name)
        if dtype is not None and t.is_floating_point():
            target = torch.float32 if keep_fp32(model, name, dtype) else t.dtype
        items.append(Item(name, t, spec, is_param, target))
    return items


class Sink:
    """Receives each tensor's data, read and cast; ``pads``: whether it wants the vocab padding added."""

    pads = True
    device: torch.device | None = None  # where the data should be (None: where it was read)

    def put(self, item: Item, data: torch.Tensor) -> None:
        raise NotImplementedError

    def done(self) -> None:
        """Called once after the last tensor."""


class RebindInto(Sink):
    """Builds a meta model's tensors on ``device``: every module holding the meta tensor (tied weights) gets it."""

    def __init__(self, model: nn.Module, device: torch.device, source: TensorSource):
        self.model, self.device, self.path = model, device, source.path
        self._holders: dict[int, list[tuple[dict, str]]] = {}
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for leaf, value in table.items():
                    if value is not None:
                        self._holders.setdefault(id(value), []).append((table, leaf))

    def put(self, item: Item, data: torch.Tensor) -> None:
        old = item.tensor
        new = mark(nn.Parameter(data, requires_grad=old.requires_grad), item.spec) if item.is_param else data
        for table, leaf in self._holders.pop(id(old), ()):
            table[leaf] = new

    def done(self) -> None:
        """Refuse parameters nothing filled, then move what the source did not hold (buffers) to the device."""
        leftover = [n for n, p in self.model.named_parameters() if p.is_meta]
        if leftover:
            raise CheckpointError(f"{self.path}: no weights for {leftover[:3]}{'...' if len(leftover) > 3 else ''}")
        self.model.to(self.device)


class CopyInto(Sink):
    """Copies into an existing model's tensors in place, so an optimizer built on them stays valid."""

    def put(self, item: Item, data: torch.Tensor) -> None:
        copy_full_into(item.tensor, data)  # a data_parallel model's parameter takes its own rows


class WriteTo(Sink):
    """Streams each tensor, unpadded, into a rank file whose header already lists them in this order."""

    pads = False

    def __init__(self, writer: SafetensorsWriter):
        self.writer = writer

    def put(self, item: Item, data: torch.Tensor) -> None:
        self.writer.write(item.name, data)


def materialize(items: list[Item], source: TensorSource, sink: Sink, progress=None) -> None:
    """Read each item's slice from ``source`` once, pad it (vocab), cast it, and hand it to ``sink``.

    ``progress``: anything with ``update()`` (a tqdm bar), called after each tensor.
    """
    for item in items:
        data = source.read(item.name, item.spec)
        if sink.pads:
            data = pad_to_spec(data, item.spec)
        data = data.to(device=sink.device or data.device, dtype=item.dtype)
        sink.put(item, data)
        if progress is not None:
            progress.update()
    sink.done()
