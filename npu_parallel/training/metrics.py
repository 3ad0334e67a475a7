"""Per-step training metrics: a line and a tqdm bar on rank 0, a JSONL file, a PNG loss curve at the end."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory, or this process's peak RSS on CPU."""
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    def __init__(self, log_dir: str | Path | None, enabled: bool, total_steps: int, start_step: int = 0):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl" if (log_dir and enabled) else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        # disable=None switches the bar off when stderr is not a terminal (logs stay readable)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=None if enabled else True,
            dynamic_ncols=True,
        )

    def step(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        aux = f" aux {record['aux_loss']:.4f}" if record.get("aux_loss") is not None else ""
        self.bar.write(
            f"step {record['step']:>5} | loss {record['loss']:.4f}{aux} | lr {record['lr']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
            f"peak {record['peak_mem_mb']:.0f} MB"
        )
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        self.bar.update(1)

    def close(self) -> Path | None:
        self.bar.close()
        if not (self.enabled and self.path and self.records):
            return None
        return plot_loss(self.path.parent / "loss.png", self.records)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(out: Path, records: list[dict]) -> Path | None:
    """Loss (and aux loss) against step; skipped with a log line when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed (pip install npu_parallel[plot]); no loss curve")
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], marker="o", markersize=3, label="loss")
    if any(r.get("aux_loss") is not None for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("aux_loss") or 0.0 for r in records], color="tab:orange", alpha=0.6, label="aux loss")
        ax2.set_ylabel("aux loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("npu_parallel fine-tuning")
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
