"""The pipeline side of ``npu-parallel plan``: what each stage holds, how many micro-batches it keeps in flight,
the bubble, and the point-to-point traffic, stated so a reader can check them.

* The split is training's (:func:`npu_parallel.training.pipeline_split.resolve_split`: cost-balanced, the
  embedding on the first stage, the final norm, the head and DeepSeek-V3's MTP layers on the last).
* In flight: under 1F1B stage ``s`` of ``p`` holds the activations of ``min(m, p - s)`` micro-batches (the first
  stage the most), under GPipe all ``m``; the plan reports the stage whose card needs the most.
* Bubble: ``(p - 1) / (m + p - 1)`` of the step is idle (1F1B and GPipe alike), ``m`` the micro-batches per step
  (``--grad_accum``).
* P2P: each micro-batch's activations ``[B, S, H]`` forward and their gradient backward cross every stage
  boundary; a middle stage's card sends both, one per micro-batch each way.

Shapes: B micro-batch rows, S tokens per row, H hidden, m micro-batches per step, p stages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SCHEDULES", "Stage", "bubble", "in_flight", "stages"]

SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class Stage:
    """One stage's parameters at one tp size, before dp sharding (as :class:`~npu_parallel.tools.plan.Counts`),
    and what its activations are made of."""

    index: int
    dense: int
    experts: int
    layer_dense: int
    layer_experts: int
    lora_per_rank: int
    layers: int  # decoder layers on the stage
    dense_layers: int  # of which dense (not MoE)
    head: bool  # the last stage: final norm, LM head (and MTP layers)


def bubble(pp: int, micro: int) -> float:
    """Idle share of a step of ``micro`` micro-batches over ``pp`` stages."""
    return (pp - 1) / (micro + pp - 1) if pp > 1 else 0.0


def in_flight(schedule: str, stage: int, pp: int, micro: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pp_schedule={schedule!r}: the planner knows {', '.join(SCHEDULES)}")
    return micro if schedule == "gpipe" else min(micro, pp - stage)


def stages(
    config, layers: list[tuple[int, int, int]], embed: int, rest: tuple[int, int, int], pp: int, moe: list[bool]
) -> list[Stage]:
    """Each stage's share: ``layers`` (dense, experts, lora) per decoder layer, ``embed`` the embedding (first
    stage), ``rest`` (dense, experts, lora) of the norm, the head and the MTP layers (last stage); ``moe[i]``
    whether layer ``i`` is an MoE layer."""
    from npu_parallel.training.pipeline_split import resolve_split

    out = []
    ranges = resolve_split(config, pp).ranges()
    for s, (a, b) in enumerate(ranges):
        part = layers[a:b]
        last = s == len(ranges) - 1
        dense = sum(x[0] for x in part) + (embed if s == 0 else 0) + (rest[0] if last else 0)
        experts = sum(x[1] for x in part) + (rest[1] if last else 0)
        lora = sum(x[2] for x in part) + (rest[2] if last else 0)
        big = max(part, key=lambda x: x[0] + x[1])
        out.append(Stage(s, dense, experts, big[0], big[1], lora, b - a, sum(not m for m in moe[a:b]), last))
    return out
