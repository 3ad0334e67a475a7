"""After the forward: the load-balancing loss into the model's output, and the expert load the blocks routed.

:func:`install` registers :class:`BalanceHook` on the converted model (``convert_model`` does it). In train
mode, after each forward of the whole model, the hook takes every MoE block's :class:`~npu_parallel.moe.balance.
LayerTerm`, adds the weighted load-balancing loss to ``out.loss`` (when labels were given) exactly once, reports
it as ``out.aux_loss`` in the family's convention (:func:`balance_loss` gives the weighted term, with its graph,
to a caller that computes its own loss from the logits), and
accumulates each block's routed load on the device (no host sync). It runs once per model forward, so
recomputation under gradient checkpointing counts nothing twice.

:func:`read_load` is the once-per-step read: one all-reduce of every layer's load (int64, on the device),
then the auxiliary-loss-free bias update of DeepSeek-V3 (``b_i += rate * sign(mean load - load_i)``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.moe.balance import LayerTerm
from npu_parallel.moe.block import MoEBlock
from npu_parallel.moe.token_layout import TokenLayout

__all__ = [
    "BalanceHook",
    "LoadReading",
    "balance_loss",
    "has_balance_bias",
    "install",
    "layer_index",
    "moe_blocks",
    "read_load",
    "reset_load",
    "take_terms",
    "token_layout",
]

logger = logging.getLogger(__name__)


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    """(path, block) of every converted MoE block, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)]


class BalanceHook:
    """The converted model's forward hooks: loss term into the output, load into the blocks' counters.

    ``model_coef``: (attribute, coefficient) with which transformers adds its own load-balancing loss when asked
    for router logits (Mixtral, Qwen-MoE): 0 in train mode, where this hook adds the block's term instead, and the
    coefficient in eval mode, where the model computes what the unconverted one does.
    """

    def __init__(self, model_coef: tuple[str, float] | None = None) -> None:
        self.model_coef = model_coef
        self.last: torch.Tensor | None = None  # the weighted term of the last train-mode forward (with its graph)
        self.warned = False

    def before(self, model: nn.Module, args) -> None:
        self.last = None
        if self.model_coef is not None:
            attr, coef = self.model_coef
            setattr(model, attr, 0.0 if model.training else coef)

    def __call__(self, model: nn.Module, args, kwargs, out):
        if not model.training:
            return None
        terms = take_terms(model)
        total = None
        balance = next((b.balance for _, b in moe_blocks(model)), None)
        if terms and balance is not None:
            total = balance.total(terms)
        z = _take_z_terms(model)
        if (total is None and z is None) or out is None or not hasattr(out, "logits"):
            return None
        reported, self.last = total if total is not None else (None, None)
        if z is not None:  # the router z-loss (gate options) beside the family's load-balancing loss
            self.last = z if self.last is None else self.last + z
        assert self.last is not None
        if torch.is_grad_enabled() and not self.last.requires_grad and not self.warned:
            if any(p.requires_grad for _, block in moe_blocks(model) for p in block.gate.parameters()):
                self.warned = True  # numerics never silently degraded: said once
                logger.warning(
                    "the load-balancing loss has no gradient although the routers train: reentrant gradient "
                    "checkpointing runs the layers without autograd; pass gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}"
                )
        loss = getattr(out, "loss", None)
        if loss is not None:
            out["loss"] = loss + self.last.to(loss.dtype)
        if reported is not None:
            out["aux_loss"] = reported
        if z is not None:
            out["z_loss"] = z
        return out


def take_terms(module: nn.Module) -> list[LayerTerm]:
    """The MoE blocks' (of ``module``) load-balancing terms of their last train-mode forward, taken (cleared), with
    each block's routed load and dropped slots added to its counters."""
    terms = []
    for _, block in moe_blocks(module):
        term, block.balance_term = block.balance_term, None
        if term is None:
            continue
        terms.append(term)
        counts = term.counts.to(torch.int64)
        block.expert_load = counts if block.expert_load is None else block.expert_load + counts
        dropped = block.dispatcher.stats.get("dropped")
        if dropped is not None:
            dropped = dropped.to(torch.int64)
            block.dropped = dropped if block.dropped is None else block.dropped + dropped
    return terms


def _take_z_terms(model: nn.Module) -> torch.Tensor | None:
    """The weighted router z-loss of this forward, summed over the MoE layers (None: off); the blocks' cleared."""
    found = []
    for _, block in moe_blocks(model):
        if block.z_term is not None:
            found.append(block.z_term)
            block.z_term = None
    return torch.stack(found).sum() if found else None


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """The weighted load-balancing loss (plus the router z-loss, when on) of the model's last train-mode forward,
    with its graph (the amount its ``out.loss`` gained; a loss computed from the logits adds it); None: none."""
    for hook in model._forward_hooks.values():
        if isinstance(hook, BalanceHook):
            return hook.last
    return None


