"""LoRA on a converted model, in PEFT's format, each adapter sharded like the layer it wraps.

A target is a weight PEFT would adapt on the unconverted model: a linear named by ``target_modules``, a linear's
``weight`` or the fused routed experts' ``gate_up_proj``/``down_proj`` named by ``target_parameters``. Its
adapter adds ``scaling * B @ A`` to the weight, computed at the layer's own point so the TP algebra holds:

- column-parallel (W rows split): A whole, B rows split; A's gradient summed over the tp group (each rank's B
  rows see only their share of it).
- row-parallel (W columns split): A columns split, B whole; the adapter's output joins the layer's partial sum
  before its one all-reduce, so B's input is partial and B's gradient is summed over the group.
- replicated (plain, head-select and replicated linears): A and B whole, added before the layer's gradient fix.
- routed experts: A ``[E_local, r, in]`` and B ``[E_local, out, r]``, this rank's experts, run through the
  dispatcher's grouped matmul (two more grouped GEMMs of rank r, no loop over experts).

Shapes: r rank, E experts (global), E_local this rank's, in/out a weight's full input/output features.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn

from npu_parallel.moe.experts import ExpertMatmul, LocalExperts
from npu_parallel.parallel.collectives import reduce_grad
from npu_parallel.parallel.linear import (
    ColumnParallelLinear,
    HeadSelectLinear,
    ReplicatedLinear,
    RowParallelLinear,
    with_adapter,
)
from npu_parallel.parallel.shard_spec import ShardedModule, ShardSpec, mark, spec_of
from npu_parallel.parallel.state import Group

ADAPTER = "default"  # PEFT's adapter name; its saved keys carry none
# read(which, dim, start, stop): rows/columns [start, stop) along dim of the full PEFT tensor "lora_A"/"lora_B"
Read = Callable[[str, int, int, int], torch.Tensor]

_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "lora_bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
}


class LoraError(ValueError):
    """A LoRA config or adapter this model cannot take; the message names the value and the fix."""


@dataclass
class LoraTarget:
    """One adapted weight: where it is, how it is split, and its PEFT key prefix."""

    path: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    param: str | None  # the parameter targeted by target_parameters; None for a target_modules linear
    depth: int  # PEFT nests ParamWrappers on one module: the key carries ".base_layer" this many times
    module: nn.Module
    kind: str  # column | row | replicated | experts
    r: int
    scaling: float
    in_features: int  # full, PEFT's orientation
    out_features: int
    num_experts: int  # 1 for a linear
    spec: ShardSpec | None  # the base weight's (experts: along the expert dim)

    @property
    def key(self) -> str:
        """The PEFT key prefix of this target, e.g. ``base_model.model.model.layers.0.mlp.experts.base_layer``."""
        return "base_model.model." + self.path + ".base_layer" * self.depth

    @property
    def name(self) -> str:
        return self.path if self.param is None else f"{self.path}.{self.param}"


class LinearLora(ShardedModule):
    """A linear layer's adapter: ``lora_A [r, in_local]``, ``lora_B [out_local, r]``; returns the output delta."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter, scaling: float, dropout: float, kind: str, tp: Group):
        super().__init__()
        self.lora_A, self.lora_B, self.scaling, self.kind, self.tp = a, b, scaling, kind, tp
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a: torch.Tensor = self.lora_A
        b: torch.Tensor = self.lora_B
        if self.kind == "column":  # A whole, fed by every rank's share of the output gradient
            a = reduce_grad(a, self.tp)
        elif self.kind == "row":  # B whole, its input a partial sum
            b = reduce_grad(b, self.tp)
        x = self.dropout(x.to(a.dtype))  # [..., in_local]
        return (x @ a.t()) @ b.t() * self.scaling  # [..., out_local]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` for this rank's slice of the weight, ``[out_local, in_local]``."""
        return self.lora_B @ self.lora_A * self.scaling

    def extra_repr(self) -> str:
        return f"{self.kind}, r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class ExpertLora(ShardedModule):
    """A fused expert weight's adapter: ``lora_A [E_local, r, in]``, ``lora_B [E_local, out, r]``."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter, scaling: float):
        super().__init__()
        self.lora_A, self.lora_B, self.scaling = a, b, scaling

    def forward(self, rows: torch.Tensor, matmul: ExpertMatmul) -> torch.Tensor:
        """The delta of each expert's rows: two grouped matmuls of rank r, in the rows' dtype (as PEFT)."""
        a, b = self.lora_A.to(rows.dtype), self.lora_B.to(rows.dtype)
        return matmul(matmul(rows, a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B_e @ A_e`` per local expert, ``[E_local, out, in]`` (the fused weight's layout)."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"experts={self.lora_A.shape[0]}, r={self.lora_A.shape[1]}, scaling={self.scaling:g}"


def _add_adapter_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a plain (replicated) ``nn.Linear`` with an adapter."""
    return with_adapter(module, args[0], output)


