"""torch_npu installed but CANN not sourced, simulated on CPU; the allocator variables never conflict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from npu_parallel.parallel import device

from .npu_reference import CANN_ERROR, plant_broken_torch_npu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def broken_torch_npu(tmp_path):
    """A torch_npu that imports like the real one without CANN, with its ``torch.backends`` entry point."""
    plant_broken_torch_npu(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    return env


def _run(env, *args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_import_error_says_cann_is_not_sourced(broken_torch_npu):
    run = _run(broken_torch_npu, "-c", "import npu_parallel; npu_parallel.init_distributed")
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: torch_npu is installed but CANN is not sourced"), run.stderr
    assert CANN_ERROR in last and "set_env.sh" in last


def test_env_says_cann_is_not_sourced_in_one_line(broken_torch_npu):
    run = _run(broken_torch_npu, "-m", "npu_parallel", "env")
    assert run.returncode == 2, run.stderr
    assert "torch_npu is installed but CANN is not sourced" in run.stderr and "Traceback" not in run.stderr


def test_every_cli_verb_says_it_in_one_line(broken_torch_npu, tmp_path):
    run = _run(broken_torch_npu, "-m", "npu_parallel", "inspect", str(tmp_path))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "npu-parallel inspect: error: torch_npu is installed but CANN is not sourced" in run.stderr


def test_other_errors_are_not_mistaken_for_it():
    from npu_parallel._cann import cann_not_sourced

    assert cann_not_sourced(RuntimeError("ACL stream synchronize failed on the ascend device")) is None
    assert cann_not_sourced(ImportError("No module named 'safetensors'")) is None
    wrapped = RuntimeError("Failed to load the backend extension: torch_npu. You can disable ...")
    wrapped.__cause__ = ImportError("libascendcl.so: cannot open shared object file")
    assert "libascendcl.so" in cann_not_sourced(wrapped)


def test_torch_npu_failing_after_torch_is_reported_the_same_way(broken_torch_npu):
    """With torch's autoload off, torch imports; our own guarded import of torch_npu names the cause."""
    env = {**broken_torch_npu, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    code = "from npu_parallel.parallel import device; assert device.torch_npu_module() is None"
    run = _run(env, "-c", code)
    assert run.returncode == 0, run.stderr
    assert "torch_npu is installed but CANN is not sourced" in run.stderr


def test_allocator_default_never_conflicts_with_the_users_setting():
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    applied = device.apply_hccl_defaults(env)
    assert "PYTORCH_NPU_ALLOC_CONF" not in env and "PYTORCH_NPU_ALLOC_CONF" not in applied  # 2.13+ refuse both
    env = {}
    assert device.apply_hccl_defaults(env)["PYTORCH_NPU_ALLOC_CONF"] == "max_split_size_mb:128"
    assert "TORCH_NPU_ALLOC_CONF" not in env  # read by no torch_npu release
    env = {"PYTORCH_NPU_ALLOC_CONF": "mine"}
    device.apply_hccl_defaults(env)
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "mine"
