"""Op audit: record NPU-hostile ops, host syncs and collectives issued by real forward/backward code on CPU.

Usage::

    with OpAudit(model) as audit:
        loss = model(**batch).loss
        loss.backward()
    assert not audit.banned(), audit.table()

Every ATen op dispatched inside the ``with`` (forward and autograd backward) passes through a
``TorchDispatchMode``. Device-to-host copies that dispatch nothing on CPU (``.tolist()``, ``.numpy()``,
``.cpu()``, printing a tensor) are caught by temporarily wrapping those ``torch.Tensor`` methods, which
is process-global while the audit is active.

Banned as well, whatever the op: any op that takes or makes a complex or float64 tensor (torch_npu runs complex
ops only with ``jit_compile=False``, and float64 barely at all), and a sort of integer keys (``sort``/``argsort``
fall back to the AI-CPU on Ascend); such an event is named ``op [dtype]``, e.g. ``aten.mul.Tensor [complex64]``.

Ops whose output size is read from the data (``bincount``, ``repeat_interleave`` with tensor repeats
and no ``output_size``) sync the host on a device though on CPU they dispatch no
``_local_scalar_dense``: they are counted as host syncs by name. Blind spot: ``.to("cpu")`` / ``copy_``
into a CPU tensor, which are no-ops on CPU.

Point-to-point transfers (``dist.send`` / ``recv``, ``isend`` / ``irecv`` and ``batch_isend_irecv``, what
``torch.distributed.pipelining`` uses between stages) dispatch ``c10d.send`` / ``c10d.recv_`` per tensor: they are
collectives named ``send`` / ``recv`` whose ``detail`` is the peer's rank in the op's group and the tensor, e.g.
``to 1 float32[2, 16, 64]``. The pipelining runtime sends after a backward returns, so their phase says little.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["OpAudit", "OpEvent", "audit_ops"]

BANNED = "banned"
HOST_SYNC = "host_sync"
COLLECTIVE = "collective"
_KIND_ORDER = {BANNED: 0, HOST_SYNC: 1, COLLECTIVE: 2}

_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "c10d_functional")
# functional-collective spellings mapped onto the c10d short names, so one name counts both APIs
_COLLECTIVE_ALIASES = {
    "all_reduce": "allreduce",
    "all_reduce_coalesced": "allreduce_coalesced",
    "all_gather_into_tensor": "allgather",
    "all_gather_into_tensor_coalesced": "allgather_into_tensor_coalesced",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "alltoall",
}
# not collectives: waiting on one, or an autograd wrapper around one that was already recorded
_NOT_COLLECTIVES = {"wait_tensor", "wrap_tensor_autograd"}
_P2P = {"send": "to", "recv": "from", "recv_any_source": "from"}  # point-to-point: (tensors, group, peer, tag)
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
# output shape depends on the values: the device must tell the host before allocating
_DATA_SIZED_OPS = {"bincount"}
_MASK_DTYPES = (torch.bool, torch.uint8)  # uint8 indices are (deprecated) masks too
_SORT_OPS = {"sort", "argsort", "msort"}  # argsort reaches dispatch as sort; listed for the other spellings

# Tensor methods that copy device memory to the host without dispatching anything on CPU; ``item`` is
# left out because it dispatches ``aten._local_scalar_dense``. ``__repr__`` is here because printing
# calls ``tolist`` once per row with dispatch modes disabled: one print should count as one sync.
_SYNC_METHODS = ("tolist", "numpy", "cpu", "__repr__")
_MISSING = object()

_THIS_FILE = os.path.normcase(os.path.abspath(__file__))
_TORCH_DIR = os.path.normcase(os.path.dirname(os.path.abspath(torch.__file__))) + os.sep


def _dirs(*keys: str) -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.normcase(os.path.abspath(paths[k])) + os.sep for k in keys if k in paths})


_STDLIB_DIRS = _dirs("stdlib", "platstdlib")
_SITE_DIRS = _dirs("purelib", "platlib")


@functools.lru_cache(maxsize=4096)
def _is_user_file(filename: str) -> bool:
    """True unless the file belongs to torch, this module or the standard library."""
    if filename.startswith("<frozen"):
        return False
    path = os.path.normcase(os.path.abspath(filename))
    if path == _THIS_FILE or path.startswith(_TORCH_DIR):
        return False
    return not (path.startswith(_STDLIB_DIRS) and not path.startswith(_SITE_DIRS))


def _user_frame() -> str:
    """``file:line`` of the innermost Python frame outside torch, this module and the stdlib."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if _is_user_file(frame.f_code.co_filename):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def _in_backward() -> bool:
    """True while the autograd engine is running a graph task (``backward()`` / ``autograd.grad``)."""
    return torch._C._current_graph_task_id() != -1


