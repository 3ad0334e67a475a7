"""The Dispatcher interface: which rows each local expert computes, and how their outputs are combined.

A dispatcher is resolved once, at conversion (:func:`resolve_dispatcher`), and each MoE block holds its own
copy. Per forward the block calls ``routed = dispatcher.dispatch(x, indices, weights, experts)``, then
``y = experts(routed.rows, routed.matmul)`` and ``dispatcher.combine(y, routed)``, through their
``*_overlapped`` forms, which also run the shared experts: while the tokens are in flight where they travel.

Every implementation is NPU-safe: no ``nonzero``, boolean-mask indexing, ``unique`` or ``.any()``/``.all()``
for control flow, float keys where it sorts; a host sync only where its docstring says so.

Shapes: T tokens, k top-k, E experts (global), E_local this rank's experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import abc
import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from npu_parallel.moe.experts import ExpertMatmul, LocalExperts
from npu_parallel.parallel.state import Group

__all__ = [
    "ANY_DEVICE",
    "AUTO",
    "Dispatcher",
    "Routed",
    "choices",
    "implementation",
    "implementations",
    "local_keys",
    "option_names",
    "resolve_dispatcher",
    "slot_counts",
]

T = TypeVar("T")  # what the overlapped work (the shared experts) returns

AUTO = "auto"
ANY_DEVICE = "*"  # in ``auto_for``: "auto" picks this implementation on devices no other one claims


@dataclass
class Routed:
    """What ``dispatch`` hands the experts and, through them, ``combine``."""

    rows: torch.Tensor  # the rows the local experts compute, grouped by expert ([R, H] or [E_local, C, H])
    matmul: ExpertMatmul  # rows @ w[e] for each expert e's group of rows, w [E_local, K, N]
    state: Any  # whatever combine needs (indices of the rows, the routing weights, ...); the dispatcher's own


class Dispatcher(abc.ABC):
    """Base of every MoE implementation; a subclass ``class X(Dispatcher, name="x", order=n)`` registers itself.

    ``name`` is what ``moe_impl`` says; ``order`` places it in listings (error messages, ``--help``);
    ``auto_for`` lists the device types on which ``moe_impl="auto"`` picks it (``"*"``: any other device).
    Options (e.g. the static dispatcher's ``capacity_factor``) are the keyword-only arguments of the
    subclass' ``__init__``, which validates them: errors surface at conversion, before any collective.
    """

    name: ClassVar[str]
    order: ClassVar[int]
    auto_for: ClassVar[tuple[str, ...]] = ()
    # whether it moves tokens between the tp groups of an ep group (ep_size > tp_size); the others compute only
    # the tokens their tp group holds, which is right only when the ep group is the tp group
    cross_group: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, order: int = 100, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # an intermediate base class, or a test double that registers nothing
            return
        if name == AUTO or name in _REGISTRY:
            raise ValueError(f"moe_impl name {name!r} is taken (by {_REGISTRY.get(name, AUTO)!r})")
        cls.name, cls.order = name, order
        _REGISTRY[name] = cls

    def __init__(self) -> None:
        self.stats: dict[str, torch.Tensor] = {}  # per-forward statistics as device tensors (no host sync)
        self.training = True  # the MoE block's mode, set before each dispatch (eval_capacity_factor reads it)

    @abc.abstractmethod
    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        """Tokens ``x [T, H]``, global expert ``indices [T, k]``, routing ``weights [T, k]`` -> the local rows."""

    @abc.abstractmethod
    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        """The experts' output rows -> this rank's partial output ``[T, H]`` (weighted sum over its slots)."""

    def dispatch_overlapped(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        experts: LocalExperts,
        work: Callable[[], T],
    ) -> tuple[Routed, T]:
        """``(dispatch(...), work())``, ``work`` (the shared experts) run while the tokens travel where they do
        (the all-to-all dispatchers); here nothing travels: dispatch, then ``work()``. Same values either way."""
        return self.dispatch(x, indices, weights, experts), work()

    def combine_overlapped(self, y: torch.Tensor, routed: Routed, work: Callable[[], T]) -> tuple[torch.Tensor, T]:
        """``(combine(y, routed), work())``, ``work`` run while the outputs travel back where they do."""
        return self.combine(y, routed), work()

    def __call__(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        """Dispatch, compute, combine in one call (tests, benchmarks): this rank's partial output ``[T, H]``."""
        routed = self.dispatch(x, indices, weights, experts)
        return self.combine(experts(routed.rows, routed.matmul), routed)

    @classmethod
    def usable(cls, device_type: str) -> bool:
        """Whether ``moe_impl="auto"`` may pick this implementation on ``device_type`` (a capability probe)."""
        return True

    def bind(self, tp: Group, ep: Group) -> None:  # noqa: B027 (a hook: most dispatchers need no groups)
        """Called once per MoE block with its groups (a dispatcher that moves tokens keeps them)."""

    def copy(self) -> Dispatcher:
        """An independent copy (each MoE block keeps its own statistics)."""
        return copy.deepcopy(self)

    def options(self) -> dict[str, Any]:
        """The options this dispatcher was built with (for ``repr`` and logs)."""
        return {}

    @classmethod
    def option_error(cls, key: str, value: Any) -> str:
        """The message for ``key=value`` given to an implementation that does not take it (this one does)."""
        return f"{key}={value!r} needs moe_impl={cls.name!r}; the other implementations do not take it"

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(name={self.name!r}{opts})"


_REGISTRY: dict[str, type[Dispatcher]] = {}


def implementations() -> list[str]:
    """The registered names in listing order (``"auto"`` not included)."""
    return [cls.name for cls in sorted(_REGISTRY.values(), key=lambda c: (c.order, c.name))]


def implementation(name: str) -> type[Dispatcher]:
    """The registered class of ``name`` (KeyError for an unknown one)."""
    return _REGISTRY[name]


def choices() -> list[str]:
    """Every value ``moe_impl`` accepts as a string, ``"auto"`` first."""
    return [AUTO, *implementations()]


def option_names(impl: str | type[Dispatcher]) -> set[str]:
    """The options an implementation takes: the keyword-only arguments of its ``__init__``."""
    cls = _REGISTRY[impl] if isinstance(impl, str) else impl
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY}


