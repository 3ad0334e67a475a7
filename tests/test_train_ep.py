"""Fine-tuning with expert parallelism over several tp groups (ep > tp, FSDP2 of the experts over edp): the same
losses as ep = tp, exact resume, and a bad --ep_size refused in one line."""

import json
import subprocess
import sys

import pytest

from npu_parallel.checkpoint.manifest import MANIFEST

from .cli_runs import child_env
from .dist import run_ranks
from .test_train import BASE


def test_ep_above_tp_trains_like_ep_equal_tp_and_resumes_exactly(checkpoints, tmp_path):
    """World 4, tp 1, ep 2: dp 4 for the dense weights, edp 2 for the experts (each expert's gradient summed over
    its 2 holders and divided by 4), grad clipping by the global norm on. The losses and gradient norms match the
    ep = tp run; a run
    interrupted after step 3 and resumed from step-2 gives the uninterrupted run's losses bit for bit."""
    cfg = dict(BASE, model_path=str(checkpoints / "deepseek_v2"), tp_size=1, steps=4, grad_clip=0.5)
    ckpt = tmp_path / "ckpt"
    same, full, interrupted, resumed = run_ranks(
        4,
        "tests.train_worker:run_many",
        [
            dict(cfg, ep_size=1),
            dict(cfg, ep_size=2),
            dict(cfg, ep_size=2, stop_after=3, save_dir=str(ckpt), save_every=2),
            dict(cfg, ep_size=2, resume=str(ckpt / "step-2")),
        ],
    )
    manifest = json.loads((ckpt / "step-2" / MANIFEST).read_text())
    assert (manifest["tp_size"], manifest["ep_size"]) == (1, 2)
    assert full["losses"] == pytest.approx(same["losses"], abs=1e-5)
    # AdamW hides a gradient's scale from the losses; the global norm (the grad clipping's) does not
    norms = [[r["grad_norm"] for r in run["records"]] for run in (same, full)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    assert full["losses"][-1] < full["losses"][0]
    assert interrupted["losses"] == full["losses"][:3]
    assert resumed["steps"] == [3, 4]
    assert resumed["losses"] == full["losses"][2:]  # bit for bit


def test_bad_ep_size_is_one_line_exit_2(checkpoints):
    """Checked in init_distributed before the process group exists: one line naming the sizes that work."""
    argv = ["--model_path", str(checkpoints / "deepseek_v2"), "--steps", "1", "--ep_size", "2"]
    out = subprocess.run(
        [sys.executable, "-m", "npu_parallel.training.cli", *argv],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "python -m npu_parallel.training.cli: error: ep_size=2 must be a multiple of tp_size=1 that divides the world "
        "size 1 (an ep group is one or more whole tp groups); use one of [1]"
    )


def test_ep_size_below_one_is_refused_with_the_other_flags():
    from npu_parallel.training.config import TrainConfig, check_args
    from npu_parallel.training.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--ep_size 0: must be at least 1$"):
        check_args(TrainConfig(model_path="x", ep_size=0))
