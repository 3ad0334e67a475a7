"""What a rank does when the job goes wrong around it: a collective that times out, a launcher that dies.

**Collective timeouts.** On gloo a collective that outlives its group's timeout raises a RuntimeError in the
waiting rank ("Timed out waiting 5000ms for recv operation") that names neither the group nor the rank it
waited for. :func:`explain` turns such an exception into one line that does: the group and the op come from
the ``torch.distributed`` frame of the exception's traceback (its ``group`` argument, matched against the
groups :func:`watch` registered), the missing ranks from a check-in on the job's TCP store: every rank whose
collective failed writes its key, waits a short grace, and the members of the group without a key are the
ranks that never reached a collective (stopped, hung, crashed, or computing something else). :func:`watch`
(called by ``init_distributed``) installs a ``sys.excepthook`` that prints that line after the traceback
and ends the process at once (a broken gloo group can hang its destructors). NCCL and HCCL time out in
their own watchdog thread, which aborts the process and names the group by the ``group_desc`` given here.

A missing rank that is a stopped sibling process (SIGSTOP) gets SIGCONT, so that torchrun's SIGTERM ends it
at once rather than after torchrun's 30 s grace.

**Launcher death.** :func:`exit_with_parent` makes a rank started by torchrun get SIGTERM when torchrun
dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread that polls ``os.getppid()``), so that killing
torchrun never leaves ranks running as orphans.

Only the standard library is imported at module level: the launcher's rank side imports this first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REPORT_PREFIX", "exit_with_parent", "explain", "unwatch", "watch"]

REPORT_PREFIX = "collective failure on rank"  # every line explain() returns starts with it
KEY_PREFIX = "npu_parallel/collective_failure"
WHO_PREFIX = "npu_parallel/rank_process"  # rank -> "host pid parent-pid", written by watch()
_C10D_FILE = os.path.join("torch", "distributed", "distributed_c10d.py")
# gloo's own texts for a timed-out wait and for a peer that gave up (closed its side); DDP's reducer raises these
_FAILURE_TEXTS = ("Timed out waiting", "pair closure", "Connection closed by peer", "Connection reset by peer")
PR_SET_PDEATHSIG = 1


@dataclass
class _Watch:
    rank: int
    world_size: int
    timeout_s: float | None
    groups: list[tuple[str, Any, tuple[int, ...]]] = field(default_factory=list)  # (name, process group, ranks)
    incidents: int = 0


_watch: _Watch | None = None
_parent_watch = ""


def grace_s(timeout_s: float | None) -> float:
    """How long a failed rank waits for the others to check in: 10% of the timeout, within [2 s, 10 s]."""
    return min(10.0, max(2.0, 0.1 * (timeout_s if timeout_s is not None else 1800.0)))


def watch(rank: int, world_size: int, timeout_s: float | None, groups: list[tuple[str, Any, tuple[int, ...]]]) -> None:
    """Register this rank's process groups by name (``[("tp", pg, ranks), ...]``) and install the excepthook."""
    global _watch
    if world_size < 2:
        return
    _watch = _Watch(rank, world_size, timeout_s, list(groups))
    try:
        _store().set(f"{WHO_PREFIX}/{rank}", f"{socket.gethostname()} {os.getpid()} {os.getppid()}")
    except Exception:  # no store (a group the user built by hand): stopped ranks are then left to the launcher
        pass
    if getattr(sys.excepthook, "_npu_parallel", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        line = None
        try:
            line = explain(value, restore_sigterm=False) if isinstance(value, Exception) else None
        except Exception as exc:  # the diagnosis must never hide the original error
            line = f"{REPORT_PREFIX} {rank}: (no diagnosis: {type(exc).__name__}: {exc})"
        previous(kind, value, tb)
        if line is None:
            return
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # a group whose collective timed out can block in its destructors; nothing is left to clean

    hook._npu_parallel = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def unwatch() -> None:
    """Forget the registered groups (the process group is going: a group left referenced dies at exit)."""
    global _watch
    _watch = None


def _collective_frame(exc: BaseException) -> tuple[str, Any] | None:
    """(op, process group) of the innermost ``torch.distributed`` collective the traceback passes through."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith(_C10D_FILE) and "group" in frame.f_locals:
            found = (frame.f_code.co_name, frame.f_locals["group"])
        tb = tb.tb_next
    return found


def _short(exc: BaseException) -> str:
    """The error's first sentence, without gloo's ``[source.cc:123]`` prefix."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ", 1)[0].rstrip(".")