def _auto(device_type: str, cross_group: bool) -> str:
    """What ``"auto"`` means on ``device_type``: the one place it is decided. Tokens that leave their tp group
    (``cross_group``: ep above tp) need the first usable implementation that moves them."""
    if cross_group:
        movers = [n for n in implementations() if _REGISTRY[n].cross_group and _REGISTRY[n].usable(device_type)]
        if movers:
            return movers[0]
    for wanted in (device_type, ANY_DEVICE):
        for name in implementations():
            if wanted in _REGISTRY[name].auto_for and _REGISTRY[name].usable(device_type):
                return name
    raise ValueError(f"no MoE implementation claims device type {device_type!r}; use one of {implementations()}")


def resolve_dispatcher(
    moe_impl: str | Dispatcher, device_type: str, *, cross_group: bool = False, **options: Any
) -> Dispatcher:
    """The dispatcher for ``moe_impl`` (a name, ``"auto"`` or a Dispatcher) with ``options`` (None: default);
    ``cross_group``: tokens travel between tp groups (ep above tp), which ``"auto"`` honours.

    Raises ValueError for an unknown name, an option the implementation does not take or a bad option value,
    and an implementation that cannot run here (``"npu"`` without torch_npu).
    """
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(moe_impl, Dispatcher):
        if given:
            raise ValueError(f"moe_impl is a Dispatcher already; give {sorted(given)} to its constructor")
        return moe_impl
    name = _auto(device_type, cross_group) if moe_impl == AUTO else moe_impl
    if name not in _REGISTRY:
        raise ValueError(f"moe_impl={moe_impl!r} is not an implementation; use one of {choices()}")
    cls = _REGISTRY[name]
    for key, value in given.items():
        if key not in option_names(cls):
            owners = [c for c in _REGISTRY.values() if key in option_names(c)]
            raise ValueError(
                owners[0].option_error(key, value)
                if owners
                else f"{key}={value!r} is not an option of any MoE implementation"
            )
    return cls(**given)


def local_keys(indices: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
    """Local expert number of each slot ``[T, k]``, ``E_local`` (a sentinel that sorts last) for other ranks'."""
    local = indices - experts.expert_start
    inside = (local >= 0) & (local < experts.num_local)
    return torch.where(inside, local, torch.full_like(local, experts.num_local))


def slot_counts(
    ids: torch.Tensor, bins: int, dtype: torch.dtype | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Slots per bin ``[bins]`` from ids of any shape (``[T, k]`` expert ids, flat local keys), in ``dtype``
    (default: the ids'); ``weights`` (the ids' shape) counts each slot by its weight instead of 1 (0: padding).
    ``scatter_add`` into a fixed-size buffer: ``bincount`` sizes its output from the data (a hidden host sync)."""
    flat = ids.reshape(-1)
    dtype = dtype or flat.dtype
    ones = torch.ones(flat.shape, dtype=dtype, device=flat.device) if weights is None else weights.reshape(-1)
    return torch.zeros(bins, dtype=dtype, device=flat.device).scatter_add_(0, flat, ones.to(dtype))
