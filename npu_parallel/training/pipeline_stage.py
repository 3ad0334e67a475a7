"""One pipeline stage of a converted causal LM: a contiguous run of its decoder layers, as an ``nn.Module`` for
``torch.distributed.pipelining.PipelineStage``.

A stage runs the model's own base forward (its rotary embedding, attention mask and layer loop, so every family
and transformers version works alike) over its layers only: the first stage embeds the micro-batch's ids, the others
take the hidden states; the last applies the final norm and computes the micro-batch's loss, normalized as
:func:`~npu_parallel.training.step.train_step` does. Which micro-batch a forward belongs to is counted per stage
(every schedule runs a stage's forwards in micro-batch order), so position ids and document ids never travel
through the P2P sends: each stage reads them from the step's micro-batches.

The load-balancing loss crosses stages exactly once in a side vector ``[P (E), S (E), value]`` sent with
the hidden states: each stage adds its MoE layers' summed router probabilities ``P`` (with their graph), routed
slots ``S`` (no graph) and per-layer DeepSeek terms ``value`` (with their graph). The last stage
turns the sums into the family's loss (:meth:`~npu_parallel.moe.balance.Balance.total`; the Switch loss couples
every layer's probabilities and loads, so no stage could compute its share alone) and the P2P backward carries
its gradient to every stage's routers.

Shapes: B rows, L tokens, H hidden, E routed experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from npu_parallel.convert.documents import document_inputs, packs_documents
from npu_parallel.convert.mtp import mtp_layers, mtp_states
from npu_parallel.moe.balance import Balance, LayerTerm
from npu_parallel.moe.load import moe_blocks, take_terms, token_layout
from npu_parallel.moe.token_layout import TokenLayout
from npu_parallel.training.batch import Batch
from npu_parallel.training.losses import token_loss_sum

__all__ = ["StageContext", "StageModule", "model_balance"]


def model_balance(model: nn.Module) -> Balance | None:
    """The model's active load-balancing loss (None: off or no MoE block)."""
    for _, block in moe_blocks(model):
        balance = getattr(block, "balance", None)
        return balance if balance is not None and balance.active else None
    return None


@dataclass
class StageContext:
    """What every stage of one rank shares for a step: its micro-batches, the divisors and the parts it reports."""

    batches: Sequence[Batch] = ()
    counts: torch.Tensor | None = None  # [1 + D] global target counts (main, then each MTP depth)
    scale: float = 1.0  # dp: the data-parallel reduction divides by it
    mtp_weight: float = 0.0
    vocab_parallel: bool = False
    parts: list[dict[str, torch.Tensor]] = field(default_factory=list)  # the last stage's per micro-batch terms


