"""Rank worker for the two-node launch (two torchrun processes of two ranks, rendezvous on loopback)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import npu_parallel

from .common import seeded_ids


def two_nodes(src: str) -> dict:
    """tp inside a node, ep across both: a tiny load_pretrained + forward against transformers' model."""
    try:
        npu_parallel.init_distributed(4)  # a tp group across the two nodes: refused before any collective
        spanning = "accepted"
    except ValueError as exc:
        spanning = str(exc)
    state = npu_parallel.init_distributed(2, ep_size=4)
    ids = seeded_ids(250, 2, 12, 5)
    model = npu_parallel.load_pretrained(src, state, progress=False)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - AutoModelForCausalLM.from_pretrained(src)(input_ids=ids).logits).abs()
    dense, expert = state.device_mesh(("dp", "tp")), state.device_mesh(("edp", "ep"))
    meshes = (tuple(dense.shape), dense["tp"].size(), tuple(expert.shape), expert["ep"].size())
    where = [None] * state.world_size
    dist.all_gather_object(where, (os.environ["GROUP_RANK"], os.environ["LOCAL_RANK"], state.tp.ranks, state.ep.ranks))
    return {"spanning": spanning, "max_diff": diff.max().item(), "ranks": where, "meshes": meshes}
