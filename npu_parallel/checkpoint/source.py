"""TensorSource: where a converted model's global tensors come from, addressed by their names in memory.

Two sources exist: a Hugging Face safetensors folder (:class:`~npu_parallel.checkpoint.hf_source.HFSource`)
and our sharded checkpoint folder (:class:`~npu_parallel.checkpoint.sharded_source.ShardedSource`). Both hand
out global tensors or row ranges of them, read into memory this process owns, and count what they read;
:func:`~npu_parallel.checkpoint.materialize.materialize` is the one loop that consumes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Self

from npu_parallel.convert.plan import Plan
from npu_parallel.convert.plans import plan_for
from npu_parallel.parallel.shard_spec import ShardSpec


class TensorSource(ABC):
    """A checkpoint's config, plan and tensors; ``read`` only what is asked, ``bytes_read``/``keys_read`` count it."""

    # how a shape that disagrees with the model is explained to the user
    mismatch_hint = "the config does not belong to these weights"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bytes_read = 0
        self.keys_read: set[str] = set()

    @cached_property
    def config(self) -> Any:
        """The transformers config the checkpoint was saved with, read once."""
        return self.read_config()

    @abstractmethod
    def read_config(self) -> Any:
        """Read the config (a CheckpointError naming the file when it cannot be read)."""

    @cached_property
    def plan(self) -> Plan:
        """The parallel plan of the config's model type, resolved once (ValueError when there is none)."""
        return plan_for(self.config)

    @abstractmethod
    def global_shape(self, name: str) -> tuple[int, ...] | None:
        """The global shape of tensor ``name``; None when the checkpoint does not store it."""

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` is stored in."""

    @abstractmethod
    def read(self, name: str, spec: ShardSpec | None) -> torch.Tensor:
        """Global tensor ``name`` (None), or its rows ``[spec.start, spec.stop)`` along ``spec.dim``, unpadded."""

    @abstractmethod
    def expert_layout(self) -> dict | None:
        """How the routed experts are stored: {"kind": "fused"}, {"kind": "per_expert", "names": [...]}, or None."""

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor name the checkpoint stores (its own keys)."""

    @abstractmethod
    def first_float_dtype(self) -> torch.dtype | None:
        """The first floating dtype stored: the weights' own dtype for transformers' "auto" rule."""

    def _count(self, t: torch.Tensor, key: str) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        self.keys_read.add(key)
        return t

    def close(self) -> None:  # noqa: B027 (a source with no open files has nothing to close)
        """Close open files; the source can still answer questions about shapes."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
