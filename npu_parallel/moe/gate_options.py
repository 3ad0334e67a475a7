"""Gate options for training a freshly made MoE (upcycled, or from scratch): router noise and the router z-loss.

Off by default, so a published model trains as its own code defines it. In train mode only: eval and
``generate`` never see noise, and the z-loss is a training term.

Noise (``GateOptions.noise``), with ``eps`` its size:

- ``"mixtral"``: transformers' Mixtral ``router_jitter_noise``: the MoE block's input (router *and* experts)
  multiplied by ``U(1 - eps, 1 + eps)``. A Mixtral config with ``router_jitter_noise > 0`` turns it on by itself,
  as transformers' own block does.
- ``"jitter"``: DeepSpeed-MoE's ``Jitter`` (``multiplicative_jitter``): the router's input only, multiplied by
  ``U(1 - eps, 1 + eps)``; the experts see the clean tokens.
- ``"rsample"``: DeepSpeed-MoE's ``RSample``, on the selection only: the top-k of ``log(scores) + Gumbel(0, 1)``
  (for softmax scores, a sample of k experts without replacement from the family's routing distribution; the
  experts a group limit left out stay out); the weights are the family's own at the sampled ids, with their
  gradient. Sigmoid routers (DeepSeek-V3) have no distribution to sample from and are refused.

Every rank of a tp group routes the same tokens with the replicated router, so the noise must be identical on
each of them, or the ranks would send tokens to different experts. It is drawn from a generator seeded per
forward with ``(seed, layer, step, forward)``: the same on every rank without a collective. A recomputation in the
backward (activation checkpointing) draws the last forward's noise again, which is the recomputed micro-batch's
while one micro-batch is in flight at a time (not under a pipeline schedule). The trainer sets ``step`` (its
optimizer step and dp rank, :func:`set_noise_step`), so a resumed run draws what the uninterrupted one drew.

z-loss (``z_loss_coef``, ST-MoE eq. 5): ``coef * mean_tokens(logsumexp(raw_logits)^2)`` per MoE layer, summed
over the layers, added to the loss beside the family's load-balancing loss (:mod:`npu_parallel.moe.load`).

Shapes: T tokens, H hidden, E routed experts, k top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NOISES", "GateNoise", "GateOptions", "set_noise_step", "z_loss"]

NOISES = ("mixtral", "jitter", "rsample")


@dataclass(frozen=True)
class GateOptions:
    """The gate options of a conversion (``convert_model(..., gate_options=...)``, the trainer's ``--router_*``)."""

    noise: str | None = None  # one of NOISES, or None
    noise_eps: float = 1e-2  # the jitter's half-width (DeepSpeed's and Megatron's default)
    z_loss_coef: float = 0.0  # ST-MoE's router z-loss coefficient (their 1e-3); 0: off
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the value, the rule and the fix."""
        if self.noise is not None and self.noise not in NOISES:
            raise ValueError(f"router noise {self.noise!r}: unknown; choose one of {', '.join(NOISES)} (or none)")
        if not (math.isfinite(self.noise_eps) and 0 < self.noise_eps < 1):
            raise ValueError(f"router noise eps {self.noise_eps}: must lie in (0, 1); DeepSpeed's default is 0.01")
        if not (math.isfinite(self.z_loss_coef) and self.z_loss_coef >= 0):
            raise ValueError(f"router z-loss {self.z_loss_coef}: must be a finite number >= 0 (ST-MoE uses 0.001)")


class GateNoise:
    """One MoE block's noise: the kind, its size, and the seeded draws (identical on every rank of the group)."""

    def __init__(self, kind: str, eps: float, seed: int, layer: int) -> None:
        self.kind, self.eps, self.seed, self.layer = kind, eps, seed, layer
        self.step: tuple[int, ...] = ()  # set by the trainer per step (set_noise_step); the forwards count within it
        self.forwards = 0
        self._last: int | None = None  # the seed of the last forward's draw (a recomputation draws it again)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        in_backward = torch._C._current_graph_task_id() != -1  # activation checkpointing recomputes the forward
        if not in_backward or self._last is None:
            # int tuples hash the same in every process (no hash randomisation for ints)
            self._last = hash((self.seed, self.layer, *self.step, self.forwards)) & 0x7FFF_FFFF_FFFF_FFFF
            self.forwards += 1
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(self._last)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """``x * U(1 - eps, 1 + eps)``, elementwise (drawn in fp32, then in x's dtype)."""
        u = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        u.uniform_(1.0 - self.eps, 1.0 + self.eps, generator=self._generator(x.device))
        return x * u.to(x.dtype)

    def sample(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """RSample's choice ``[T, k]`` int64: the top-k of ``log(scores [T, E]) + Gumbel(0, 1)``."""
        u = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        u.uniform_(generator=self._generator(scores.device))
        gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))  # [T, E]
        keys = scores.detach().float().clamp_min(0).log() + gumbel  # log 0 = -inf: a masked expert stays out
        return keys.topk(k, dim=-1).indices


def z_loss(raw_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss of one layer, unweighted: ``mean_tokens(logsumexp(raw_logits [T, E])^2)``, fp32."""
    return torch.logsumexp(raw_logits.float(), dim=-1).square().mean()


def set_noise_step(model: torch.nn.Module, step: int, stream: int = 0) -> None:
    """Seed the router noise of the next forwards by ``(step, stream, i)``, i counting them from 0: the trainer
    passes its optimizer step and the dp rank (tp ranks share one stream, so they draw alike)."""
    for module in model.modules():
        noise = getattr(module, "gate_noise", None)
        if isinstance(noise, GateNoise):
            noise.step, noise.forwards = (step, stream), 0
