"""A job that goes wrong around a rank ends: collective timeouts name the group and the missing rank,
and ranks exit when torchrun is killed (no orphans). The rank side is tests/runtime_worker.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npu_parallel.parallel import watchdog
from npu_parallel.parallel.state import init_distributed
from npu_parallel.tools.launch import LaunchError, _rank_env, launch

from .dist import RANK_ENV

TIMEOUT_S = 5.0
# after the timeout: the check-in grace, torchrun noticing the failed rank and stopping the others
MARGIN_S = watchdog.grace_s(TIMEOUT_S) + 8.0


def test_collective_timeout_names_group_and_missing_rank(tmp_path):
    """4 ranks, tp=2: rank 1 never reaches its tp all-reduce. Rank 0 (waiting in it) names the tp group and
    rank 1; ranks 2 and 3 (waiting in a world barrier) name the world group and rank 1. Ends within the
    timeout plus a small margin, not torch's 30 minutes."""
    with pytest.raises(LaunchError) as info:
        launch("tests.runtime_worker:hang_in_tp", 4, str(tmp_path), 2, TIMEOUT_S, 1, timeout=300, env=RANK_ENV)
    ended = time.time()
    entered = min(float((tmp_path / f"enter{r}").read_text()) for r in (0, 2, 3))
    assert not (tmp_path / "enter1").exists()
    assert ended - entered < TIMEOUT_S + MARGIN_S, f"ended {ended - entered:.1f} s after the collective started"
    reports = info.value.reports
    assert reports and str(info.value).splitlines()[1] == reports[0]
    by_rank = {int(line[len(watchdog.REPORT_PREFIX) :].split(":")[0]): line for line in reports}
    assert by_rank[0].startswith(
        f"{watchdog.REPORT_PREFIX} 0: all_reduce on the tp group (ranks 0,1) timed out after 5 s: rank 1 did not arrive"
    ), by_rank[0]
    assert "waiting: rank 0 in all_reduce on tp" in by_rank[0]
    world = [line for r, line in by_rank.items() if r in (2, 3)]
    assert world, reports
    for line in world:  # timed out, or failed as rank 0 left first (gloo: "Connection closed by peer")
        how = r"(timed out after 5 s|failed \(.*\))"
        assert re.search(rf"barrier on the world group \(ranks 0-3\) {how}: rank 1 did not arrive", line), line
        assert "rank 0 in all_reduce on tp" in line and "rank 1 in" not in line, line


def test_stopped_rank_is_named_and_resumed_for_torchrun(tmp_path):
    """The issue's case: a rank stopped by SIGSTOP. torchrun's SIGTERM cannot end a stopped process (it waits
    30 s, then SIGKILLs); the rank that timed out sends its stopped sibling SIGCONT, so the job ends within
    the timeout plus the small margin."""
    with pytest.raises(LaunchError) as info:
        launch("tests.runtime_worker:hang_in_tp", 2, str(tmp_path), 2, TIMEOUT_S, 1, "stop", timeout=300, env=RANK_ENV)
    ended = time.time()
    assert ended - float((tmp_path / "enter0").read_text()) < TIMEOUT_S + MARGIN_S
    report, *late = info.value.reports
    assert report.startswith(
        f"{watchdog.REPORT_PREFIX} 0: all_reduce on the tp group (ranks 0,1) timed out after 5 s: rank 1 did not "
        "arrive (rank 1 stopped by a signal, resumed for the launcher to end)"
    ), report
    for line in late:  # rank 1, resumed, may reach its all-reduce before torchrun's SIGTERM lands
        assert line.startswith(f"{watchdog.REPORT_PREFIX} 1: all_reduce on the tp group (ranks 0,1) failed ("), line
        assert line.endswith("this rank arrived after the others had given up on it (rank 0 in all_reduce on tp)")


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the ranks")
def test_ranks_exit_when_torchrun_is_killed(tmp_path):
    """SIGKILL torchrun (it cannot forward anything): both ranks are gone within seconds. Rank 0 relies on
    init_distributed's prctl(PR_SET_PDEATHSIG), rank 1 on the portable getppid() poll."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "tests.runtime_worker", str(tmp_path)]
    env = _rank_env("tests.runtime_worker", RANK_ENV)
    torchrun = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    pids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 240
        while len(pids) < 2 and time.monotonic() < deadline and torchrun.poll() is None:
            for r in (0, 1):
                f = tmp_path / f"pid{r}"
                if r not in pids and f.is_file() and f.read_text().endswith("\n"):
                    pid, how = f.read_text().split()
                    pids[r] = int(pid)
                    assert how == ("prctl" if r == 0 else "poll"), (r, how)
            time.sleep(0.2)
        assert len(pids) == 2, f"the ranks did not start (torchrun exit code {torchrun.poll()})"
        torchrun.kill()
        torchrun.wait()
        killed = time.monotonic()
        while any(_alive(p) for p in pids.values()) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        left = [r for r, p in pids.items() if _alive(p)]
        assert not left, f"rank(s) {left} still running 10 s after torchrun was killed"
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_exit_with_parent_only_under_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert watchdog.exit_with_parent() == ""


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match=r"timeout_s=0 must be a positive number of seconds"):
        init_distributed(timeout_s=0)


def test_explain_ignores_what_is_not_a_collective():
    assert watchdog.explain(ValueError("bad")) is None  # also with no process group watched
    assert watchdog._span((0, 1, 2, 3)) == "0-3" and watchdog._span((1, 3)) == "1,3"
