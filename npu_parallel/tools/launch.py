"""Run ``package.module:function`` on N ranks with torchrun and return every rank's result.

``launch("pkg.mod:fn", 2, a, b=1)`` runs
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m npu_parallel.tools.launch DIR``: torchrun
gives each rank RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, and the entry point at the bottom of this module imports
``fn``, calls ``fn(a, b=1)``, and pickles its return value into ``DIR``, a private temp dir. A rank's stdout
and stderr go to ``DIR/rank{r}.log``; their tails are in the error when a launch fails. The ranks import
npu_parallel and the target's package from where this process imports them. The launcher knows no task:
tests, ``npu-parallel verify``/``audit`` and the benchmarks all start their ranks through it.

``nodes=N`` starts N torchrun processes of ``nprocs / N`` ranks each (``--nnodes N --node_rank R``,
rendezvous on loopback): a multi-node job on one machine, as the multi-node tests run it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LaunchError", "launch", "resolve", "run_module"]

# what an enclosing torchrun job sets: a nested launch must start its own, standalone
INHERITED = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# defaults for CPU ranks (one thread each, no progress bars in the logs); the caller's environment wins
RANK_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
TAIL_CHARS = 3000
KILL_GRACE_S = 10.0


class LaunchError(RuntimeError):
    """The ranks failed or timed out; the message names the ranks and ends with the tails of their output."""

    def __init__(
        self,
        message: str,
        exit_code: int | None,
        failed: list[int],
        output: dict[int, str],
        reports: list[str] | None = None,
    ):
        super().__init__(message)
        self.exit_code = exit_code  # torchrun's; None on timeout
        self.failed = failed  # ranks without a result
        self.output = output  # rank -> tail of its stdout and stderr (the failed ranks', else all)
        self.reports = reports or []  # the ranks' collective-failure lines (npu_parallel.parallel.watchdog)


def resolve(target: str) -> Any:
    """The function that ``"package.module:function"`` names."""
    module, sep, name = target.partition(":")
    if not (sep and module and name):
        raise ValueError(f"target {target!r}: expected 'package.module:function'")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def launch(
    target: str,
    nprocs: int,
    *args: Any,
    timeout: float = 1800.0,
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    nodes: int = 1,
    **kwargs: Any,
) -> list:
    """``target(*args, **kwargs)`` on ``nprocs`` torchrun ranks; their return values in rank order.

    ``env`` adds to (and wins over) the ranks' environment. ``progress`` gets a line as each rank starts
    ("rank 1 started") and as it finishes ("rank 1 finished"). Raises :class:`LaunchError` (a RuntimeError)
    when a rank fails or the launch outlives ``timeout`` seconds; then the whole process group is killed.
    """
    module, sep, name = target.partition(":")
    if not (sep and module and name):
        raise ValueError(f"target {target!r}: expected 'package.module:function'")
    if nprocs < 1:
        raise ValueError(f"nprocs={nprocs}: must be a positive integer")
    if nodes < 1 or nprocs % nodes:
        raise ValueError(f"nodes={nodes}: must be a positive divisor of nprocs={nprocs}")
    with tempfile.TemporaryDirectory(prefix="npu-parallel-launch-") as tmp:
        work = Path(tmp)
        with open(work / "call.pkl", "wb") as f:
            pickle.dump((target, args, kwargs), f)
        cmds = [
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *node,
                "--nproc_per_node",
                str(nprocs // nodes),
                "-m",
                "npu_parallel.tools.launch",
                str(work),
            ]
            for node in _node_args(nodes)
        ]
        log = work / "torchrun.log"
        rc = _run(cmds, _rank_env(module, env), log, timeout, _Watcher(work, nprocs, progress))
        missing = [r for r in range(nprocs) if not (work / f"rank{r}.pkl").is_file()]
        if rc is None or rc != 0 or missing:
            raise _error(f"{target} on {nprocs} rank{'s' if nprocs > 1 else ''}", nprocs, rc, timeout, missing, work)
        results = []
        for r in range(nprocs):
            with open(work / f"rank{r}.pkl", "rb") as f:
                results.append(pickle.load(f))  # written by our own ranks into our private dir
        return results


class _Watcher:
    """Reports each rank's start (its log file appears) and finish (its result file appears) once."""

    def __init__(self, work: Path, nprocs: int, progress: Callable[[str], None] | None):
        self.work, self.nprocs, self.progress = work, nprocs, progress
        self.seen: set[tuple[int, str]] = set()

    def __call__(self) -> None:
        if self.progress is None:
            return
        for r in range(self.nprocs):
            for suffix, what in ((".log", "started"), (".pkl", "finished")):
                if (r, what) not in self.seen and (self.work / f"rank{r}{suffix}").exists():
                    self.seen.add((r, what))
                    self.progress(f"rank {r} {what}")