def install(model: nn.Module, model_coef: tuple[str, float] | None = None) -> None:
    """Register the hooks once (a model converted again keeps one pair)."""
    if any(isinstance(h, BalanceHook) for h in model._forward_hooks.values()):
        return
    hook = BalanceHook(model_coef)
    model.register_forward_pre_hook(hook.before)
    model.register_forward_hook(hook, with_kwargs=True)


@contextlib.contextmanager
def token_layout(model: nn.Module, layout: TokenLayout | None) -> Iterator[None]:
    """Forwards inside see ``layout`` (padding, documents) in their load-balancing terms and routed load; None:
    every token is real and each row one sequence. A recomputation after the block (gradient checkpointing)
    runs without it: its terms are never read, the forward's were."""
    blocks = [block for _, block in moe_blocks(model)] if layout is not None else []
    for block in blocks:
        block.layout = layout
    try:
        yield
    finally:
        for block in blocks:
            block.layout = None


def reset_load(model: nn.Module) -> None:
    """Forget the load counted so far (e.g. that of warmup passes)."""
    for _, block in moe_blocks(model):
        block.expert_load = block.dropped = None


@dataclass
class LoadReading:
    """Token-slots per expert of every MoE layer since the last read, summed over the data-parallel ranks."""

    paths: list[str]
    layers: list[int | None]
    load: list[list[int]]  # [L][E]
    dropped: list[int]  # [L] slots the static dispatcher dropped (summed over every rank: each drops its own)


def layer_index(path: str) -> int | None:
    """The decoder-layer index in a path like ``model.layers.3.mlp``."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def read_load(model: nn.Module, state, *, bias_update_rate: float = 0.0, update: bool = True) -> LoadReading | None:
    """The load since the last read (one int64 all-reduce on the device, one host read), counters reset; with
    ``bias_update_rate`` > 0 and ``update``, each router's balancing bias moves against its experts' load."""
    blocks = [(p, b) for p, b in moe_blocks(model) if b.expert_load is not None]
    counted = [b.expert_load for _, b in blocks if b.expert_load is not None]  # the same blocks, for mypy
    if not counted:
        return None
    zero = torch.zeros((), dtype=torch.int64, device=counted[0].device)
    loads = torch.stack(counted)  # [L, E]
    dropped = torch.stack([zero if b.dropped is None else b.dropped for _, b in blocks])  # [L]
    packed = torch.cat([loads, dropped[:, None]], dim=1)  # [L, E + 1] int64
    if dist.is_initialized() and dist.get_world_size() > 1:
        # every rank of a tp group routes the same tokens: the world sum holds each dp rank's load tp times
        dist.all_reduce(packed)
        packed[:, :-1] = packed[:, :-1] // state.tp_size
    load = packed[:, :-1]
    if update and bias_update_rate > 0:
        _update_bias(blocks, load, bias_update_rate)
    reset_load(model)
    rows = packed.tolist()  # the one host sync of the step
    return LoadReading(
        paths=[p for p, _ in blocks],
        layers=[layer_index(p) for p, _ in blocks],
        load=[r[:-1] for r in rows],
        dropped=[r[-1] for r in rows],
    )


_warned_dtype: set[str] = set()


def _bias(block: MoEBlock) -> torch.Tensor | None:
    attr = block.balance.bias_attr if block.balance is not None else None
    bias = getattr(block.gate, attr, None) if attr else None
    return bias if isinstance(bias, torch.Tensor) else None


def has_balance_bias(model: nn.Module) -> bool:
    """Whether the model's routers carry a balancing bias (DeepSeek-V3's, what ``bias_update_rate`` moves)."""
    return any(_bias(b) is not None for _, b in moe_blocks(model))


def _update_bias(blocks: list[tuple[str, MoEBlock]], load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: ``b_i += rate * sign(mean load - load_i)``, per layer."""
    for (path, block), row in zip(blocks, load, strict=True):
        bias = _bias(block)
        if bias is None:
            continue
        row = row.float()
        step = rate * torch.sign(row.mean() - row)  # [E] float32
        with torch.no_grad():
            bias.copy_((bias.float() + step).to(bias.dtype))
        if bias.dtype != torch.float32 and path not in _warned_dtype:
            _warned_dtype.add(path)
            logger.warning(
                "%s.gate.%s is %s: bias updates below its precision are lost; keep it float32",
                path,
                block.balance.bias_attr if block.balance else "bias",
                bias.dtype,
            )
