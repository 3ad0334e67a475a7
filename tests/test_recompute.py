"""Selective recomputation (issue 23 pt 6): ``--recompute experts|attention|full`` gives the gradients of no
recomputation (the same operations run again) and keeps fewer activations for the backward, also under FSDP2."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import npu_parallel
from npu_parallel.parallel.data_parallel import data_parallel, local_tensor
from npu_parallel.training.config import TrainConfig, check_args
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.recompute import apply_recompute, saved_bytes

from .common import seeded_ids


@pytest.fixture
def state():
    """One rank's state (FSDP2 needs its process group); a group this test made is gone after it."""
    ours = not dist.is_initialized()
    yield npu_parallel.init_distributed()
    if ours and dist.is_initialized():
        dist.destroy_process_group()


def _run(path, mode: str, fsdp: bool, state):
    model = npu_parallel.load_pretrained(path, state, dtype=torch.float32, progress=False).train()
    count = apply_recompute(model, mode) if mode != "none" else 0
    if fsdp:
        data_parallel(model, state, precision="fp32")
    ids = seeded_ids(model.config.vocab_size, 2, 24, 5)
    # use_cache=False as training/losses.py calls it; the weights (this rank's shards under FSDP2) not counted
    loss, saved = saved_bytes(model, input_ids=ids, labels=ids, use_cache=False)
    loss.backward()
    grads = {n: local_tensor(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved, count


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp2"])
def test_recompute_gives_the_same_gradients_and_keeps_less(checkpoints, fsdp, state):
    path = checkpoints / "deepseek_v2"
    base_loss, base_grads, base_saved, _ = _run(path, "none", fsdp, state)
    for mode in ("experts", "attention", "full"):
        loss, grads, saved, count = _run(path, mode, fsdp, state)
        assert count > 0, mode
        assert loss == base_loss, mode
        assert grads.keys() == base_grads.keys(), mode
        for name, g in grads.items():
            torch.testing.assert_close(g, base_grads[name], rtol=0, atol=1e-6, msg=f"{mode} {name}")
        assert saved < base_saved, (mode, saved, base_saved)


def test_recompute_flag_is_checked():
    with pytest.raises(ConfigError, match="--recompute 'layers': must be one of none, experts, attention, full"):
        check_args(TrainConfig(model_path="m", recompute="layers"))
    with pytest.raises(ConfigError, match="--gradient_checkpointing with --recompute experts"):
        check_args(TrainConfig(model_path="m", recompute="experts", gradient_checkpointing=True))
