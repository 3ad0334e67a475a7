"""convert_model(): apply an architecture's plan to a loaded model, in place.

The conversion is recorded on the model as one :class:`ConversionInfo` (:func:`conversion_info` reads it):
the plan, this rank's tp group, the MoE implementation, and what loading learnt about the source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from torch import nn
from transformers import PreTrainedModel

from npu_parallel.convert.attention import use_fused_attention
from npu_parallel.convert.fused import use_fused_kernels
from npu_parallel.convert.generation import install_generate
from npu_parallel.convert.options import ConversionOptions, fold_options
from npu_parallel.convert.plan import Plan, matches
from npu_parallel.convert.plans import plan_for
from npu_parallel.convert.styles import Context
from npu_parallel.moe.dispatchers import Dispatcher
from npu_parallel.moe.gate_options import GateOptions
from npu_parallel.moe.load import install as install_balance
from npu_parallel.parallel.state import Group, ParallelState

logger = logging.getLogger(__name__)

INFO_ATTR = "npu_parallel_conversion"


@dataclass
class ConversionInfo:
    """What convert_model did to a model, and what loading learnt about its source checkpoint."""

    plan: Plan
    tp: Group
    moe_impl: str
    ep: Group | None = None  # the ranks splitting the routed experts (None: the tp group)
    # how the source checkpoint stored the routed experts ({"kind": "fused"} or per-expert key names)
    expert_layout: dict | None = None
    # load_pretrained's reading statistics: bytes_read, seconds, keys_read
    load_stats: dict | None = None
    # the Hugging Face folder the weights came from (load_pretrained's path; a sharded checkpoint's recorded one):
    # save_sharded writes it into the manifest, and `merge` copies the tokenizer from there
    source_path: str | None = None
    # the choices it was converted with (moe_impl as given: "auto" too; the name it resolved to is moe_impl above)
    options: ConversionOptions | None = None


def conversion_info(model: nn.Module) -> ConversionInfo:
    """The model's ConversionInfo; a ValueError for a model that was never converted."""
    info = getattr(model, INFO_ATTR, None)
    if not isinstance(info, ConversionInfo):
        raise ValueError(
            f"{type(model).__name__} was not converted: pass a model returned by "
            f"npu_parallel.convert_model, load_pretrained or load_sharded"
        )
    return info


def _convert_children(module: nn.Module, prefix: str, plan: Plan, ctx: Context, used: dict[str, int]) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        new = child
        hit = next(((p, s) for p, s in plan.rules if matches(p, path) and s.applies(child)), None)
        if hit is not None:
            pattern, style = hit
            new = style.apply(child, ctx, path)
            ctx.converted[path] = new
            used[pattern] = used.get(pattern, 0) + 1
            if new is not child:
                setattr(module, name, new)
            if style.owns_subtree:
                continue
        _convert_children(new, f"{path}.", plan, ctx, used)


def apply_plan(
    model: PreTrainedModel,
    tp: Group,
    *,
    device_type: str,
    plan: Plan | None = None,
    options: ConversionOptions | None = None,
    world_size: int | None = None,
    ep: Group | None = None,
) -> ConversionInfo:
    """Swap modules and slice weights per the plan, leaving tensors where they are (meta included).

    Checks every size against the plan first (before any collective), then converts; warns about rules
    that matched no module, as transformers' ``verify_tp_plan`` does. ``options``: the conversion's choices
    (:class:`~npu_parallel.convert.options.ConversionOptions`; None: every default).
    """
    config = model.config
    plan = plan or plan_for(config)
    options = options or ConversionOptions()
    ep = ep or tp
    plan.check_tp(config, tp.size, world_size)
    plan.check_ep(config, ep.size, tp.size, world_size)
    dispatcher = options.dispatcher(device_type, cross_group=ep.size > tp.size)
    if ep.size > tp.size and not dispatcher.cross_group:
        raise ValueError(
            f"moe_impl={dispatcher.name!r} computes only its tp group's tokens; ep_size={ep.size} > tp_size="
            f"{tp.size} needs an implementation that moves tokens: 'alltoall' or 'alltoall_static' (or 'auto')"
        )
    if plan.balance is not None:
        plan.balance.coefficient(config, options.aux_loss_coef)  # a bad config value raises here, before any change
    ctx = Context(tp, config, dispatcher, options, balance=plan.balance, ep=ep, router_rule=plan.router)
    used: dict[str, int] = {}
    _convert_children(model, "", plan, ctx, used)
    unused = sorted({p for p, _ in plan.rules} - set(used) - set(plan.optional))
    if unused and tp.rank == 0:
        logger.warning("%s plan: rules that matched no module of %s: %s", plan.name, type(model).__name__, unused)
    use_fused_attention(model)
    use_fused_kernels(model)
    gate = options.gate_options
    z_loss = gate is not None and gate.z_loss_coef > 0
    if plan.balance is not None or z_loss:  # the load-balancing loss (and z-loss) into the output, once per forward
        attr = plan.balance.model_coef_attr if plan.balance is not None else None
        own = None
        if plan.balance is not None and attr and hasattr(model, attr):
            own = (attr, plan.balance.coefficient(config, options.aux_loss_coef))
        install_balance(model, own)
    info = ConversionInfo(plan, tp, dispatcher.name, ep=ep, options=options)
    setattr(model, INFO_ATTR, info)
    install_generate(model, tp, ep)  # sampled tokens agree across the ranks (convert/generation.py)
    experts = plan.num_experts(config)
    if experts and tp.rank == 0:
        logger.info(
            "converted %s for tp=%d ep=%d: %d experts -> %d local experts per rank; modules per rule %s",
            plan.name,
            tp.size,
            ep.size,
            experts,
            experts // ep.size,
            used,
        )
    return info


def convert_model(
    model: PreTrainedModel,
    state: ParallelState,
    *,
    moe_impl: str | Dispatcher = "auto",
    capacity_factor: float | None = None,
    aux_loss_coef: float | None = None,
    gate_options: GateOptions | None = None,
    options: ConversionOptions | None = None,
) -> PreTrainedModel:
    """Convert a loaded Hugging Face model to tensor/expert-parallel form in place and return it.

    The HF forward API is unchanged: ``model(input_ids=..., labels=...)`` gives the same loss and
    full-vocab logits as before conversion. ``moe_impl``: a name (``"auto"``, ``"grouped"``, ...) or a
    Dispatcher. ``capacity_factor`` applies to ``moe_impl="static"`` only (None: dropless).
    In train mode ``out.loss`` holds the family's load-balancing loss once and ``out.aux_loss`` reports it
    (weighted); ``aux_loss_coef`` overrides its coefficient (None: the config's, 0: off). ``gate_options``: router
    noise and the router z-loss, train mode only (:class:`~npu_parallel.moe.gate_options.GateOptions`; None: off).
    ``options``: the same choices in one :class:`~npu_parallel.convert.options.ConversionOptions` (a keyword may
    fill a field it leaves at its default; one that contradicts a set field is a ValueError).
    """
    opts = fold_options(
        options, moe_impl=moe_impl, capacity_factor=capacity_factor, aux_loss_coef=aux_loss_coef,
        gate_options=gate_options,
    )  # fmt: skip
    apply_plan(model, state.tp, device_type=state.device.type, options=opts, world_size=state.world_size, ep=state.ep)
    cast(nn.Module, model).to(state.device)  # in place; cast: transformers' decorated `to` confuses mypy
    return model
