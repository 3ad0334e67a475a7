"""Where verify and audit jobs run: in this process at tp 1, in place inside torchrun, else on launched ranks.

At ``pp`` > 1 a launch starts ``tp x pp`` ranks (dp 1) and each job's state has ``pp`` pipeline stages.

A job is ``{"task": "verify" | "audit", "path": ..., "kwargs": {...}}``. :func:`run_jobs` runs several in ONE
launch of tp ranks (the start-up of torch and transformers is paid once), through
:func:`npu_parallel.tools.launch.launch` with :func:`jobs_on_rank` as the target.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.launch import launch, resolve
from npu_parallel.tools.verify_report import layout_name

__all__ = [
    "TASKS",
    "in_torchrun",
    "jobs_on_rank",
    "quiet",
    "random_batch",
    "rank_state",
    "run_jobs",
    "timed",
]

# task -> the per-rank function, called as fn(path, state, **kwargs); named, not imported: those modules use this one
TASKS = {"verify": "npu_parallel.tools.verify:verify_rank", "audit": "npu_parallel.tools.audit_run:audit_rank"}


def in_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank_state(pp: int = 1) -> ParallelState:
    """Inside torchrun: the process group (tp = world / pp, ``pp`` stages); else a single-rank state without one."""
    from npu_parallel.parallel.state import init_distributed, single_rank_state

    if in_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return init_distributed(int(os.environ["WORLD_SIZE"]) // pp, pp_size=pp)
    return single_rank_state()


def quiet() -> None:
    """No progress bars or per-load INFO lines in the tables' way (``npu-parallel -v`` keeps them)."""
    import logging

    from transformers.utils import logging as hf_logging

    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("npu_parallel").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def timed(what: str, tp: int, run: Callable[[Callable[[str], None] | None], list], progress=None, pp: int = 1) -> list:
    """``run(per-rank progress)`` at one tp size between a start and a done line to ``progress`` (if given).

    Lines: ``tp=2: {what} on 2 ranks``, each rank's start and finish, ``tp=2: done in 8.1 s``; inside torchrun
    every rank says its own (``rank 1: tp=2: ...``).
    """
    import time

    if progress is None:
        return run(None)
    name = layout_name(tp, pp)
    head = f"rank {os.environ['RANK']}: {name}" if in_torchrun() else name
    where = "in place" if in_torchrun() else "in this process" if tp * pp == 1 else f"on {tp * pp} ranks"
    progress(f"{head}: {what} {where}")
    t0 = time.perf_counter()
    out = run(lambda line: progress(f"{head}: {line}"))
    progress(f"{head}: done in {time.perf_counter() - t0:.1f} s")
    return out


def random_batch(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def jobs_on_rank(jobs: list[dict], state: ParallelState | None = None, pp: int = 1) -> list:
    """Every job on this rank, in order (the launch target); per job, this rank's result."""
    import torch.distributed as dist

    state = state or rank_state(pp)
    out = []
    for job in jobs:
        out.append(resolve(TASKS[job["task"]])(job["path"], state, **job.get("kwargs", {})))
        if dist.is_initialized():
            dist.barrier()
    return out


def run_jobs(
    tp: int,
    jobs: list[dict],
    timeout: float = 1800.0,
    progress: Callable[[str], None] | None = None,
    pp: int = 1,
) -> list:
    """Per job: a verify job's result (None on a non-zero rank inside torchrun), an audit job's per-rank list.

    tp x pp = 1 runs in this process; inside torchrun (``WORLD_SIZE`` set) the jobs run in place at
    tp = world / pp; otherwise ONE launch of ``tp x pp`` ranks runs them all (``progress`` gets a line as each
    rank starts and finishes). Raises RuntimeError when the ranks fail.
    """
    unknown = sorted({job["task"] for job in jobs} - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: expected one of {sorted(TASKS)}")
    if in_torchrun():
        per_rank = [jobs_on_rank(jobs, pp=pp)]  # this rank's own; rank 0 reports
    elif tp * pp == 1:
        from npu_parallel.parallel.state import single_rank_state

        per_rank = [jobs_on_rank(jobs, single_rank_state())]
    else:
        target = "npu_parallel.tools.jobs:jobs_on_rank"
        per_rank = launch(target, tp * pp, jobs, timeout=timeout, progress=progress, pp=pp)
    return [per_rank[0][i] if job["task"] == "verify" else [rank[i] for rank in per_rank] for i, job in enumerate(jobs)]
