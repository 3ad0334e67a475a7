#!/usr/bin/env python
"""Load a MoE checkpoint with experts over an ep group of whole tp groups and run one forward per dp rank.

    torchrun --nproc_per_node 4 examples/ep_forward.py --tp_size 2 --ep_size 4     # a tiny random model

Each rank reads only its slices (tp shards, E/ep experts); each dp rank runs its own batch; tokens reach the
ranks owning their experts by all-to-all (moe_impl "auto" picks "alltoall" when ep > tp).
"""

import argparse
import sys

import torch

import npu_parallel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None, help="checkpoint folder (default: a tiny DeepSeek-V2-Lite)")
    parser.add_argument("--tp_size", type=int, default=1, help="tensor-parallel size, inside a node (default 1)")
    parser.add_argument("--ep_size", type=int, default=None, help="expert-parallel size, a multiple of tp (default tp)")
    parser.add_argument("--moe_impl", default="auto", help="MoE implementation (default auto)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    args = parser.parse_args(argv)
    state = npu_parallel.init_distributed(args.tp_size, ep_size=args.ep_size)
    path = args.model_path
    if path is None:
        from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite

        path = "runs/tiny-v2-lite"
        if state.rank == 0:
            build_tiny_deepseek_v2_lite(path)
        if state.world_size > 1:
            torch.distributed.barrier()
    model = npu_parallel.load_pretrained(path, state, moe_impl=args.moe_impl, progress=False)
    torch.manual_seed(state.dp_rank)  # each dp rank its own batch, the same on the ranks of a tp group
    ids = torch.randint(0, model.config.vocab_size, (2, args.seq), device=state.device)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    block = next(m for m in model.modules() if hasattr(m, "dispatcher"))
    print(f"{state.describe()}: experts [{block.experts.expert_start}, +{block.experts.num_local}) "
          f"via {block.dispatcher.name}, loss {loss.item():.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
