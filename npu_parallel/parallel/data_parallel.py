"""data_parallel(): FSDP2 over the data-parallel ranks with mixed precision, composed with our TP modules.

Each dp group (the ranks holding the same tp shard) becomes a one-dimensional DeviceMesh; torch's
``fully_shard`` splits every parameter along dim 0 over it, per decoder layer and once for the rest of
the model. The TP modules hold plain local-shard parameters and run their own tp collectives, so FSDP2
sees them as ordinary parameters: it all-gathers a layer's shards over dp before its forward and
reduce-scatters the gradients after its backward, dividing by dp: the gradient of the mean loss over the
global batch, averaged once.

Precision (:data:`PRECISIONS`): the sharded parameters the optimizer updates are the *master* weights
(fp32 in ``bf16`` mixed precision, so the optimizer's moments are fp32 too); FSDP2 casts them to the
*compute* dtype when it all-gathers them (bf16), and reduce-scatters and accumulates gradients in the
*reduce* dtype (fp32). ``bf16-pure`` keeps everything in bf16: half the memory of the weights and
moments, but an AdamW update below half a bf16 ulp of its weight is rounded away.

Routed experts at ep > tp are sharded over the edp ranks instead (expert-data parallelism, the ranks holding
the same experts): a module whose parameters are routed experts sets the attribute :data:`EXPERTS_MARKER` (the
MoE layer does; this layer imports nothing above it) and gets its own FSDP2 unit over that mesh. Its gradient
already sums the tokens of its whole ep group (the all-to-all brought them), so over edp it is summed and
divided by dp, not edp: the mean over the global batch, averaged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.parallel import device as _device
from npu_parallel.parallel.shard_spec import mark, spec_of
from npu_parallel.parallel.state import ParallelState

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

EXPERTS_MARKER = "np_routed_experts"  # True on a module whose parameters are routed experts (moe.experts)


@dataclass(frozen=True)
class Precision:
    """The dtypes of one precision mode: ``compute`` (forward/backward), ``master`` (the parameters the
    optimizer updates, and so its moments), ``reduce`` (gradient reduce-scatter and accumulation)."""

    name: str
    compute: torch.dtype
    master: torch.dtype
    reduce: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.compute != self.master


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, torch.float32, torch.float32),
    "bf16": Precision("bf16", torch.bfloat16, torch.float32, torch.float32),
    "bf16-pure": Precision("bf16-pure", torch.bfloat16, torch.bfloat16, torch.bfloat16),
}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "bf16-mixed": "bf16"}
PURE_WARNING = (
    "--precision bf16-pure: parameters, gradients and AdamW moments are bf16 with no fp32 master copy; an update "
    "smaller than half a bf16 ulp of its weight (|update| < |w| / 256, e.g. lr 1e-5 on weights ~0.01) is rounded "
    "away and the loss falls far less than in fp32; --precision bf16 (fp32 master weights) holds 16 bytes "
    "per parameter (8 here, both divided by dp) and learns like fp32"
)
_warned: set[str] = set()


def resolve_precision(name: str | Precision, device_type: str) -> Precision:
    """``auto`` -> bf16 mixed where the device computes in bf16, fp32 elsewhere (CPU); else the named mode."""
    if isinstance(name, Precision):
        return name
    key = ALIASES.get(name, name)
    if key == "auto":
        key = "bf16" if _device.supports_bf16(device_type) else "fp32"
    if key not in PRECISIONS:
        raise ValueError(f"precision {name!r}: must be one of auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds routed experts (it carries :data:`EXPERTS_MARKER`)."""
    return bool(getattr(module, EXPERTS_MARKER, False))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units below the root: each decoder layer of every ``nn.ModuleList`` named ``layers`` (the
    decoder stack of Hugging Face causal LMs). Modules appended past ``config.num_hidden_layers`` (DeepSeek-V3's
    MTP layers) stay in the root unit: the MTP loss calls their submodules outside the layer's own forward."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return [
        layer
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == "layers"
        for layer in list(module)[:count]
    ]


def dp_mesh(state: ParallelState):
    """This rank's dp group as a one-dimensional DeviceMesh on ``state.device``'s type."""
    from torch.distributed.device_mesh import DeviceMesh

    assert state.dp_group is not None
    return DeviceMesh.from_group(state.dp_group, state.device.type, mesh_dim_names=("dp",))


