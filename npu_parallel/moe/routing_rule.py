"""A family's routing math, declared in its Plan: raw logits -> scores (what top-k ranks) -> weights at chosen ids.

The converted MoE block keeps the source model's own router and, with no routing hook, calls nothing here.
The routing hooks (:mod:`npu_parallel.moe.routing_hooks`) need what the router computes on the way: the scores
its top-k ranks, and the weights it would give to experts it did not pick. :class:`RouterRule` says how the
family gets them from the raw logits; :meth:`RouterRule.resolve` reads the router's own attributes (remote-code
``MoEGate``\\ s name them differently from transformers' routers) into a :class:`RouterMath`.

- scores: ``softmax`` or ``sigmoid`` of the raw logits, plus the correction bias (DeepSeek-V3, for the choice
  only), then the group limit (DeepSeek-V2 ``group_limited_greedy``: best score per group; V3: sum of the two
  best; the experts of the groups left out set to 0 or, transformers' V3, ``-inf``).
- weights: the probabilities (no bias) at the chosen ids, then normalised over them and/or scaled by
  ``routed_scaling_factor``. Releases of the same family's code differ here (DeepSeek-V2's remote code scales
  only when it does not normalise, V3's always; transformers' V2 never normalises), so the rule names the
  form it expects first and :meth:`RouterMath.check` picks, once per block, the form that reproduces the
  router's own weights at its own ids (a clear error when none does: never a silent difference).

Shapes: T tokens, E routed experts, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RouterMath", "RouterRule", "RoutingRuleError"]

SCORINGS = ("softmax", "sigmoid")
# weight forms: (normalise over the chosen, multiply by the scale)
FORMS = ((False, False), (False, True), (True, False), (True, True))


class RoutingRuleError(RuntimeError):
    """The family's declared routing rule does not reproduce its router's own choice or weights."""


@dataclass(frozen=True)
class RouterRule:
    """How one family's router turns raw logits into scores and weights (declared in the family's Plan)."""

    scoring: str = "softmax"  # "softmax" | "sigmoid" ...
    scoring_attr: str | None = "scoring_func"  # ... unless the router names it (remote code)
    bias_attr: str | None = None  # a bias added to the scores for the choice only (V3 e_score_correction_bias)
    grouped: bool = False  # group-limited routing, from the router's n_group/num_group, topk_group, topk_method
    normalize: bool = False  # normalise the weights over the chosen experts (when the router has no attribute)
    normalize_attr: str | None = "norm_topk_prob"
    scale_attr: str | None = "routed_scaling_factor"

    def resolve(self, router: object, num_experts: int, top_k: int) -> RouterMath:
        """This rule read from one router module's attributes."""
        scoring = getattr(router, self.scoring_attr, None) if self.scoring_attr else None
        bias = self.bias_attr if isinstance(getattr(router, self.bias_attr or "", None), torch.Tensor) else None
        if not isinstance(scoring, str):
            scoring = "sigmoid" if bias is not None and self.scoring == "softmax" else self.scoring
        if scoring not in SCORINGS:
            raise RoutingRuleError(f"{type(router).__name__} scores by {scoring!r}; routing hooks know {SCORINGS}")
        group = _group(router, num_experts, bias is not None) if self.grouped else None
        normalize = self.normalize
        if self.normalize_attr and isinstance(getattr(router, self.normalize_attr, None), bool):
            normalize = bool(getattr(router, self.normalize_attr))
        scale = getattr(router, self.scale_attr, None) if self.scale_attr else None
        scale = float(scale) if isinstance(scale, int | float) and not isinstance(scale, bool) else 1.0
        scaled = scale != 1.0
        first = (normalize, scaled)
        forms = (first, *[f for f in FORMS if f != first])
        return RouterMath(type(router).__name__, scoring, bias, group, forms, scale, num_experts, top_k)