def _collective_name(opname: str) -> str:
    """Short name of a c10d op: ``_allgather_base_`` -> ``allgather``, ``allreduce_`` -> ``allreduce``."""
    name = opname.strip("_")
    name = name[: -len("_base")] if name.endswith("_base") else name
    return _COLLECTIVE_ALIASES.get(name, name)


def _static_kind(func: Any) -> tuple[str, str] | None:
    """(kind, recorded name) for ops classified by identity alone; ``("index", name)`` needs the args."""
    namespace = getattr(func, "namespace", None)
    opname = getattr(func, "_opname", "")
    if namespace in _COLLECTIVE_NAMESPACES:
        name = _collective_name(opname)
        return None if name in _NOT_COLLECTIVES else (COLLECTIVE, name)
    if namespace != "aten":
        return None
    if opname == "_local_scalar_dense" or opname in _DATA_SIZED_OPS:
        return HOST_SYNC, str(func)
    if opname == "repeat_interleave":
        return "repeat_interleave", str(func)
    if (
        (opname.startswith(("nonzero", "masked_select")) and opname != "nonzero_static")
        or opname.lstrip("_").startswith("unique")
        or opname == "argwhere"
    ):
        return BANNED, str(func)
    if opname in _INDEX_OPS:
        return "index", str(func)
    return None


def _bad_dtype(func: Any, args: tuple, kwargs: dict, out: Any) -> str | None:
    """The dtype that makes this op NPU-hostile: complex or float64 anywhere, integer sort keys; else None."""
    for t in tree_leaves((args, kwargs, out)):
        if isinstance(t, torch.Tensor) and (t.is_complex() or t.dtype == torch.float64):
            return str(t.dtype).removeprefix("torch.")
    if getattr(func, "_opname", "") in _SORT_OPS and getattr(func, "namespace", None) == "aten":
        keys = args[0] if args else kwargs.get("self")
        if isinstance(keys, torch.Tensor) and not (keys.is_floating_point() or keys.is_complex()):
            return f"{str(keys.dtype).removeprefix('torch.')} keys"
    return None


def _p2p_detail(name: str, args: tuple) -> str:
    """``to PEER dtype[shape]`` for a send, ``from PEER ...`` for a recv (args: tensors, group, peer, tag)."""
    if name not in _P2P or len(args) < 3:
        return ""
    tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
    what = " ".join(
        f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors if isinstance(t, torch.Tensor)
    )
    peer = args[2] if name != "recv_any_source" else "any"
    return f"{_P2P[name]} {peer} {what}".rstrip()


def _has_mask_index(args: tuple, kwargs: dict) -> bool:
    """True when an ``index``/``index_put`` call indexes with a boolean (or uint8) mask."""
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in indices or ())


def _module_tensors(*trees: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(trees) if isinstance(t, torch.Tensor) and t.requires_grad]