def _is_failure_text(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _FAILURE_TEXTS)


def _span(ranks: tuple[int, ...] | list[int]) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _name_group(w: _Watch, pg: Any) -> tuple[str, tuple[int, ...]]:
    import torch.distributed as dist

    if pg is None:
        pg = dist.group.WORLD
    for name, known, ranks in w.groups:
        if known is pg:
            return name, ranks
    try:
        return "a process group", tuple(dist.get_process_group_ranks(pg))
    except Exception:
        return "an unknown process group", tuple(range(w.world_size))


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process from /proc (Linux), None when unknown."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _resume_stopped(missing: list[int]) -> list[int]:
    """Missing ranks that are our siblings (same host, same launcher) stopped by a signal (SIGSTOP, Ctrl-Z):
    send them SIGCONT, so that the SIGTERM torchrun sends next ends them at once instead of after its 30 s
    grace. Never touches a process stopped by a debugger (state 't'). Returns the ranks resumed."""
    resumed = []
    store = _store()
    for r in missing:
        try:
            host, pid, parent = store.get(f"{WHO_PREFIX}/{r}").decode().split()
        except Exception:
            continue
        stat = _proc_stat(int(pid))
        if host == socket.gethostname() and int(parent) == os.getppid() and stat == ("T", os.getppid()):
            os.kill(int(pid), signal.SIGCONT)
            resumed.append(r)
    return resumed


def _check_in(w: _Watch, what: str, members: tuple[int, ...], wait_s: float) -> tuple[dict[int, str], set[int]]:
    """Write this rank's key, wait up to ``wait_s`` for the members' keys.

    Returns member -> what it was waiting in, and the members that had checked in before this rank did.
    """
    store = _store()
    base = f"{KEY_PREFIX}/{w.incidents}"
    w.incidents += 1
    before = {r for r in members if r != w.rank and store.check([f"{base}/{r}"])}
    store.set(f"{base}/{w.rank}", what)
    seen: dict[int, str] = {}
    deadline = time.monotonic() + wait_s
    while True:
        for r in members:
            if r not in seen and store.check([f"{base}/{r}"]):
                seen[r] = store.get(f"{base}/{r}").decode()
        if set(members) <= set(seen) or time.monotonic() >= deadline:
            return seen, before
        time.sleep(0.1)


