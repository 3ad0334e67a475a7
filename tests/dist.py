"""Start N CPU ranks (gloo) from a test with torchrun (npu_parallel.tools.launch); rank 0's result comes back."""

from __future__ import annotations

from npu_parallel.tools.launch import launch

# 2 cores, up to 4 ranks: one thread each, whatever the caller's environment says; no progress bars
RANK_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def run_ranks(world: int, target: str, *args, timeout: float = 420.0):
    """Run ``module:function(*args)`` on ``world`` ranks; return rank 0's result."""
    return launch(target, world, *args, timeout=timeout, env=RANK_ENV)[0]