@dataclass(frozen=True)
class OpEvent:
    """One recorded op: name, kind, autograd phase, module scope and user source location."""

    op: str
    kind: str  # "banned" | "host_sync" | "collective"
    phase: str  # "forward" | "backward"
    scope: str  # qualified module name, "" outside every scoped module
    where: str  # "file:line" of the innermost user frame
    detail: str = ""  # point-to-point: "to PEER dtype[shape]" / "from PEER dtype[shape]" (peer: group rank)


class OpAudit(TorchDispatchMode):
    """Dispatch mode recording banned ops, host syncs and collectives, tagged by phase, scope and source line."""

    def __init__(self, model: torch.nn.Module | None = None, scope_types: Iterable[type] = ()) -> None:
        """Audit ops; with ``model``, tag events with the scoped module running them (default: *DecoderLayer)."""
        super().__init__()
        self.model = model
        self.scope_types = tuple(scope_types)
        self.events: list[OpEvent] = []
        self._kinds: dict[Any, tuple[str, str] | None] = {}
        self._scopes: list[str] = []  # forward scopes, innermost last
        self._bwd_scope = ""
        self._suppress = 0  # >0 while inside a wrapped Tensor method
        self._active = False
        self._handles: list[Any] = []
        self._saved: list[tuple[str, Any]] = []

    # --- context management -------------------------------------------------------------------------

    def __enter__(self) -> OpAudit:
        self._patch_methods()
        try:
            self._add_module_hooks()
            self._active = True
            super().__enter__()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scopes.clear()
        self._bwd_scope = ""
        self._restore_methods()

    # --- recording ------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self._suppress:
            try:
                kind = self._kinds[func]
            except KeyError:
                kind = self._kinds[func] = _static_kind(func)
            if kind is not None:
                if kind[0] == "index":
                    if _has_mask_index(args, kwargs):
                        self._record(kind[1], BANNED)
                elif kind[0] == "repeat_interleave":
                    if isinstance(args[-1] if args else None, torch.Tensor) and kwargs.get("output_size") is None:
                        self._record(kind[1], HOST_SYNC)
                else:
                    self._record(kind[1], kind[0], _p2p_detail(kind[1], args))
        out = func(*args, **kwargs)
        if not self._suppress:
            bad = _bad_dtype(func, args, kwargs, out)
            if bad is not None:
                self._record(f"{func} [{bad}]", BANNED)
        return out

    def _record(self, op: str, kind: str, detail: str = "") -> None:
        backward = _in_backward()
        scope = self._scopes[-1] if self._scopes else (self._bwd_scope if backward else "")
        self.events.append(OpEvent(op, kind, "backward" if backward else "forward", scope, _user_frame(), detail))

    def _patch_methods(self) -> None:
        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved.append((name, torch.Tensor.__dict__.get(name, _MISSING)))
            setattr(torch.Tensor, name, self._sync_wrapper(original, f"Tensor.{name}"))

    def _restore_methods(self) -> None:
        while self._saved:
            name, original = self._saved.pop()
            if original is _MISSING:
                delattr(torch.Tensor, name)  # it was inherited from TensorBase: unshadow it
            else:
                setattr(torch.Tensor, name, original)

    def _sync_wrapper(self, original: Callable, op: str) -> Callable:
        audit = self

        @functools.wraps(original)
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if audit._active and not audit._suppress:
                audit._record(op, HOST_SYNC)
            # what the method does internally (tolist per printed row, a _to_copy off the device) is
            # part of this one sync, not another event
            audit._suppress += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                audit._suppress -= 1

        return wrapper

    # --- scopes ---------------------------------------------------------------------------------------

    def _add_module_hooks(self) -> None:
        if self.model is None:
            return
        for name, module in self.model.named_modules():
            if self.scope_types:
                if not isinstance(module, self.scope_types):
                    continue
            elif not type(module).__name__.endswith("DecoderLayer"):
                continue
            scope = name or type(module).__name__
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(scope), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook(scope), always_call=True))

    def _pre_hook(self, scope: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._scopes.append(scope)
            # backward reaches the module's inputs after all of its own ops: leave its backward scope there
            for t in _module_tensors(args, kwargs):
                self._tensor_hook(t, lambda grad: self._leave_bwd(scope))

        return hook

    def _post_hook(self, scope: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if scope in self._scopes:
                del self._scopes[len(self._scopes) - 1 - self._scopes[::-1].index(scope)]
            # backward reaches the module's outputs before any of its own ops: enter its backward scope there
            for t in _module_tensors(output):
                self._tensor_hook(t, lambda grad: self._enter_bwd(scope))

        return hook

    def _tensor_hook(self, tensor: torch.Tensor, fn: Callable) -> None:
        try:
            self._handles.append(tensor.register_hook(fn))
        except RuntimeError:
            pass  # e.g. a view of a leaf made in no_grad mode: only the backward scope is lost

    def _enter_bwd(self, scope: str) -> None:
        if self._active:
            self._bwd_scope = scope

    def _leave_bwd(self, scope: str) -> None:
        # a residual stream is both layer i's input and layer i-1's output; only close our own scope
        if self._active and self._bwd_scope == scope:
            self._bwd_scope = ""

    # --- results --------------------------------------------------------------------------------------

    def _select(
        self, kind: str, name: str | None = None, phase: str | None = None, scope: str | None = None
    ) -> list[OpEvent]:
        return [
            e
            for e in self.events
            if e.kind == kind
            and (name is None or e.op == name or e.op.startswith(name + "."))
            and (phase is None or e.phase == phase)
            and (scope is None or e.scope == scope)
        ]

    def banned(self) -> list[OpEvent]:
        """Every banned-op event, in dispatch order."""
        return self._select(BANNED)

    def host_syncs(self, phase: str | None = None, scope: str | None = None) -> int:
        """Number of host syncs, optionally restricted to a phase and/or scope."""
        return len(self._select(HOST_SYNC, phase=phase, scope=scope))

    def collectives(self, name: str | None = None, phase: str | None = None, scope: str | None = None) -> int:
        """Number of collectives, optionally of one short name (``allreduce``), phase and/or scope."""
        return len(self._select(COLLECTIVE, name=name, phase=phase, scope=scope))

    def p2p(self, name: str | None = None) -> dict[str, int]:
        """Point-to-point transfers: ``"send to 1 float32[2, 16, 64]"`` -> count (of ``send`` or ``recv`` only)."""
        return dict(
            Counter(
                f"{e.op} {e.detail}"
                for e in self.events
                if e.kind == COLLECTIVE and e.op in _P2P and (name is None or e.op == name)
            )
        )

    def counts_by_scope(self, kind: str, name: str | None = None, phase: str | None = "forward") -> dict[str, int]:
        """Scope -> number of ``kind`` events (of op ``name``, in ``phase``; None means any)."""
        return dict(Counter(e.scope for e in self._select(kind, name=name, phase=phase)))

    def table(self) -> str:
        """Events grouped by (op, where) as an aligned text table, by kind then descending count."""
        groups = Counter((e.kind, f"{e.op} {e.detail}".rstrip(), e.where) for e in self.events)
        rows = sorted(groups.items(), key=lambda item: (_KIND_ORDER.get(item[0][0], 9), -item[1], item[0][1:]))
        lines = [("op", "kind", "count", "where")]
        lines += [(op, kind, str(count), where) for (kind, op, where), count in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(3)]
        return "\n".join(
            f"{op:<{widths[0]}}  {kind:<{widths[1]}}  {count:>{widths[2]}}  {where}".rstrip()
            for op, kind, count, where in lines
        )


def audit_ops(
    fn: Callable[..., Any], *args: Any, model: torch.nn.Module | None = None, **kwargs: Any
) -> tuple[Any, OpAudit]:
    """Call ``fn(*args, **kwargs)`` under an :class:`OpAudit` and return its result with the audit."""
    with OpAudit(model) as audit:
        result = fn(*args, **kwargs)
    return result, audit