# -- which weights a LoraConfig adapts on this converted model -------------------------------------------------


def prepare_config(config: Any, model: nn.Module) -> Any:
    """A copy of ``config`` as PEFT would use it on this model (transformers 5 MoE target renames included)."""
    for attr, what in _UNSUPPORTED.items():
        if getattr(config, attr, None):
            raise LoraError(f"LoraConfig({attr}={getattr(config, attr)!r}): {what} is not supported; leave it unset")
    init = config.init_lora_weights
    if init not in (True, False, "gaussian"):
        raise LoraError(f"LoraConfig(init_lora_weights={init!r}) is not supported; use True, 'gaussian' or False")
    if isinstance(config.target_modules, str):
        raise LoraError(
            f"LoraConfig(target_modules={config.target_modules!r}): give a list of module names "
            "(e.g. ['q_proj', 'o_proj']) and expert parameters in target_parameters"
        )
    config = copy.deepcopy(config)
    try:  # peft >= 0.18 with transformers 5: MoE target renames; older peft (transformers 4) renames nothing
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        pass
    else:
        convert_peft_config_for_transformers(config, model=model, conversions=None)
    if not config.target_modules and not config.target_parameters:
        raise LoraError("LoraConfig has no target_modules and no target_parameters; name the weights to adapt")
    return config


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    if isinstance(module, (ReplicatedLinear, HeadSelectLinear, nn.Linear)):
        return "replicated"
    return None


def _rank_alpha(config: Any, key: str) -> tuple[int, float]:
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def _linear_target(config, path, module, kind, param, depth) -> LoraTarget:
    weight = module.weight
    spec = spec_of(weight)
    out_f, in_f = weight.shape
    if kind == "column" and spec is not None:
        out_f = spec.full
    if kind == "row" and spec is not None:
        in_f = spec.full
    r, scaling = _rank_alpha(config, path if param is None else f"{path}.{param}")
    return LoraTarget(path, param, depth, module, kind, r, scaling, in_f, out_f, 1, spec)


def find_targets(model: nn.Module, config: Any) -> list[LoraTarget]:
    """Every weight ``config`` (prepared) adapts, in the order PEFT creates them (modules, then parameters)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets: list[LoraTarget] = []
    for path, module in model.named_modules():
        if not path or not config.target_modules or not check_target_module_exists(config, path):
            continue
        kind = _kind(module)
        if kind is None:
            raise LoraError(
                f"target_modules matches {path} ({type(module).__name__}): only linear layers take LoRA here "
                "(embedding, LM head and router are not supported); narrow target_modules"
            )
        targets.append(_linear_target(config, path, module, kind, None, 0))
    names = set(config.target_parameters or ())
    for path, module in model.named_modules():
        hits = [p for p, _ in module.named_parameters(recurse=False) if _param_matches(f"{path}.{p}", names)]
        for i, param in enumerate(hits):
            depth = len(hits) - 1 - i  # the last parameter's wrapper is the outermost
            targets.append(_param_target(config, path, module, param, depth))
    if config.lora_dropout and any(t.param is not None for t in targets):
        raise LoraError(
            f"lora_dropout={config.lora_dropout}: PEFT applies no dropout to target_parameters (expert weights); "
            "set lora_dropout=0 or target only modules"
        )
    if not targets:
        raise LoraError(
            f"target_modules={sorted(config.target_modules or [])} and target_parameters="
            f"{sorted(names)} match no weight of {type(model).__name__}"
        )
    return targets


def _param_matches(key: str, names: set[str]) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _param_target(config, path: str, module: nn.Module, param: str, depth: int) -> LoraTarget:
    if isinstance(module, LocalExperts) and param in ("gate_up_proj", "down_proj"):
        weight = getattr(module, param)  # [E_local, out, in]
        r, scaling = _rank_alpha(config, f"{path}.{param}")
        spec = ShardSpec(0, module.expert_start, module.expert_start + module.num_local, module.num_experts,
                         module.num_local)  # fmt: skip
        return LoraTarget(path, param, depth, module, "experts", r, scaling, weight.shape[2], weight.shape[1],
                          module.num_experts, spec)  # fmt: skip
    kind = _kind(module)
    if kind is None or param != "weight":
        raise LoraError(
            f"target_parameters matches {path}.{param} ({type(module).__name__}): only the routed experts' "
            "gate_up_proj/down_proj and linear weights take LoRA here; narrow target_parameters"
        )
    return _linear_target(config, path, module, kind, param, depth)


# -- building the adapters ----------------------------------------------------------------------------------


def peft_init(target: LoraTarget, init: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full ``(A [r*E, in], B [out, r*E])`` initialised by PEFT's own code, drawing from the global CPU generator
    in PEFT's order (each nn.Linear's own init, then PEFT's reset), so one seed gives one adapter at any tp."""
    from peft.tuners.lora.layer import LoraLayer

    rows = target.r * target.num_experts
    a = nn.Linear(target.in_features, rows, bias=False)
    b = nn.Linear(rows, target.out_features, bias=False)
    layer = SimpleNamespace(
        lora_A={ADAPTER: a},
        lora_B={ADAPTER: b},
        r={ADAPTER: target.r},
        lora_bias={ADAPTER: False},
        lora_embedding_A={},
        get_base_layer=nn.Module,
    )
    LoraLayer.reset_lora_parameters(layer, ADAPTER, init)  # type: ignore[arg-type]
    return a.weight.data, b.weight.data


