"""``generate()`` on a converted model: every rank of a tp group picks the same token, the unconverted model's.

transformers samples each token with ``torch.multinomial`` on the rank's own default RNG, so tp ranks seeded
differently (torchrun's usual state) sample different tokens and go on silently out of step (transformers
#36634). A converted model's ``generate`` therefore appends one last logits processor, :class:`RankZeroSampler`,
after every processor and warper (temperature, top-k, top-p ...). It draws the token exactly as transformers
would (``softmax`` then ``multinomial``, or ``argmax`` when greedy) but from a generator that holds the default
RNG state of the first rank of the model's group, broadcast once per ``generate`` call; the first tp rank's
token is broadcast over the tp group; and the processor returns scores that allow only that token, so
transformers' own draw can pick nothing else. Under rank 0's seed the tokens are the unconverted model's; at
the end rank 0's default RNG is left where the unconverted model's ``generate`` would have left it.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import LogitsProcessor

from npu_parallel.parallel.state import Group

ATTR = "npu_parallel_generate"  # marks a model whose generate() is the one below


def _rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state for ``device`` (a CPU uint8 tensor)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return getattr(torch, device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)


def _broadcast(t: torch.Tensor, group: Group, device: torch.device) -> torch.Tensor:
    """``t`` as the group's first rank holds it (sent on ``device``: HCCL/NCCL move no CPU tensors)."""
    if group.size == 1:
        return t
    on = t.to(device)
    dist.broadcast(on, src=group.ranks[0], group=group.group)
    return on.to(t.device)


class RankZeroSampler(LogitsProcessor):
    """The last logits processor: this step's token [batch, 1], the same on every tp rank, as the only one allowed."""

    def __init__(self, tp: Group, rng_group: Group, do_sample: bool, comm_device: torch.device):
        self.tp, self.rng_group, self.do_sample, self.comm_device = tp, rng_group, do_sample, comm_device
        self.generator: torch.Generator | None = None  # made at the first step, on the device of the scores
        self.device: torch.device | None = None

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        """A generator holding the first rank's default RNG state for ``device``, on every rank of the group."""
        state = _broadcast(_rng_state(device), self.rng_group, self.comm_device)
        g = torch.Generator(device=device)
        g.set_state(state.cpu())
        self.device = device
        return g

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # scores: [batch, vocab] float32, after every other processor and warper
        if self.do_sample:
            if self.generator is None:
                self.generator = self._shared_generator(scores.device)
            probs = nn.functional.softmax(scores, dim=-1)  # what transformers' _sample draws from
            token = torch.multinomial(probs, num_samples=1, generator=self.generator)  # [batch, 1]
        else:
            token = scores.argmax(dim=-1, keepdim=True)  # [batch, 1]
        token = _broadcast(token, self.tp, self.comm_device)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, token, 0.0)  # softmax: one-hot at the token; multinomial and argmax pick it

    def finish(self) -> None:
        """Rank 0 of the group leaves generate with the RNG state the unconverted model's generate leaves."""
        if self.generator is not None and self.device is not None and self.rng_group.rank == 0:
            _set_rng_state(self.device, self.generator.get_state())


def _setting(name: str, generation_config: Any, model: nn.Module) -> Any:
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    return getattr(config, name, None)


def parallel_generate(model: nn.Module, tp: Group, ep: Group, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``generate`` with the token of every step chosen as :class:`RankZeroSampler` says."""
    base = type(model).generate  # type: ignore[attr-defined]
    if tp.size == 1 and ep.size == 1:
        return base(model, *args, **kwargs)
    if ep.size > tp.size:  # tp groups of one ep group meet in every MoE all-to-all: none may stop early
        kwargs.setdefault("synced_gpus", True)
    samplers: list[RankZeroSampler] = []
    own = type(model)._get_logits_processor  # type: ignore[attr-defined]
    comm_device = next(model.parameters()).device

    def get_logits_processor(*a: Any, **kw: Any) -> Any:
        processors = own(model, *a, **kw)
        config = kw.get("generation_config", a[0] if a else None)
        beams = int(_setting("num_beams", config, model) or 1)
        do_sample = bool(_setting("do_sample", config, model))
        if beams > 1:
            if do_sample:
                raise ValueError(
                    f"generate(num_beams={beams}, do_sample=True) on a model split over {tp.size} tp ranks: beam "
                    f"sampling would draw differently on each rank; use num_beams=1 or do_sample=False"
                )
            return processors  # beam search is deterministic: the gathered logits agree on every rank
        samplers.append(RankZeroSampler(tp, ep, do_sample, comm_device))
        processors.append(samplers[-1])
        return processors

    model._get_logits_processor = get_logits_processor  # type: ignore[assignment]
    try:
        return base(model, *args, **kwargs)
    finally:
        del model._get_logits_processor
        for sampler in samplers:
            sampler.finish()


def install_generate(model: nn.Module, tp: Group, ep: Group | None = None) -> None:
    """Make ``model.generate`` agree across the ranks of ``tp`` (and ``ep``); the class's generate is untouched."""
    base = getattr(type(model), "generate", None)
    if base is None or getattr(model, ATTR, False):
        return

    @functools.wraps(base)
    def generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return parallel_generate(self, tp, ep or tp, *args, **kwargs)

    object.__setattr__(model, "generate", types.MethodType(generate, model))
    object.__setattr__(model, ATTR, True)
