"""How a local tensor relates to its global tensor: the metadata every sharded parameter carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch

ATTR = "np_shard"


@dataclass(frozen=True)
class ShardSpec:
    """This rank holds rows ``[start, stop)`` of dim ``dim`` of a global tensor whose size there is ``full``.

    ``padded`` is the local size along ``dim`` when the shard carries zero padding past ``stop`` (the
    vocab-parallel embedding of a vocab that tp does not divide); else equal to ``stop - start``.
    """

    dim: int
    start: int
    stop: int
    full: int
    padded: int
    axis: str = "tp"  # the group whose ranks split it: "tp", or "ep" for the routed experts

    @property
    def length(self) -> int:
        return self.stop - self.start

    def global_shape(self, local: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The whole tensor's shape, from a local shard's."""
        shape = list(local)
        shape[self.dim] = self.full
        return tuple(shape)

    def trim(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's rows without the zero padding past ``stop`` (a view)."""
        return local if local.shape[self.dim] == self.length else local.narrow(self.dim, 0, self.length)

    def place(self, local: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """Copy this rank's rows (padding dropped) into ``whole`` at ``[start, stop)``; returns ``whole``."""
        whole.narrow(self.dim, self.start, self.length).copy_(self.trim(local))
        return whole


def even_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous block ``index`` of ``n`` items split into ``parts`` equal blocks."""
    if n % parts:
        raise ValueError(f"size {n} is not divisible by {parts}")
    step = n // parts
    return index * step, (index + 1) * step


def padded_range(n: int, parts: int, index: int) -> tuple[int, int, int]:
    """Block ``index`` of ``n`` items padded up to a multiple of ``parts``: (start, stop_valid, block)."""
    block = -(-n // parts)
    start = min(index * block, n)
    return start, min(start + block, n), block


def shard_tensor(t: torch.Tensor, dim: int, start: int, stop: int, padded: int | None = None) -> torch.Tensor:
    """A fresh copy of ``t[start:stop]`` along ``dim``, zero-padded to ``padded`` rows."""
    piece = t.narrow(dim, start, stop - start)
    if padded is not None and padded > stop - start:
        shape = list(piece.shape)
        shape[dim] = padded - (stop - start)
        piece = torch.cat([piece, piece.new_zeros(shape)], dim=dim)
    return piece.clone() if piece.device.type != "meta" else piece


def pad_to_spec(data: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """The unpadded rows read for ``spec`` zero-padded to its local size (vocab tp does not divide)."""
    if spec is None or spec.padded == spec.length:
        return data
    pad = list(data.shape)
    pad[spec.dim] = spec.padded - spec.length
    return torch.cat([data, data.new_zeros(pad)], dim=spec.dim)


T = TypeVar("T", bound=torch.Tensor)


def mark(param: T, spec: ShardSpec | None) -> T:
    """Attach ``spec`` to ``param`` (None: replicated, nothing attached); returns ``param``."""
    if spec is not None:
        setattr(param, ATTR, spec)
    return param


def spec_of(param: torch.Tensor) -> ShardSpec | None:
    return getattr(param, ATTR, None)


class ShardedModule(torch.nn.Module):
    """Base of every module conversion creates: deep copies keep each parameter's ShardSpec
    (``Parameter.__deepcopy__`` drops attributes) and share the process group through the Group handle."""

    def __deepcopy__(self, memo):
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        for name, p in self._parameters.items():
            copied = new._parameters[name]
            if p is not None and copied is not None:
                mark(copied, spec_of(p))
        return new