def memory_reader(a: torch.Tensor, b: torch.Tensor) -> Read:
    """A Read over full in-memory PEFT tensors."""
    full = {"lora_A": a, "lora_B": b}
    return lambda which, dim, start, stop: full[which].narrow(dim, start, stop - start)


def _param(t: torch.Tensor, device, spec: ShardSpec | None) -> nn.Parameter:
    return mark(nn.Parameter(t.to(device=device, dtype=torch.float32).contiguous()), spec)


def attach(target: LoraTarget, read: Read, dropout: float, tp: Group) -> nn.Module:
    """Read this rank's slices of the target's A and B and attach them to its module; returns the adapter."""
    r, device = target.r, target.module.weight.device if target.kind != "experts" else target.module.gate_up_proj.device
    spec = target.spec
    if target.kind == "experts":
        assert spec is not None
        e, start, stop = target.num_experts, spec.start, spec.stop
        a = read("lora_A", 0, start * r, stop * r).reshape(stop - start, r, target.in_features)
        # PEFT's B column j*E + e is rank j of expert e
        b = torch.stack([read("lora_B", 1, j * e + start, j * e + stop) for j in range(r)], dim=1)  # [out, r, E_l]
        adapter: nn.Module = ExpertLora(
            _param(a, device, spec), _param(b.permute(2, 0, 1), device, spec), target.scaling
        )
        lora = target.module._modules.get("lora")
        if not isinstance(lora, nn.ModuleDict):
            lora = nn.ModuleDict()
            target.module.add_module("lora", lora)
        lora[str(target.param)] = adapter
        return adapter
    if "lora" in target.module._modules:
        raise LoraError(f"{target.path} is targeted twice (target_modules and target_parameters); name it once")
    whole_a, whole_b = ("lora_A", 0, 0, r), ("lora_B", 0, 0, target.out_features)
    a_spec = b_spec = None
    if target.kind == "column" and spec is not None:
        whole_b, b_spec = (
            ("lora_B", 0, spec.start, spec.stop),
            ShardSpec(0, spec.start, spec.stop, spec.full, spec.length),
        )
    elif target.kind == "row" and spec is not None:
        whole_a, a_spec = (
            ("lora_A", 1, spec.start, spec.stop),
            ShardSpec(1, spec.start, spec.stop, spec.full, spec.length),
        )
    a, b = read(*whole_a), read(*whole_b)
    adapter = LinearLora(_param(a, device, a_spec), _param(b, device, b_spec), target.scaling, dropout, target.kind, tp)
    target.module.add_module("lora", adapter)
    if type(target.module) is nn.Linear:
        target.module.register_forward_hook(_add_adapter_output)
    return adapter


def adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, adapter)`` of every LoRA adapter in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LinearLora, ExpertLora))]


def freeze_base(model: nn.Module) -> None:
    """Only the adapters train."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora." in f".{name}")


def peft_tensors(target: LoraTarget, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full adapter tensors in our layout -> PEFT's keys and layout (experts: A ``[r*E, in]``, B ``[out, r*E]``)."""
    if target.kind == "experts":  # a [E, r, in], b [E, out, r]
        a = a.reshape(-1, a.shape[-1])
        b = b.permute(1, 2, 0).reshape(b.shape[1], -1)
    return {f"{target.key}.lora_A.weight": a.contiguous(), f"{target.key}.lora_B.weight": b.contiguous()}


def adapter_of(target: LoraTarget) -> LinearLora | ExpertLora:
    lora: Any = target.module._modules["lora"]
    return lora[target.param] if target.kind == "experts" else lora


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (this rank's slices) and remove it; the model is plain again."""
    for _, module in list(model.named_modules()):
        lora: Any = module._modules.get("lora")
        if lora is None:
            continue
        if isinstance(lora, nn.ModuleDict):
            for name, adapter in lora.items():
                weight = getattr(module, name)
                weight.add_(cast(ExpertLora, adapter).delta_weight().to(weight.dtype))
        else:
            weight = module.weight
            weight.add_(lora.delta_weight().to(weight.dtype))
            for key, hook in list(module._forward_hooks.items()):
                if hook is _add_adapter_output:
                    del module._forward_hooks[key]
        del module._modules["lora"]
    for p in model.parameters():
        p.requires_grad_(True)
    return model
