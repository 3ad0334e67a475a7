"""The load-balancing (auxiliary) losses of the MoE families, computed inside the converted MoE block.

Each family's plan declares a :class:`BalanceRule` (which loss, which config keys); :meth:`BalanceRule.resolve`
turns it and a config into a :class:`Balance`, shared by the model's MoE blocks. In train mode each block
calls :meth:`Balance.layer` on its router's output and keeps the :class:`LayerTerm`; after the forward,
:meth:`Balance.total` combines the layers' terms into the one scalar the model adds to its loss
(:mod:`npu_parallel.moe.load` does that), weighted by the family's coefficient.

Losses:

- ``switch``: transformers' ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, Qwen3-MoE), the Switch
  Transformer loss over all layers at once: ``E * sum_e (slots_e / rows) * (prob_e / rows)``, slots and
  probabilities summed over every layer, times ``router_aux_loss_coef``.
- ``deepseek``: DeepSeek's ``MoEGate`` (V2), per layer, summed: ``alpha * sum_e P_e * f_e`` with ``P`` the mean
  score and ``f = E / (T k) * slots``; with ``seq_aux`` the same per sequence, averaged over the batch. With
  sigmoid scores (V3) it is the V3 report's balance loss (eqs. 17-20): affinities normalised per token, the
  indicator over the plain top-k of the affinities (no bias, no group limit).
- ``router``: a remote-code router that computes its own loss (DeepSeek's ``MoEGate``); its value is used.

Every rank of a tp group routes all tokens with the replicated router, so every rank computes the same loss
and its gradient reaches the router once per rank: nothing here is reduced over the group.
NPU-safe: counts by ``scatter_add_`` into fixed-size buffers (no ``one_hot``, ``bincount`` or ``nonzero``),
no host sync.

Shapes: B batch, S sequence, T = B*S tokens, k top-k, E routed experts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from npu_parallel.moe.dispatchers.base import slot_counts
from npu_parallel.moe.token_layout import TokenLayout

__all__ = ["Balance", "BalanceRule", "LayerTerm", "check_coefficient"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()

LOSSES = ("switch", "deepseek")
SCORINGS = ("softmax", "sigmoid")


def _config_value(config: object, name: str | None):
    if name is None:
        return None
    try:
        return getattr(config, name)
    except AttributeError:
        return None


@dataclass
class LayerTerm:
    """One MoE layer's share of the loss, and its routed load (for the metrics and the bias update)."""

    counts: torch.Tensor  # [E] float32 token-slots per expert, as routed (no gradient)
    value: torch.Tensor | None = None  # per-layer losses (deepseek, router): the weighted scalar
    probs: torch.Tensor | None = None  # switch: [E] summed routing probabilities (with gradient)
    rows: int = 0  # switch: tokens behind ``probs``