def _group(router: object, num_experts: int, biased: bool) -> tuple[int, int, str, float] | None:
    """(groups, groups kept, "max" | "top2", fill of the experts left out), or None: no group limit."""
    groups = getattr(router, "n_group", None) or getattr(router, "num_group", None)
    keep = getattr(router, "topk_group", None)
    method = getattr(router, "topk_method", None)
    if not isinstance(groups, int) or not isinstance(keep, int) or groups <= 1 or num_experts % groups:
        return None
    if method == "group_limited_greedy":  # DeepSeek-V2: a group's best score
        return groups, keep, "max", 0.0
    if method == "noaux_tc":  # DeepSeek-V3 remote code: its two best, masked with 0
        return groups, keep, "top2", 0.0
    if method is None and biased:  # transformers' DeepSeek-V3 router: masked with -inf
        return groups, keep, "top2", float("-inf")
    return None


@dataclass
class RouterMath:
    """One router's routing math (resolved from its rule); ``forms[0]`` is the weight form in use."""

    router: str  # the router's class name, for messages
    scoring: str
    bias_attr: str | None
    group: tuple[int, int, str, float] | None
    forms: tuple[tuple[bool, bool], ...]
    scale: float
    num_experts: int
    top_k: int
    checked: bool = False

    def probs(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw [T, E]`` -> the routing probabilities ``[T, E]`` float32 (no bias, no group limit)."""
        return raw.float().sigmoid() if self.scoring == "sigmoid" else raw.float().softmax(dim=-1)

    def scores(self, raw: torch.Tensor, router: object) -> torch.Tensor:
        """``raw [T, E]`` -> what the family's top-k ranks ``[T, E]``: probabilities + bias, group-limited."""
        scores = self.probs(raw)
        if self.bias_attr is not None:
            scores = scores + getattr(router, self.bias_attr).float()
        if self.group is None:
            return scores
        groups, keep, method, fill = self.group
        t = scores.shape[0]
        per = scores.view(t, groups, -1)  # [T, G, E/G]
        group_scores = per.max(dim=-1).values if method == "max" else per.topk(2, dim=-1)[0].sum(dim=-1)
        chosen = group_scores.topk(keep, dim=-1, sorted=False)[1]  # [T, keep]
        mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1.0)  # [T, G]
        mask = mask.unsqueeze(-1).expand(t, groups, per.shape[-1]).reshape(t, -1)
        return scores.masked_fill(mask == 0, fill)

    def weights(self, raw: torch.Tensor, ids: torch.Tensor, form: tuple[bool, bool] | None = None) -> torch.Tensor:
        """The family's weights ``[T, k]`` float32 at ``ids [T, k]``, with the gradient the family's has."""
        normalize, scaled = form or self.forms[0]
        w = self.probs(raw).gather(1, ids)
        if normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scale if scaled else w

    def check(self, raw: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Once per block: the rule's scores rank the router's own ids first, and one weight form gives its
        weights (that form is kept); a RoutingRuleError otherwise. One host sync, the first time only."""
        if self.checked:
            return
        k = ids.shape[-1]
        own = scores.gather(1, ids).sort(dim=-1).values
        best = scores.topk(k, dim=-1).values.sort(dim=-1).values
        tol = 1e-5 if weights.dtype == torch.float32 else 1e-2
        if not torch.allclose(own, best, rtol=tol, atol=tol):
            raise RoutingRuleError(
                f"routing hooks: the plan's routing rule ({self.scoring} scores, group limit {self.group}) does not "
                f"rank {self.router}'s own top-{k} first; its scores differ from the router's: fix the family's "
                f"RouterRule in its plan (npu_parallel/convert/plans)"
            )
        for form in self.forms:
            if torch.allclose(self.weights(raw, ids, form).to(weights.dtype), weights, rtol=tol, atol=tol):
                self.forms = (form, *[f for f in self.forms if f != form])
                self.checked = True
                return
        raise RoutingRuleError(
            f"routing hooks: no weight form (normalised and/or scaled by {self.scale}) of {self.scoring} "
            f"probabilities gives {self.router}'s own routing weights: fix the family's RouterRule in its plan"
        )
