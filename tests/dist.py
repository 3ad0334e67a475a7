"""Start N CPU ranks (gloo) from a test, torchrun-style: each gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*."""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, world: int, target: str, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # 2 cores, up to 4 ranks
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    module, name = target.rsplit(":", 1)
    result = getattr(importlib.import_module(module), name)(*args)
    if local_rank == 0:
        torch.save(result, out)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(world: int, target: str, *args, timeout: float = 420.0):
    """Run ``module:function(*args)`` on ``world`` spawned ranks; return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        env_backup = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        try:
            ctx = mp.start_processes(_entry, args=(world, target, args, out), nprocs=world, join=False,
                                     start_method="spawn")
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"{target} on {world} ranks did not finish in {timeout:.0f}s")
        finally:
            for k, v in env_backup.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return torch.load(out, weights_only=False)
