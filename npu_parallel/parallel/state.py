"""init_distributed(): torchrun's environment -> process groups (tp inside, dp and ep across) -> ParallelState.

Two views of the same ranks, both row-major grids of the global ranks (torchrun numbers a node's ranks
contiguously, so a grid row of tp ranks never spans nodes when tp divides the cards per node):

* dense weights ``(dp, tp)``: a tp group is ``tp`` contiguous ranks, dp groups are strided by tp;
* routed experts ``(edp, ep)``: an ep group is ``ep`` contiguous ranks (``ep / tp`` whole tp groups), each
  holding ``E / ep`` experts; edp ("expert data parallel", torchtitan's dp mod ep) joins the ranks that hold
  the same experts, strided by ep.

Pipeline stages are the outermost axis (``world = pp x dp x tp``): the ranks form ``pp`` blocks of
``world / pp`` contiguous ranks, one block per stage, and the two views above are laid out inside each block
(``(pp, dp, tp)`` and ``(pp, edp, ep)``); a pp group joins the ranks at the same place of every block, strided by
``world / pp``. So pipeline groups may span nodes and tensor-parallel groups still never do.

Each parallel dimension travels as one typed :class:`Group` handle (this rank's position, the group's
size, its process group), so layers, styles and collectives never pass loose ``(rank, size, group)``
triples around.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from npu_parallel.parallel import device as _device
from npu_parallel.parallel import watchdog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """One parallel dimension as this rank sees it: ``rank`` of ``size`` in ``group`` (global ``ranks``).

    ``group`` is None for a dimension of size 1 without a process group (single process, offline tools).
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    ranks: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"group rank {self.rank} is outside [0, {self.size})")

    def __deepcopy__(self, memo: dict) -> Group:
        return self  # immutable, and a process group cannot be copied: deep copies of a model share it

    @classmethod
    def offline(cls, rank: int, size: int) -> Group:
        """A handle for planning rank ``rank`` of ``size`` without a process group (offline conversion)."""
        return cls(rank, size, None, tuple(range(size)))


TRIVIAL = Group()


@dataclass
class ParallelState:
    """Where this process sits: device, backend, global rank, and one :class:`Group` per dimension."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    tp: Group = TRIVIAL
    dp: Group = TRIVIAL
    local_rank: int = 0
    ep: Group = TRIVIAL  # default: the tp group (experts split over the tp ranks, no dispatch traffic)
    edp: Group = TRIVIAL  # the ranks holding the same experts; default: the dp group
    pp: Group = TRIVIAL  # pipeline stages (outermost): this rank's stage and the ranks of its pipeline
    pp_ends: Group = TRIVIAL  # the first and the last stage of this pipeline (their shared embedding's gradient)

    def __post_init__(self) -> None:
        if self.ep is TRIVIAL:
            self.ep = self.tp
        if self.edp is TRIVIAL:
            self.edp = self.dp

    # the documented flat attributes
    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.tp.group

    @property
    def tp_ranks(self) -> tuple[int, ...]:
        return self.tp.ranks

    @property
    def dp_size(self) -> int:
        return self.dp.size

    @property
    def dp_rank(self) -> int:
        return self.dp.rank

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.dp.group

    @property
    def dp_ranks(self) -> tuple[int, ...]:
        return self.dp.ranks

    @property
    def ep_size(self) -> int:
        return self.ep.size

    @property
    def ep_rank(self) -> int:
        return self.ep.rank

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.ep.group

    @property
    def pp_size(self) -> int:
        return self.pp.size

    @property
    def pp_rank(self) -> int:
        return self.pp.rank

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.pp.group

    @property
    def pp_ranks(self) -> tuple[int, ...]:
        return self.pp.ranks

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    @property
    def edp_size(self) -> int:
        return self.edp.size

    @property
    def edp_group(self) -> dist.ProcessGroup | None:
        return self.edp.group

    def device_mesh(self, dims: tuple[str, ...] = ("dp", "tp")):
        """A torch DeviceMesh over this state's groups: ``("dp", "tp")`` (dense weights) or ``("edp", "ep")``
        (routed experts) of this rank's pipeline stage, e.g. for ``fully_shard(..., mesh=state.device_mesh(("edp",
        "ep"))["edp"])``; or the whole world ``("pp", "dp", "tp")`` / ``("pp", "edp", "ep")``."""
        from torch.distributed.device_mesh import DeviceMesh

        allowed = (("dp", "tp"), ("edp", "ep"), ("pp", "dp", "tp"), ("pp", "edp", "ep"))
        if dims not in allowed:
            raise ValueError(f"dims={dims!r}: use one of {allowed}")
        groups = [getattr(self, d) for d in dims]
        if any(g.group is None for g in groups):
            raise ValueError("a device mesh needs process groups: call init_distributed first")
        inner = groups[-1].size
        if dims[0] == "pp":
            block = self.world_size // self.pp_size
            mesh = torch.tensor([grid(block, inner, s * block) for s in range(self.pp_size)])
        else:
            mesh = torch.tensor(
                grid(self.world_size // self.pp_size, inner, self.pp_rank * self.world_size // self.pp_size)
            )
        return DeviceMesh.from_group([g.group for g in groups], self.device.type, mesh, mesh_dim_names=dims)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} device={self.device} backend={self.backend} "
            f"tp={self.tp_rank}/{self.tp_size} dp={self.dp_rank}/{self.dp_size}"
            + (f" pp={self.pp_rank}/{self.pp_size}" if self.pp_size > 1 else "")
            + (f" ep={self.ep_rank}/{self.ep_size} edp={self.edp.rank}/{self.edp_size}" if self.ep_size > 1 else "")
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_pp_size(pp_size: int, world_size: int) -> None:
    """Raise a ValueError naming the valid sizes when pp_size cannot split world_size into whole stages."""
    if not isinstance(pp_size, int) or isinstance(pp_size, bool) or pp_size < 1 or world_size % pp_size:
        raise ValueError(
            f"pp_size={pp_size!r} must be a positive divisor of the world size {world_size} "
            f"(world = pp x dp x tp); use one of {divisors(world_size)} or change --nproc_per_node"
        )


def check_tp_size(tp_size: int, world_size: int, pp_size: int = 1) -> None:
    """Raise a ValueError naming the valid sizes when tp_size cannot split one stage's ``world / pp`` ranks."""
    stage = world_size // pp_size
    if not isinstance(tp_size, int) or tp_size < 1 or stage % tp_size:
        where = f"the world size {world_size}" if pp_size == 1 else f"the {stage} ranks of a stage (world / pp)"
        raise ValueError(
            f"tp_size={tp_size!r} must be a positive divisor of {where} "
            f"(world = pp x dp x tp); use one of {divisors(stage)} or change --nproc_per_node"
        )