@dataclass(frozen=True)
class Balance:
    """A model's resolved load-balancing loss (``coef`` 0: none, the load is still counted)."""

    loss: str  # "switch" | "deepseek" | "router"
    coef: float
    num_experts: int
    seq_aux: bool = False
    scoring: str = "softmax"
    bias_attr: str | None = None  # the router's auxiliary-loss-free balancing bias, when the family has one

    @property
    def active(self) -> bool:
        return self.coef > 0

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` -> the scores the loss is defined on (float32)."""
        if self.scoring == "sigmoid":
            s = logits.float().sigmoid()
            return s / s.sum(dim=-1, keepdim=True)  # V3 report eq. 19: normalised affinities
        return logits.float().softmax(dim=-1)

    def layer(
        self,
        logits: torch.Tensor | None,
        indices: torch.Tensor,
        batch_shape: tuple[int, ...],
        router_aux: torch.Tensor | None = None,
        layout: TokenLayout | None = None,
    ) -> LayerTerm:
        """This layer's term: ``logits [T, E]`` (None when the router returns none), routed ``indices [T, k]``.

        ``layout`` (a micro-batch with padding or packed documents): padding counts in neither the loss nor the
        load, and the sequence-wise loss is taken per document.
        """
        if layout is not None:
            counts = layout.slot_counts(indices.detach(), self.num_experts)
        else:
            counts = slot_counts(indices.detach(), self.num_experts, torch.float32)
        term = LayerTerm(counts=counts)
        if not self.active:
            return term
        if self.loss == "router":
            if layout is not None and "router" not in _warned:
                _warned.add("router")  # numerics never silently degraded: said once
                logger.warning(
                    "this remote-code router computes its own load-balancing loss over every token of a row, "
                    "padding and neighbouring documents included (the routed load excludes padding)"
                )
            term.value = router_aux
            return term
        if logits is None:
            raise TypeError(
                f"the {self.loss} load-balancing loss needs the router logits, and this router returns none; "
                f"pass aux_loss_coef=0 to train without it"
            )
        scores = self.scores(logits.reshape(-1, self.num_experts))  # [T, E]
        if self.loss == "switch":
            if layout is None:
                term.probs, term.rows = scores.sum(dim=0), scores.shape[0]
            else:
                term.probs, term.rows = (scores * layout.keep[:, None]).sum(dim=0), layout.kept
            return term
        if layout is None:
            term.value = self._deepseek(scores, indices, batch_shape)
        else:
            term.value = self._deepseek_documents(scores, indices, layout)
        return term

    def _deepseek(self, scores: torch.Tensor, indices: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
        e, k = self.num_experts, indices.shape[-1]
        if self.scoring == "sigmoid":  # V3: the indicator is over the plain top-k of the affinities
            indices = scores.detach().topk(k, dim=-1).indices
        if self.seq_aux:
            b = batch_shape[0] if len(batch_shape) > 1 else 1
            s = scores.shape[0] // b
            per_seq = indices.reshape(b, s * k)  # [B, S*k]
            ce = torch.zeros(b, e, dtype=torch.float32, device=scores.device)
            ce.scatter_add_(1, per_seq, torch.ones(per_seq.shape, dtype=torch.float32, device=scores.device))
            ce = ce.div_(s * k / e)  # [B, E] f per sequence
            return (ce * scores.view(b, s, e).mean(dim=1)).sum(dim=1).mean() * self.coef
        f = slot_counts(indices, e, torch.float32) / indices.numel() * e  # [E]
        return (scores.mean(dim=0) * f).sum() * self.coef

    def _deepseek_documents(self, scores: torch.Tensor, indices: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``_deepseek`` over the real tokens only; with ``seq_aux`` per document (``D`` of them), not per row."""
        e, k = self.num_experts, indices.shape[-1]
        if self.scoring == "sigmoid":
            indices = scores.detach().topk(k, dim=-1).indices
        keep = layout.keep[:, None]  # [T, 1]
        if not self.seq_aux:
            kept = max(layout.kept, 1)
            f = layout.slot_counts(indices, e) / (kept * k) * e  # [E]
            return ((scores * keep).sum(dim=0) / kept * f).sum() * self.coef
        d = layout.documents
        bins = (layout.segment[:, None] * e + indices).reshape(-1)  # [T*k] into [(D+1) * E]
        ce = torch.zeros((d + 1) * e, dtype=torch.float32, device=scores.device)
        ce.scatter_add_(0, bins, torch.ones(bins.shape, dtype=torch.float32, device=scores.device))
        sizes = torch.tensor(layout.sizes, dtype=torch.float32, device=scores.device).clamp(min=1)[:, None]  # [D, 1]
        ce = ce.view(d + 1, e)[:d] / (sizes * k / e)  # [D, E] f per document
        mean = torch.zeros(d + 1, e, dtype=scores.dtype, device=scores.device).index_add_(0, layout.segment, scores)
        return (ce * (mean[:d] / sizes)).sum(dim=1).mean() * self.coef

    def total(self, terms: list[LayerTerm]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(reported, weighted)`` of one forward from its layers' terms; None when off or nothing was routed.

        ``weighted`` is what the loss gains; ``reported`` is ``out.aux_loss`` in the family's own convention:
        transformers' unweighted value for ``switch`` (its loss adds ``coef * aux_loss``), DeepSeek's
        alpha-weighted one otherwise (the same tensor).
        """
        if not self.active or not terms:
            return None
        if self.loss == "switch":
            probs = [t.probs for t in terms if t.probs is not None]
            if not probs:
                return None
            rows = float(sum(t.rows for t in terms))
            slots = torch.stack([t.counts for t in terms]).sum(dim=0) / rows
            raw = torch.sum(slots * (torch.stack(probs).sum(dim=0) / rows)) * self.num_experts
            return raw, raw * self.coef
        values = [t.value for t in terms if t.value is not None]
        if not values:
            return None
        value = torch.stack([v.float().reshape(()) for v in values]).sum()
        return value, value


def check_coefficient(value: object, source: str = "aux_loss_coef") -> float:
    """A load-balancing coefficient as a float; ValueError naming ``source`` unless it is a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{source}={value!r}: the load-balancing coefficient must be a number >= 0 (0: off)")
    return float(value)


@dataclass(frozen=True)
class BalanceRule:
    """A family's load-balancing loss and the config keys that set it (declared in the family's Plan)."""

    loss: str  # one of LOSSES
    coef_key: str  # the coefficient: "router_aux_loss_coef", "aux_loss_alpha"
    seq_key: str | None = None  # switches the sequence-wise form (DeepSeek "seq_aux")
    scoring: str = "softmax"  # how logits become scores ...
    scoring_key: str | None = None  # ... unless the config names it here ("scoring_func") ...
    sigmoid_types: tuple[str, ...] = ()  # ... or its model_type scores by sigmoid (transformers' DeepSeek-V3)
    router_coef_attr: str | None = None  # a remote-code router that computes its own loss keeps its coefficient here
    bias_attr: str | None = None  # the router's auxiliary-loss-free balancing bias (DeepSeek-V3)
    # the causal-LM attribute with which transformers adds its own loss (output_router_logits): 0 in train mode,
    # where the block's term is added instead, so the loss holds it once whatever output_router_logits says
    model_coef_attr: str | None = None

    def coefficient(self, config: object, override: float | None = None) -> float:
        """``override`` when given, else the config's value (absent: 0, no loss)."""
        value = override if override is not None else _config_value(config, self.coef_key)
        if value is None:
            return 0.0
        return check_coefficient(value, "aux_loss_coef" if override is not None else f"config.{self.coef_key}")

    def resolve(self, config: object, router: object, num_experts: int, override: float | None = None) -> Balance:
        """The Balance of a model with this ``config`` for a block routed by ``router``.

        A remote-code router that computes its own loss keeps doing so, with ``override`` as its coefficient.
        """
        coef = self.coefficient(config, override)
        bias = self.bias_attr if isinstance(getattr(router, self.bias_attr or "", None), torch.Tensor) else None
        if self.router_coef_attr and hasattr(router, self.router_coef_attr):
            if override is not None:
                setattr(router, self.router_coef_attr, coef)
            coef = float(getattr(router, self.router_coef_attr) or 0.0)
            return Balance("router", coef, num_experts, bias_attr=bias)
        scoring = _config_value(config, self.scoring_key) or (
            "sigmoid" if _config_value(config, "model_type") in self.sigmoid_types else self.scoring
        )
        if scoring not in SCORINGS:
            raise ValueError(f"scoring {scoring!r}: the load-balancing loss knows {SCORINGS}")
        seq = bool(_config_value(config, self.seq_key))
        return Balance(self.loss, coef, num_experts, seq, scoring, bias)
