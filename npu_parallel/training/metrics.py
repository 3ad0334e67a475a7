"""Per-step training metrics: a line and a tqdm bar on rank 0, a JSONL file, a PNG loss curve at the end."""

from __future__ import annotations

import json
import logging
import math
import resource
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory, or this process's peak RSS on CPU."""
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


METRICS_FILE = "metrics.jsonl"


def finite_or_none(record: dict) -> dict:
    """The record with every non-finite float as None (JSON null): the file stays strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not a JSON object (a crash mid-write) is left out."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


class MetricsLog:
    """Rank 0's log of a run. A fresh run starts ``metrics.jsonl`` anew (the caller has refused or been told to
    overwrite an earlier run's); a resumed one keeps the lines up to its step and appends after them, and the
    loss curve is drawn from the file, so it covers the whole run."""

    def __init__(
        self,
        log_dir: str | Path | None,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        resume: bool = False,
    ):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.total_steps = total_steps
        self.path = Path(log_dir) / METRICS_FILE if (log_dir and enabled) else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume and self.path.is_file():
                kept = [
                    r for r in read_metrics(self.path) if isinstance(r.get("step"), int) and r["step"] <= start_step
                ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in map(finite_or_none, kept)))
            tmp.replace(self.path)
            if not resume:  # a fresh run's curve is drawn at its end; an earlier run's must not stand in for it
                (self.path.parent / "loss.png").unlink(missing_ok=True)
        self.records: list[dict] = []  # this process's steps
        self.plotted: list[int] = []  # the steps the loss curve was drawn from (the whole run's, read from the file)
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
                f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        aux = f" aux {record['aux_loss']:.4f}" if record.get("aux_loss") is not None else ""
        aux += f" mtp {record['mtp_loss']:.4f}" if record.get("mtp_loss") is not None else ""
        skipped = " | skipped (non-finite)" if record.get("skipped") else ""
        if record.get("load_max_over_mean"):
            skipped = f" | load max/mean {record['load_max_over_mean']:.2f}{skipped}"
        if record.get("eval_loss") is not None:
            ppl = record.get("eval_perplexity")
            skipped += f" | eval loss {record['eval_loss']:.4f} ppl " + (f"{ppl:.2f}" if ppl is not None else "inf")
        self.bar.write(
            f"step {record['step']:>5} | loss {_num(record['loss'])}{aux} | lr {record['lr']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
            f"peak {record['peak_mem_mb']:.0f} MB{skipped}{self._eta(record['step'])}"
        )
        self.bar.set_postfix_str(f"loss {_num(record['loss'])} | {record['tokens_per_s']:.0f} tok/s", refresh=False)
        self.bar.update(1)

    def _eta(self, step: int) -> str:
        """`` | eta H:MM:SS`` from this process's mean step time (the bar's ETA, for logs that are not a terminal)."""
        times = [r["step_s"] for r in self.records if isinstance(r.get("step_s"), int | float)]
        left = self.total_steps - step
        if left <= 0 or not times:
            return ""
        from tqdm import tqdm

        return f" | eta {tqdm.format_interval(left * sum(times) / len(times))}"

    def close(self) -> Path | None:
        """Close the bar and draw the loss curve of every step in the file (earlier segments of a resumed run too)."""
        self.bar.close()
        if not (self.enabled and self.path and self.path.is_file()):
            return None
        records = read_metrics(self.path)
        if not records:
            return None
        plot = plot_loss(self.path.parent / "loss.png", records)
        if plot is not None:
            self.plotted = [r["step"] for r in records if isinstance(r.get("step"), int)]
        return plot


def _num(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"


def plot_loss(out: Path, records: list[dict]) -> Path | None:
    """Loss (and aux loss) against step; skipped with a log line when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed (pip install npu_parallel[plot]); no loss curve")
        return None

    def series(key: str) -> tuple[list, list]:  # (steps, values) where the value is a finite number
        points = [(r.get("step"), r.get(key)) for r in records]
        kept = [(s, v) for s, v in points if isinstance(s, int) and isinstance(v, int | float) and math.isfinite(v)]
        return [s for s, _ in kept], [v for _, v in kept]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("loss"), marker="o", markersize=3, label="loss")
    eval_steps, eval_loss = series("eval_loss")
    if eval_loss:  # the second curve: the whole eval set's token-weighted loss
        ax.plot(eval_steps, eval_loss, marker="s", markersize=4, color="tab:green", label="eval loss")
        ax.legend(loc="upper right")
    aux_steps, aux = series("aux_loss")
    if aux:
        ax2 = ax.twinx()
        ax2.plot(aux_steps, aux, color="tab:orange", alpha=0.6, label="aux loss")
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