def _defer_sigterm() -> Any:
    """torchrun SIGTERMs every rank when the first one exits: let this rank finish its (bounded) check-in.

    Returns the handler to restore (None when not on the main thread, where signals cannot be set).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda *_: None)


def explain(exc: BaseException, *, restore_sigterm: bool = True) -> str | None:
    """One line naming the op, the group, its ranks and the ranks that did not arrive; None if not a collective's.

    Collective: the exception went through a ``torch.distributed`` collective, or carries gloo's timeout or
    closed-connection text (DDP's C++ reducer). Waits up to :func:`grace_s` for the other ranks to check in,
    with SIGTERM ignored meanwhile (restored afterwards unless ``restore_sigterm=False``: the excepthook exits).
    """
    w = _watch
    if w is None:
        return None
    frame = _collective_frame(exc) if isinstance(exc, RuntimeError) else None
    if frame is None and not _is_failure_text(exc):
        return None
    first = _short(exc)
    timed_out = "Timed out" in first or "timed out" in first or "timeout" in first.lower()
    if frame is not None:
        op, pg = frame
        name, members = _name_group(w, pg)
        where = f"{op} on the {name} group (ranks {_span(members)})"
        what = f"{op} on {name}"
    else:
        name, members = "", tuple(range(w.world_size))
        where, what = "a collective outside Python (e.g. DDP's gradient all-reduce)", "a collective"
    previous = _defer_sigterm()
    try:
        seen, before = _check_in(w, what, members, grace_s(w.timeout_s))
    except Exception as err:  # the store itself is gone (the launcher died): say what is known
        return f"{REPORT_PREFIX} {w.rank}: {where} failed ({first}); the other ranks could not be asked ({err})"
    finally:
        if previous is not None and restore_sigterm:
            signal.signal(signal.SIGTERM, previous)
    missing = [r for r in members if r not in seen]
    if not name and missing:  # group unknown: the smallest of this rank's groups holding every missing rank
        holding = [(len(ranks), n, ranks) for n, _, ranks in w.groups if set(missing) <= set(ranks)]
        if holding:
            _, n, ranks = min(holding)
            where = f"a collective outside Python, on the {n} group (ranks {_span(ranks)}) by elimination"
    how = f"timed out after {w.timeout_s:g} s" if timed_out and w.timeout_s is not None else f"failed ({first})"
    waiting = "; ".join(f"rank {r} in {seen[r]}" for r in sorted(seen) if r in members)
    if missing:
        try:
            stopped = _resume_stopped(missing)
        except Exception:
            stopped = []
        why = (
            f"rank{'s' if len(stopped) > 1 else ''} {_span(stopped)} stopped by a signal, resumed for the launcher "
            "to end"
            if stopped
            else "stopped, hung, crashed or busy outside collectives"
        )
        return (
            f"{REPORT_PREFIX} {w.rank}: {where} {how}: rank{'s' if len(missing) > 1 else ''} {_span(missing)} "
            f"did not arrive ({why}); waiting: {waiting}"
        )
    others = set(members) - {w.rank}
    if not timed_out and others and others <= before:
        return (
            f"{REPORT_PREFIX} {w.rank}: {where} {how}: this rank arrived after the others had given up on it "
            f"({'; '.join(f'rank {r} in {seen[r]}' for r in sorted(others) if r in seen)})"
        )
    return (
        f"{REPORT_PREFIX} {w.rank}: {where} {how}: every rank of the group was waiting in a collective "
        f"({waiting}): they do not call the same collectives in the same order"
    )


# -- launcher death ------------------------------------------------------------------------------------------


def _poll_parent(parent: int, interval_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGTERM)


def exit_with_parent(mechanism: str = "auto", interval_s: float = 1.0) -> str:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set), get SIGTERM when the launcher dies; returns how.

    ``"prctl"`` (Linux: the kernel signals this process when its parent exits), ``"poll"`` (a daemon thread
    compares ``os.getppid()`` every ``interval_s``), ``""`` when not under torchrun. ``mechanism="auto"``
    prefers prctl. The first call of a process decides; later calls return what it chose.
    """
    global _parent_watch
    if _parent_watch or "TORCHELASTIC_RUN_ID" not in os.environ:
        return _parent_watch
    if mechanism not in ("auto", "prctl", "poll"):
        raise ValueError(f"mechanism={mechanism!r}: expected 'auto', 'prctl' or 'poll'")
    parent = os.getppid()
    if parent == 1:  # the launcher is already gone
        os.kill(os.getpid(), signal.SIGTERM)
    how = "poll"
    if mechanism != "poll" and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0:
            how = "prctl"
        if os.getppid() != parent:  # the launcher died between getppid() and prctl()
            os.kill(os.getpid(), signal.SIGTERM)
    if how == "poll":
        poll = threading.Thread(target=_poll_parent, args=(parent, interval_s), name="npu-parallel-parent", daemon=True)
        poll.start()
    _parent_watch = how
    return how
