"""Which MTP layers a checkpoint holds, whether they are complete, and the published copies merge writes.

A checkpoint holds the config's MTP layers when any of their tensors is stored (then every one must be:
an incomplete MTP layer is a CheckpointError); a checkpoint without any (a model saved by transformers,
which drops them) loads without MTP. See :mod:`npu_parallel.convert.mtp` for the module itself.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from npu_parallel.checkpoint.materialize import tensors_to_load
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.source import TensorSource
from npu_parallel.convert.mtp import MTP_ATTR, SHARED_COPIES, mtp_indices, mtp_prefixes, num_mtp_layers
from npu_parallel.parallel.shard_spec import ShardSpec

logger = logging.getLogger(__name__)


def mtp_count(source: TensorSource) -> int:
    """The number of MTP layers to build for ``source``: the config's when any of their tensors is stored, else 0."""
    config = source.config
    if not num_mtp_layers(config):
        return 0
    prefixes = mtp_prefixes(config)
    if any(name.startswith(prefixes) for name in source.names()):
        return num_mtp_layers(config)
    logger.info("%s: config declares %s MTP layers but stores none; loading without MTP", source.path, MTP_ATTR)
    return 0


def check_mtp_complete(model: nn.Module, source: TensorSource, count: int) -> None:
    """A one-line CheckpointError when ``source`` lacks any tensor of the ``count`` MTP layers ``model`` has."""
    if not count:
        return
    prefixes = mtp_prefixes(model.config, count)
    names = [n for n, _, _, _, is_param in tensors_to_load(model) if is_param and n.startswith(prefixes)]
    missing = [n for n in names if source.global_shape(n) is None]
    if missing:
        first = mtp_indices(model.config, count)[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source.path}: the MTP layer (model.layers.{first}.*, {MTP_ATTR}={count}) is incomplete: "
            f"{missing[0]}{more} missing; restore those tensors from the original checkpoint, or set "
            f"{MTP_ATTR} to 0 in config.json to use the model without MTP"
        )


SAMPLE_ROWS = 16  # rows of each published copy compared with the shared tensor at load


def check_shared_copies(source: TensorSource, count: int) -> None:
    """Warn when a stored copy of the shared embedding or head differs from it (its first rows compared): the
    MTP layer uses the shared tensors, and merge writes the copies from them."""
    stored = set(source.names())
    for key, main in shared_copies(source.config, stored, count):
        if key not in stored or main not in stored:
            continue
        rows = min(SAMPLE_ROWS, source.global_shape(main)[0])  # type: ignore[index]
        spec = ShardSpec(0, 0, rows, rows, rows)
        if not torch.equal(source.read(key, spec), source.read(main, spec)):
            logger.warning(
                "%s: %s differs from %s; the MTP layer uses %s (shared, as in DeepSeek-V3), and merge writes the "
                "copy from it",
                source.path,
                key,
                main,
                main,
            )


def shared_copies(config: object, stored: set[str], count: int | None = None) -> list[tuple[str, str]]:
    """(published key, stored tensor it copies) of every MTP layer's ``embed_tokens``/``shared_head.head``."""
    out = []
    for i in mtp_indices(config, count):
        if f"model.layers.{i}.eh_proj.weight" not in stored:
            continue
        for leaf, main in SHARED_COPIES:
            if main not in stored and main == "lm_head.weight":  # tied output head
                main = "model.embed_tokens.weight"
            out.append((f"model.layers.{i}.{leaf}", main))
    return out
