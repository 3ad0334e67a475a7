"""Rank worker: training runs at pp 1 and pp 2 (tests/test_pipeline_train.py), each job a TrainConfig's kwargs."""

from __future__ import annotations

from npu_parallel.training.errors import ConfigError, NonFiniteError
from npu_parallel.training.loop import TrainConfig, train


def run(jobs: list[dict]) -> list[dict]:
    """Per job: the step losses, grad norms, aux and MTP losses, expert load rows and the last checkpoint (or the
    ConfigError or NonFiniteError a job raised, on every rank alike)."""
    out = []
    for kwargs in jobs:
        try:
            r = train(TrainConfig(**kwargs))
        except (ConfigError, NonFiniteError) as exc:
            out.append({"error": str(exc)})
            continue
        records = r["records"]
        out.append(
            {
                "losses": r["losses"],
                "norms": [rec["grad_norm"] for rec in records],
                "aux": [rec["aux_loss"] for rec in records],
                "mtp": [rec["mtp_loss"] for rec in records],
                "load": [rec.get("expert_load") for rec in records],
                "checkpoint": r["checkpoint"],
                "trainable": r["param_dtypes"]["trainable"],
            }
        )
    return out
