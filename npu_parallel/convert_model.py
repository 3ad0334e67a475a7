"""convert_model(): apply an architecture's plan to a loaded model, in place."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from . import dispatch
from .attention import use_fused_attention
from .distributed import ParallelState, divisors
from .plans import Plan, plan_for
from .styles import Context

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversionInfo:
    plan: str
    tp_size: int
    tp_rank: int
    moe_impl: str


def tp_problem(plan: Plan, config, tp_size: int) -> str | None:
    """Why ``tp_size`` cannot split this model (a phrase following "tp_size=N"), or None."""
    for what, size in plan.divides:
        n = size(config)
        if n and n % tp_size:
            return f"must divide the {what} = {n}"
    for check in plan.checks:
        why = check(config, tp_size)
        if why:
            return f"does not fit {why}"
    return None


def check_divisibility(plan: Plan, config, tp_size: int, world_size: int | None = None) -> None:
    """Raise ValueError (same on every rank, before any collective) when tp cannot split the model."""
    why = tp_problem(plan, config, tp_size)
    if why is None:
        return
    sizes = [n for _, f in plan.divides if (n := f(config))]
    candidates = divisors(world_size) if world_size else sorted({d for n in sizes for d in divisors(n)})
    good = [d for d in candidates if tp_problem(plan, config, d) is None]
    raise ValueError(
        f"tp_size={tp_size} {why} of this {config.model_type} model; "
        f"tp sizes that work{' with world size ' + str(world_size) if world_size else ''}: {good}"
    )


def _convert_children(module: nn.Module, prefix: str, plan: Plan, ctx: Context, counts: dict) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        new = child
        style = next((s for s in plan.styles_for(path) if s.applies(child)), None)
        if style is not None:
            new = style.apply(child, ctx, path)
            ctx.converted[path] = new
            counts[type(style).__name__] = counts.get(type(style).__name__, 0) + 1
            if new is not child:
                setattr(module, name, new)
            if style.owns_subtree:
                continue
        _convert_children(new, f"{path}.", plan, ctx, counts)


def convert_model(model: nn.Module, state: ParallelState, *, moe_impl: str = "auto",
                  capacity_factor: float | None = None) -> nn.Module:
    """Convert a loaded Hugging Face model to tensor/expert-parallel form in place and return it.

    The HF forward API is unchanged: ``model(input_ids=..., labels=...)`` gives the same loss and
    full-vocab logits as before conversion. ``capacity_factor`` applies to ``moe_impl="static"`` only
    (None: dropless).
    """
    apply_plan(model, state, moe_impl=moe_impl, capacity_factor=capacity_factor)
    return model.to(state.device)


def apply_plan(model: nn.Module, state: ParallelState, *, moe_impl: str = "auto",
               capacity_factor: float | None = None) -> nn.Module:
    """Swap modules and slice weights per the model's plan, leaving tensors where they are (meta included)."""
    config = model.config
    plan = plan_for(config)
    check_divisibility(plan, config, state.tp_size, state.world_size)
    impl = dispatch.resolve(moe_impl, state.device.type)
    if capacity_factor is not None and (impl != "static" or capacity_factor <= 0):
        raise ValueError(f"capacity_factor={capacity_factor!r} needs moe_impl='static' and a value > 0 "
                         f"(e.g. 1.25); the other implementations never drop tokens")
    ctx = Context(state.tp_rank, state.tp_size, state.tp_group, config, impl, capacity_factor)
    counts: dict = {}
    _convert_children(model, "", plan, ctx, counts)
    use_fused_attention(model)
    model._np_conversion = ConversionInfo(plan.name, state.tp_size, state.tp_rank, impl)
    experts = getattr(config, "n_routed_experts", None)
    if experts and state.tp_rank == 0:
        logger.info("converted %s for tp=%d: %d experts -> %d local experts per rank; styles %s",
                    plan.name, state.tp_size, experts, experts // state.tp_size, counts)
    return model
