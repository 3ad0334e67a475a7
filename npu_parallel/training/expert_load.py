"""Expert load you can see: per step and MoE layer, token-slots per expert summed over dp, in metrics.jsonl.

:class:`LoadMonitor` reads the load once per step (:func:`npu_parallel.moe.load.read_load`: one int64 all-reduce
on the device, one host read; every rank calls it), applies DeepSeek-V3's bias update when asked, and gives the
step's record its ``expert_load`` rows (min / max / mean slots per expert, coefficient of variation, dropped
slots of the static dispatcher) and ``load_max_over_mean`` (the worst layer's). Rank 0 warns when an expert got
no token for ``idle_steps`` steps in a row or a layer's max / mean passes ``max_ratio``, and at the end draws
``expert_load.png``: each layer's share of the slots per expert over the last ``window`` steps.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path

from torch import nn

from npu_parallel.moe.load import LoadReading, read_load, reset_load
from npu_parallel.training.plots import plot_heatmap

logger = logging.getLogger(__name__)

HEATMAP = "expert_load.png"
WINDOW = 100  # steps behind the heat map


def layer_stats(load: list[int], dropped: int) -> dict:
    """min / max / mean token-slots per expert, their coefficient of variation (std / mean), dropped slots."""
    n = len(load)
    mean = sum(load) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in load) / n if n else 0.0
    return {
        "min": min(load, default=0),
        "max": max(load, default=0),
        "mean": mean,
        "cv": math.sqrt(var) / mean if mean else 0.0,
        "dropped": dropped,
    }


class LoadMonitor:
    """The per-step expert-load record, its warnings and the end-of-run heat map (see the module docstring)."""

    def __init__(
        self,
        log_dir: str | Path | None,
        main: bool,
        *,
        idle_steps: int = 0,
        max_ratio: float = 0.0,
        bias_update_rate: float = 0.0,
        window: int = WINDOW,
        reader: Callable[..., LoadReading | None] | None = None,
    ):
        self.out = Path(log_dir) / HEATMAP if (log_dir and main) else None
        self.main, self.idle_steps, self.max_ratio = main, idle_steps, max_ratio
        self.bias_update_rate = bias_update_rate
        self.read = reader or read_load  # or the pipeline's: every stage's load (training/pipeline_run.py)
        self.window: deque[LoadReading] = deque(maxlen=window)
        self.idle: dict[tuple[int, int], int] = {}  # (layer row, expert) -> steps in a row without a token
        self.over: set[int] = set()  # layer rows above max_ratio at the last step (warned once per excursion)

    def reset(self, model: nn.Module) -> None:
        """Forget the load of passes that are not training steps (the JIT warmup)."""
        reset_load(model)

    def step(self, model: nn.Module, state, step: int, update: bool = True) -> dict:
        """The step's fields for metrics.jsonl (every rank calls it: one collective); ``update``: the optimizer
        stepped, so the routing bias may move too."""
        reading = self.read(model, state, bias_update_rate=self.bias_update_rate, update=update)
        if reading is None:
            return {}
        self.window.append(reading)
        rows = []
        for i, (layer, load, dropped) in enumerate(zip(reading.layers, reading.load, reading.dropped, strict=True)):
            rows.append({"layer": layer, **layer_stats(load, dropped)})
            if self.main:
                self._warn(step, i, layer, load, rows[-1])
        worst = max((r["max"] / r["mean"] for r in rows if r["mean"]), default=0.0)
        return {"expert_load": rows, "load_max_over_mean": worst}

    def _warn(self, step: int, row: int, layer: int | None, load: list[int], stats: dict) -> None:
        if self.idle_steps:
            for e, count in enumerate(load):
                run = 0 if count else self.idle.get((row, e), 0) + 1
                self.idle[(row, e)] = run
                if run == self.idle_steps:
                    logger.warning(
                        "step %d: layer %s expert %d got no token for %d steps in a row (--warn_idle_steps); "
                        "the load-balancing loss (--aux_loss_coef) or DeepSeek-V3's --bias_update_rate may help",
                        step,
                        layer,
                        e,
                        run,
                    )
        if self.max_ratio and stats["mean"]:
            ratio = stats["max"] / stats["mean"]
            if ratio > self.max_ratio and row not in self.over:
                logger.warning(
                    "step %d: layer %s busiest expert has %.1fx the mean load (%d vs %.1f slots; --warn_load_ratio %g)",
                    step,
                    layer,
                    ratio,
                    stats["max"],
                    stats["mean"],
                    self.max_ratio,
                )
                self.over.add(row)
            elif ratio <= self.max_ratio:
                self.over.discard(row)

    def close(self) -> Path | None:
        """Draw the heat map of the last window (rank 0, with a --log_dir and matplotlib); its path or None."""
        if self.out is None or not self.window:
            return None
        last = self.window[-1]
        totals = [[0] * len(r) for r in last.load]
        for reading in self.window:
            if reading.paths != last.paths:
                continue
            for row, load in zip(totals, reading.load, strict=True):
                for e, x in enumerate(load):
                    row[e] += x
        shares = [[x / (sum(row) or 1) for x in row] for row in totals]
        return plot_heatmap(
            shares,
            [str(layer) for layer in last.layers],
            self.out,
            f"share of each layer's token-slots per expert, last {len(self.window)} steps",
            "share",
        )