def check_ep_size(ep_size: int, tp_size: int, world_size: int) -> None:
    """Raise a ValueError naming the valid sizes when ep_size is not a multiple of tp_size dividing the world."""
    if not isinstance(ep_size, int) or ep_size < 1 or ep_size % tp_size or world_size % ep_size:
        valid = [d for d in divisors(world_size) if d % tp_size == 0]
        raise ValueError(
            f"ep_size={ep_size!r} must be a multiple of tp_size={tp_size} that divides the world size "
            f"{world_size} (an ep group is one or more whole tp groups); use one of {valid}"
        )


def check_local_world(tp_size: int, local_world_size: int | None) -> None:
    """Tensor-parallel groups never span nodes: tp must divide the ranks per node (torchrun's LOCAL_WORLD_SIZE)."""
    if local_world_size is not None and local_world_size % tp_size:
        raise ValueError(
            f"tp_size={tp_size} does not divide the {local_world_size} ranks per node (LOCAL_WORLD_SIZE): a "
            f"tensor-parallel group would span nodes; use one of {divisors(local_world_size)} (ep_size may span "
            f"nodes) or change --nproc_per_node"
        )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def grid(world_size: int, inner: int, offset: int = 0) -> list[list[int]]:
    """The ranks ``offset .. offset + world_size - 1`` as a row-major ``[world / inner, inner]`` grid: rows are
    inner groups (tp or ep)."""
    return [list(range(offset + r * inner, offset + (r + 1) * inner)) for r in range(world_size // inner)]


def group_layout(world_size: int, inner: int, pp_size: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    """Inner groups of contiguous ranks (tp: one node's cards; ep) and the strided outer groups (dp; edp), laid
    out inside each pipeline stage's block of ``world / pp`` contiguous ranks."""
    block = world_size // pp_size
    inners: list[list[int]] = []
    outers: list[list[int]] = []
    for s in range(pp_size):
        rows = grid(block, inner, s * block)
        inners += rows
        outers += [list(col) for col in zip(*rows, strict=True)]
    return inners, outers


def pp_layout(world_size: int, pp_size: int) -> list[list[int]]:
    """The pipeline groups: the ranks at the same place of every stage's block (strided by ``world / pp``)."""
    block = world_size // pp_size
    return [[s * block + i for s in range(pp_size)] for i in range(block)]


def _new_groups(
    layouts: list[list[int]], rank: int, world_size: int, name: str, timeout: datetime.timedelta | None = None
) -> Group:
    """Create every group of one dimension (collective: all ranks, same order) and return this rank's.

    Each group gets ``timeout`` (None: torch's default) and, where torch takes one, the description ``name``
    (NCCL's and HCCL's watchdogs print it when a collective times out).
    """
    kwargs: dict = {"timeout": timeout}
    if "group_desc" in inspect.signature(dist.new_group).parameters:
        kwargs["group_desc"] = name
    mine = None
    for ranks in layouts:
        g = dist.new_group(ranks, **kwargs) if world_size > 1 else dist.group.WORLD
        if rank in ranks:
            mine = Group(ranks.index(rank), len(ranks), g, tuple(ranks))
    assert mine is not None, f"rank {rank} is in no group of {layouts}"
    return mine


def init_distributed(
    tp_size: int | None = None,
    *,
    ep_size: int | None = None,
    pp_size: int | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> ParallelState:
    """Read torchrun's environment (or run as a single process), pick device and backend, build the groups.

    ``pp_size`` (default 1) pipeline stages are the outermost dimension (``world = pp x dp x tp``): stage ``s``
    is the block of ranks ``s * world / pp ..``, and tp, dp, ep and edp are laid out inside each block.
    ``tp_size=None`` means all ranks of a stage form one tensor-parallel group. ``ep_size`` (default: tp_size) ranks
    split the routed experts, ``E / ep`` each: a multiple of tp_size dividing the world size, so an ep group
    is one or more whole tp groups and tokens travel between them by all-to-all. Tensor-parallel groups never
    span nodes: tp must divide LOCAL_WORLD_SIZE. Every size is checked before any collective. Reuses a
    process group that already exists. On Ascend, HCCL defaults are exported before the group is created.

    ``timeout_s`` bounds every collective on every group created here: the world group (when this call
    creates it) and each tp and dp group (None: torch's default, 30 min on gloo). With more than one rank,
    a collective that fails ends the process with one line naming the op, the group, its ranks and the
    ranks that did not arrive (:mod:`npu_parallel.parallel.watchdog`); under torchrun the rank also exits
    when torchrun dies.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    pp_size = 1 if pp_size is None else pp_size
    check_pp_size(pp_size, world_size)  # before any collective: every rank raises the same error
    stage_world = world_size // pp_size
    tp_size = stage_world if tp_size is None else tp_size
    check_tp_size(tp_size, world_size, pp_size)
    ep_size = tp_size if ep_size is None else ep_size
    check_ep_size(ep_size, tp_size, stage_world)
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    check_local_world(tp_size, int(local_world) if local_world else None)

    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    watchdog.exit_with_parent()  # under torchrun: no orphan ranks if torchrun is killed

    kind = _device.device_type()
    if backend is None:
        backend = _device.backend_for(kind)
    if backend == "gloo" and kind != "cpu":
        kind = "cpu"  # gloo moves CPU tensors; keep the model where the backend can reach it
    if kind == "npu":
        applied = _device.apply_hccl_defaults()
        if applied:
            logger.info("HCCL defaults applied: %s", applied)
    dev = _device.local_device(kind, local_rank)

    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
    if not dist.is_initialized():
        kwargs: dict = {"backend": backend, "rank": rank, "world_size": world_size}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            kwargs["store"] = dist.HashStore()
        if kind != "cpu":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    else:
        backend = dist.get_backend()
        if timeout is not None:
            logger.info("the world group exists already: its own timeout stays; tp and dp get %g s", timeout_s)

    tp_layout, dp_layout = group_layout(world_size, tp_size, pp_size)
    tp = _new_groups(tp_layout, rank, world_size, "tp", timeout)
    dp = _new_groups(dp_layout, rank, world_size, "dp", timeout)
    ep, edp = tp, dp  # ep = tp: the same ranks, no new groups
    if ep_size != tp_size:
        ep_layout, edp_layout = group_layout(world_size, ep_size, pp_size)
        ep = _new_groups(ep_layout, rank, world_size, "ep", timeout)
        edp = _new_groups(edp_layout, rank, world_size, "edp", timeout)
    pp = pp_ends = TRIVIAL
    if pp_size > 1:
        layout = pp_layout(world_size, pp_size)
        pp = _new_groups(layout, rank, world_size, "pp", timeout)
        pp_ends = pp  # pp 2: the first and the last stage are the whole pipeline
        if pp_size > 2:  # every rank creates every group (collective); the middle stages belong to none
            for ranks in [[r[0], r[-1]] for r in layout]:
                g = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    pp_ends = Group(ranks.index(rank), 2, g, tuple(ranks))
    state = ParallelState(
        dev, backend, rank, world_size, tp=tp, dp=dp, local_rank=local_rank, ep=ep, edp=edp, pp=pp, pp_ends=pp_ends
    )
    watched = [("tp", tp), ("dp", dp)] + ([("ep", ep), ("edp", edp)] if ep is not tp else [])
    watched += [("pp", pp)] if pp_size > 1 else []
    watchdog.watch(
        rank,
        world_size,
        timeout_s,
        [(n, g.group, g.ranks) for n, g in watched] + [("world", dist.group.WORLD, tuple(range(world_size)))],
    )
    logger.info("initialised %s", state.describe())
    return state


def single_rank_state(device: torch.device | str = "cpu") -> ParallelState:
    """A tp=1 state with no process group, for offline tools and the unconverted reference."""
    return ParallelState(device=torch.device(device), backend="none", rank=0, world_size=1)


def destroy_distributed() -> None:
    """Leave every process group and drop the references this package holds to them.

    A group still referenced after ``destroy_process_group`` is finalized at interpreter exit, where gloo's threads
    can abort the process ("terminate called without an active exception", SIGABRT) after a clean run.
    """
    watchdog.unwatch()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # groups held in reference cycles (modules, hooks) go now, not at exit