def _node_args(nodes: int) -> list[list[str]]:
    """torchrun's rendezvous arguments, one list per node: standalone, or N nodes meeting on loopback."""
    if nodes == 1:
        return [["--standalone"]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    meet = ["--nnodes", str(nodes), "--master_addr", "127.0.0.1", "--master_port", port]
    return [[*meet, "--node_rank", str(r)] for r in range(nodes)]


def _run(
    cmds: list[list[str]], env: dict[str, str], log: Path, timeout: float, tick: Callable[[], None] = lambda: None
) -> int | None:
    """The torchrun processes' exit code (the first non-zero one), or None on timeout; ``tick()`` about every
    0.2 s while they run.

    Each torchrun runs in its own session, so that one signal reaches it and its helpers (the ranks have their
    own sessions, and exit when torchrun does: :func:`npu_parallel.parallel.watchdog.exit_with_parent`).
    """
    deadline = time.monotonic() + timeout
    with open(log, "wb") as out:
        procs = [
            subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            for cmd in cmds
        ]
        try:
            while True:
                codes = [p.poll() for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                if failed or all(c == 0 for c in codes):
                    tick()
                    return failed[0] if failed else 0
                tick()
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:  # timeout, a failed node, or an exception (Ctrl-C) in this process
                    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)  # a rank that ignored SIGTERM, e.g. stuck in a collective
    except ProcessLookupError:
        pass
    proc.wait()


def run_module(
    module_argv: list[str],
    nprocs: int,
    *,
    defaults: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE ARGS...`` in the foreground:
    the ranks write to this process's stdout and stderr; returns torchrun's exit code. ``defaults`` replaces
    RANK_DEFAULTS (the caller's environment wins over them, ``env`` over both). Ctrl-C or SIGTERM here stops
    torchrun and its ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *_node_args(1)[0], "--nproc_per_node", str(nprocs)]
    env = _rank_env(module_argv[0], env, RANK_DEFAULTS if defaults is None else defaults)
    proc = subprocess.Popen([*cmd, "-m", *module_argv], env=env, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        return proc.wait()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            _kill_group(proc)


def _rank_env(module: str, extra: dict[str, str] | None, defaults: dict[str, str] = RANK_DEFAULTS) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in INHERITED and not k.startswith("TORCHELASTIC_")}
    for key, value in defaults.items():
        env.setdefault(key, value)
    paths = _import_roots(module) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


def _import_roots(module: str) -> list[str]:
    """Folders the ranks need first on their path to import this npu_parallel and the target's package."""
    roots = [str(Path(__file__).resolve().parents[2])]
    top = module.split(".")[0]
    if top == "__main__":
        raise ValueError(f"target module {module!r}: the ranks cannot import __main__; name the module by its name")
    spec = importlib.util.find_spec(top)
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if locations:
            roots.append(str(Path(locations[0]).resolve().parent))
        elif spec.origin and Path(spec.origin).is_file():
            roots.append(str(Path(spec.origin).resolve().parent))
    return roots


def _tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return text if len(text) <= chars else "..." + text[-chars:]


def _error(what: str, nprocs: int, rc: int | None, timeout: float, missing: list[int], work: Path) -> LaunchError:
    """The failure, with the output of the ranks without a result (of all ranks if every one has a result)."""
    output = {r: _tail(work / f"rank{r}.log").rstrip() for r in (missing or range(nprocs))}
    if rc is None:
        head = f"{what} did not finish in {timeout:g} s (killed)"
    else:
        ranks = ", ".join(map(str, missing)) or "none"
        head = f"{what} failed: torchrun exit code {rc}, no result from rank(s) {ranks}"
    reports = _reports(work, nprocs)
    parts = [head, *reports] + [f"--- rank {r} output (tail) ---\n{text}" for r, text in list(output.items())[:2]]
    parts.append(f"--- torchrun output (tail) ---\n{_tail(work / 'torchrun.log').rstrip()}")
    return LaunchError("\n".join(parts), rc, missing, output, reports)


def _reports(work: Path, nprocs: int) -> list[str]:
    """Every rank's collective-failure line (which group, which ranks did not arrive), in rank order."""
    from npu_parallel.parallel.watchdog import REPORT_PREFIX

    found = []
    for r in range(nprocs):
        try:
            text = (work / f"rank{r}.log").read_text(errors="replace")
        except FileNotFoundError:
            continue
        found += [line for line in text.splitlines() if line.startswith(REPORT_PREFIX)]
    return found


# -- the rank side ------------------------------------------------------------------------------------------


def _redirect_output(path: Path) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def rank_main(work: str) -> int:
    """One rank: call the target with the pickled arguments, pickle its result, leave the process group."""
    from npu_parallel.parallel.watchdog import exit_with_parent

    exit_with_parent()  # torchrun killed: this rank goes too
    work_dir = Path(work)
    rank = int(os.environ["RANK"])
    _redirect_output(work_dir / f"rank{rank}.log")
    with open(work_dir / "call.pkl", "rb") as f:
        target, args, kwargs = pickle.load(f)
    result = resolve(target)(*args, **kwargs)
    part = work_dir / f"rank{rank}.pkl.part"
    with open(part, "wb") as f:
        pickle.dump(result, f)
    os.replace(part, work_dir / f"rank{rank}.pkl")
    import torch.distributed as dist

    from npu_parallel.parallel.state import destroy_distributed

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or "RANK" not in os.environ:
        sys.exit("usage: started by npu_parallel.tools.launch.launch() under torchrun, not by hand")
    code = rank_main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is written and the group destroyed: skip the interpreter's teardown, where torch's C++ threads
    # (gloo, the store) now and then abort in static destructors ("terminate called without an active
    # exception", exit -6) after the work is done, failing a launch that succeeded.
    os._exit(code)
