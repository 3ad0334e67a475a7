"""Heat maps for the training log and the tools (layer x expert): one drawing routine, matplotlib optional."""

from __future__ import annotations

import math
from pathlib import Path

from npu_parallel.training.metrics import save_figure


def plot_heatmap(grid: list[list[float]], rows: list[str], out: str | Path, title: str, label: str = "") -> Path | None:
    """``grid[row][column]`` (rows of unequal length padded blank) as a heat map; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    width = max((len(r) for r in grid), default=0)
    values = [[float(v) for v in r] + [math.nan] * (width - len(r)) for r in grid]
    fig, ax = plt.subplots(figsize=(min(16, 3 + width * 0.15), 1.5 + 0.35 * len(grid)))
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    return save_figure(fig, out)