def edp_mesh(state: ParallelState):
    """This rank's edp group (the ranks holding the same experts) as a one-dimensional DeviceMesh."""
    from torch.distributed.device_mesh import DeviceMesh

    assert state.edp_group is not None
    return DeviceMesh.from_group(state.edp_group, state.device.type, mesh_dim_names=("edp",))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def data_parallel(
    model: nn.Module,
    state: ParallelState,
    *,
    precision: str | Precision = "auto",
    units: Callable[[nn.Module], Iterable[nn.Module]] = decoder_layers,
    expert_mesh=None,
    experts: Callable[[nn.Module], bool] = is_experts,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` (converted, on ``state.device``) over the dp ranks with FSDP2; returns it, sharded in place.

    ``precision``: ``auto`` (bf16 mixed on bf16 devices, fp32 on CPU), ``bf16`` (bf16 compute, fp32 master
    weights, fp32 gradient reduction), ``bf16-pure`` (warns once what it loses) or ``fp32``; floating parameters
    are cast to the master dtype first. ``units(model)``: the submodules that get their own FSDP2 unit
    (default: the decoder layers); every module inside them for which ``experts(module)`` holds is sharded over
    ``expert_mesh`` instead (default: the edp mesh when ``state.ep_size > state.tp_size``, else none: at ep = tp
    the experts' dp ranks are the dense ones), its gradient summed over that mesh and divided by dp. Works at
    dp = 1 too (the precision policy, no traffic to speak of).
    Every parameter becomes a DTensor sharded on dim 0 over dp and keeps its tp ShardSpec; use
    :func:`local_tensor` for its local rows and :func:`full_tensor` (a collective over dp) for its whole tp shard.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized() or state.dp_group is None:
        raise ValueError(
            "data_parallel needs the process groups of npu_parallel.init_distributed(); call it first (it works "
            "in a single process too)"
        )
    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} is already sharded by data_parallel; call it once per model")
    mode = resolve_precision(precision, state.device.type)
    if mode.name == "bf16-pure" and mode.name not in _warned:  # the first time in this process, said by rank 0
        _warned.add(mode.name)
        if state.rank == 0:
            logger.warning(PURE_WARNING)
    specs = {name: spec_of(p) for name, p in model.named_parameters()}
    # trainable parameters become the master weights; frozen ones (a LoRA base, a frozen MTP layer) keep the
    # dtype they were loaded in: nothing updates them, so an fp32 copy of them would only cost memory
    for p in {id(p): p for p in model.parameters()}.values():
        if p.is_floating_point() and p.requires_grad and p.dtype != mode.master:
            p.data = p.data.to(mode.master)
    policy = MixedPrecisionPolicy(
        param_dtype=mode.compute if mode.mixed else None,
        reduce_dtype=mode.reduce if mode.reduce != mode.master else None,
    )
    mesh = dp_mesh(state)
    if expert_mesh is None and state.ep_size > state.tp_size:
        expert_mesh = edp_mesh(state)
    common: dict[str, Any] = dict(mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for unit in units(model):
        if expert_mesh is not None:
            for module in unit.modules():
                if experts(module) and any(True for _ in module.parameters()):
                    sharded = fully_shard(module, mesh=expert_mesh, **common)
                    # the ep group's tokens are in each rank's expert gradient already: sum over the mesh, / dp;
                    # a plain sum then a division (a pre-multiplied sum is not on every backend, gloo included).
                    # On a mesh of one rank torch divides once by itself but would divide twice with a forced sum
                    sharded.set_gradient_divide_factor(float(state.dp_size))
                    if expert_mesh.size() > 1:
                        sharded.set_force_sum_reduction_for_comms(True)
        fully_shard(unit, mesh=mesh, **common)
    # the root stays unsharded from its forward to its backward (FSDP2's default for a root): the MTP loss and
    # a loss computed from the hidden states use its embedding and head after the forward has returned
    root = dict(common, reshard_after_forward=None) if reshard_after_forward is True else common
    fully_shard(model, mesh=mesh, **root)
    for name, p in model.named_parameters():  # FSDP2 made new Parameter objects: carry the tp specs over
        mark(p, specs.get(name))
    model.np_precision = mode  # type: ignore[assignment]
    logger.info(
        "data_parallel: FSDP2 over dp=%d%s, %s (compute %s, master %s, gradients reduced in %s)",
        state.dp_size,
        f" (routed experts over edp={expert_mesh.size()})" if expert_mesh is not None else "",
        mode.name,
        mode.compute,
        mode.master,
        mode.reduce,
    )
    return model


def precision_of(model: nn.Module) -> Precision | None:
    """The precision :func:`data_parallel` gave ``model`` (None: not sharded by it)."""
    return getattr(model, "np_precision", None)


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a DTensor (a parameter or gradient sharded by data_parallel); a plain tensor as is."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tp-local tensor of a DTensor (an all-gather over its mesh: every member calls it); a plain
    tensor as is."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value``, this rank's rows of a tensor shaped like ``param`` (a saved optimizer moment), as a DTensor laid
    out like ``param`` (a plain tensor when ``param`` is one, or when ``value`` is not shaped like its rows)."""
    if not is_dtensor(param) or tuple(value.shape) != tuple(local_tensor(param).shape):
        return value
    from torch.distributed.tensor import DTensor

    local = value.to(device=local_tensor(param).device)
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def copy_full_into(param: torch.Tensor, data: torch.Tensor) -> None:
    """Copy ``data`` (the whole tp-local tensor) into ``param``: into its own rows when data_parallel sharded it."""
    with torch.no_grad():
        if not is_dtensor(param):
            param.copy_(data)
            return
        from torch.distributed.tensor import distribute_tensor

        mine = distribute_tensor(data.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(mine.to_local())


def local_state(optimizer_state: dict) -> dict:
    """An optimizer's ``state_dict()`` with every DTensor (the moments of a data_parallel model) as this rank's rows:
    what a per-rank training-state file holds."""
    state = {
        k: {n: local_tensor(v) if isinstance(v, torch.Tensor) else v for n, v in s.items()}
        for k, s in optimizer_state["state"].items()
    }
    return {**optimizer_state, "state": state}


def shard_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Inverse of :func:`local_state` for ``optimizer``: each saved per-rank tensor laid out like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for k, s in saved.get("state", {}).items():
        p = params[k] if isinstance(k, int) and 0 <= k < len(params) else None
        state[k] = {n: shard_like(v, p) if p is not None and isinstance(v, torch.Tensor) else v for n, v in s.items()}
    return {**saved, "state": state}
