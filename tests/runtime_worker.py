"""Rank-side functions of tests/test_lifetime.py: collectives that hang, ranks whose launcher dies."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from npu_parallel.parallel.collectives import reduce_from_tp
from npu_parallel.parallel.state import init_distributed


def hang_in_tp(out: str, tp: int, timeout_s: float, missing: int, how: str = "sleep") -> None:
    """Rank ``missing`` never reaches its tp all-reduce; the other tp groups all-reduce, then wait in a world barrier.

    The missing rank sleeps (``how="sleep"``) or stops itself with SIGSTOP (``"stop"``). Each rank writes
    ``enter{rank}`` (the time it entered its collective) to ``out`` first.
    """
    state = init_distributed(tp, timeout_s=timeout_s)
    if state.rank == missing:
        if how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(600)
    Path(out, f"enter{state.rank}").write_text(repr(time.time()))
    reduce_from_tp(torch.ones(4), state.tp)
    if missing not in state.tp_ranks:
        dist.barrier()


if __name__ == "__main__":
    # started by hand under torchrun (tests/test_lifetime.py): rank 1 watches its parent by polling, rank 0
    # leaves it to init_distributed (prctl); each writes "pid mechanism" to argv[1]/pid{rank}, then sleeps
    from npu_parallel.parallel.watchdog import exit_with_parent

    rank = int(os.environ["RANK"])
    if rank == 1:
        exit_with_parent("poll", interval_s=0.5)
    init_distributed(timeout_s=60)
    how = exit_with_parent()
    Path(sys.argv[1], f"pid{rank}").write_text(f"{os.getpid()} {how}\n")
    time.sleep(600)