class StageModule(nn.Module):
    """Layers ``[start, stop)`` of ``model`` (plus the embedding on the first stage and norm, head and MTP on the
    last); ``model`` itself is not registered, so ``parameters()`` are this stage's only."""

    def __init__(
        self, model: nn.Module, start: int, stop: int, *, first: bool, last: bool, context: StageContext
    ) -> None:
        super().__init__()
        base: Any = model.model
        object.__setattr__(self, "full", model)  # not a submodule: its other layers belong to other stages
        self.layers = nn.ModuleList(list(base.layers)[start:stop])
        self.first, self.last, self.start, self.stop = first, last, start, stop
        if first:
            self.embed_tokens = base.embed_tokens
        if last:
            self.norm = base.norm
            self.lm_head: Any = getattr(model, "get_output_embeddings")()  # noqa: B009 (typed as a Tensor)
            self.mtp = nn.ModuleList(mtp_layers(model))
            if len(self.mtp) and not first:  # MTP embeds the shifted ids with the first stage's embedding
                self.embed_tokens = base.embed_tokens
        self.context = context
        self.balance = model_balance(model)
        self.experts = self.balance.num_experts if self.balance is not None else 0
        n = int(getattr(model.config, "num_hidden_layers", 0))
        self.moe_layers = sum(1 for _, b in moe_blocks(nn.ModuleList(list(base.layers)[:n])))  # main layers only
        self.micro = 0  # the micro-batch the next forward belongs to

    def full_model(self) -> nn.Module:
        full: nn.Module = self.__dict__["full"]
        return full

    def side_size(self) -> int:
        return 2 * self.experts + 1 if self.balance is not None else 1

    def _run_layers(self, hidden: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        """The model's base forward over this stage's layers (embedding only on the first, norm only on the last)."""
        full: Any = self.full
        base: Any = full.model
        saved_layers, saved_norm = base.layers, base.norm
        base.layers = self.layers
        if not self.last:
            base.norm = nn.Identity()
        # a packed micro-batch: block-diagonal attention (and on an NPU the TND lengths), padding out of the
        # balance terms and the load, as in training/losses.batch_loss
        docs = document_inputs(full, batch.document_ids, batch.position_ids, batch.lengths)
        docs.pop("output_router_logits", None)  # a causal-LM flag; the base model takes the rest
        docs["position_ids"] = batch.position_ids
        layout = None if batch.document_ids is None else TokenLayout.from_documents(batch.document_ids, batch.lengths)
        try:
            with token_layout(full, layout):
                if self.first:
                    out = base(input_ids=batch.input_ids, use_cache=False, **docs)
                else:
                    out = base(inputs_embeds=hidden, use_cache=False, **docs)
        finally:
            base.layers, base.norm = saved_layers, saved_norm
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _side(self, side: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """This stage's MoE terms added to the side vector it received (``[2E + 1]``; ``[1]`` zeros when off)."""
        e = self.experts
        total = side if side is not None else torch.zeros(self.side_size(), dtype=torch.float32, device=like.device)
        if self.balance is None:
            _collect(self.layers)
            return total
        parts = []
        for term in _collect(self.layers):
            zero = torch.zeros(e, dtype=torch.float32, device=like.device)
            probs = term.probs.float() if term.probs is not None else zero
            value = term.value.float().reshape(1) if term.value is not None else zero[:1]
            parts.append(torch.cat([probs, term.counts.float().detach(), value]))
        if parts:
            total = total + torch.stack(parts).sum(dim=0)
        return total

    def forward(self, *args: torch.Tensor) -> Any:
        """First stage: ``(micro-batch index,)``; others: ``(hidden [B, L, H], side)``. Returns ``(hidden, side)``,
        or on the last stage the micro-batch's loss (a scalar, what the schedule differentiates)."""
        index, self.micro = self.micro, self.micro + 1
        batch = self.context.batches[index]
        hidden_in, side_in = (None, None) if self.first else (args[0], args[1])
        hidden = self._run_layers(hidden_in, batch)
        side = self._side(side_in, hidden)
        if not self.last:
            return hidden, side
        return self._loss(hidden, side, batch, index)

    def _loss(self, hidden: torch.Tensor, side: torch.Tensor, batch: Batch, index: int) -> torch.Tensor:
        """train_step's micro-batch loss: ce_sum / n + aux / (micro x dp) + mtp_weight x mtp, times dp."""
        ctx = self.context
        assert ctx.counts is not None
        n = ctx.counts[0].clamp(min=1)
        ce = token_loss_sum(self.lm_head(hidden)[:, :-1], batch.targets(0), self.lm_head, ctx.vocab_parallel) / n
        loss = ce
        parts = {"ce": ce.detach()}
        if self.balance is not None:
            e = self.experts
            real = sum(sum(row) for row in batch.lengths)  # tokens but padding (known on the host)
            rows = real * self.moe_layers  # every MoE layer routes every token
            term = LayerTerm(counts=side[e : 2 * e].detach(), probs=side[:e], rows=rows, value=side[2 * e])
            total = self.balance.total([term])
            if total is not None:
                aux = total[1].float() / (len(ctx.batches) * ctx.scale)
                loss = loss + aux
                parts["aux"] = aux.detach()
        if ctx.mtp_weight and len(self.mtp):
            packed = batch.document_ids is not None and packs_documents(batch.lengths)
            docs, pos = (batch.document_ids, batch.position_ids) if packed else (None, None)
            # as in train_step, mtp_states counts the MTP layers' load and drops their balance terms
            states = mtp_states(self.full_model(), hidden, batch.input_ids, docs, pos)
            sums = [
                token_loss_sum(self.lm_head(s)[:, :-1], batch.targets(k), self.lm_head, ctx.vocab_parallel)
                for k, s in enumerate(states, start=1)
            ]
            mtp = torch.stack([s / ctx.counts[k].clamp(min=1) for k, s in enumerate(sums, start=1)]).mean()
            loss = loss + ctx.mtp_weight * mtp
            parts["mtp"] = mtp.detach()
        ctx.parts.append(parts)
        return loss * ctx.scale


def _collect(layers: nn.Module) -> list[LayerTerm]:
    """Take the MoE blocks' terms of the last forward (as the model's BalanceHook does) and count their load."""
    return take_terms(layers)
