#!/usr/bin/env python
"""Fine-tune DeepSeek-V2-Lite with tensor/expert parallelism under torchrun.

    torchrun --nproc_per_node 8 examples/train_deepseek_v2_lite.py --model_path /models/DeepSeek-V2-Lite --tp_size 8

Conservative defaults (batch 1, max_length 256, 20 steps), HCCL timeouts exported before the process
group exists, a JIT warmup before the first step, a line per step. Without --model_path it builds a tiny
DeepSeek-V2-Lite-shaped checkpoint and trains that on the Python standard library's source code.
Exit codes: 0 trained, 2 a bad argument or input (one line on stderr), 3 stopped on non-finite losses.
"""

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from npu_parallel.parallel import device
from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite
from npu_parallel.training.cli import run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/deepseek_v2_lite", help="where the tiny default model is built")


def resolve(args: argparse.Namespace) -> None:
    """No --model_path: the tiny model under --workdir, trained at a higher default LR."""
    args.tiny = not args.model_path
    if args.tiny:
        args.model_path = str(Path(args.workdir) / "tiny-deepseek-v2-lite")
    if args.lr is None:
        args.lr = 1e-3 if args.tiny else 1e-5


def prepare(args: argparse.Namespace, state: ParallelState) -> None:
    if args.tiny:
        if state.rank == 0:
            build_tiny_deepseek_v2_lite(args.model_path)
        if state.world_size > 1:
            dist.barrier()
    if state.rank == 0:
        print(f"== DeepSeek-V2-Lite fine-tuning: {state.describe()}")
        print(f"   model {args.model_path}")
        print(
            f"   data {args.data or 'Python standard library (.py files)'}; batch {args.batch_size} x "
            f"{args.max_length} tokens x accum {args.grad_accum} x dp {state.dp_size}; {args.steps} steps; lr {args.lr}"
        )
        if state.device.type == "npu":
            print("   HCCL: " + ", ".join(f"{k}={v}" for k, v in device.hccl_settings().items() if v))


def main(argv=None) -> int:
    return run(
        argv,
        description=__doc__.splitlines()[0],
        prog=Path(__file__).name,
        defaults=dict(batch_size=1, max_length=256, steps=20, lr=None, warmup_steps=2),
        add_arguments=add_arguments,
        resolve=resolve,
        prepare=prepare,
    )


if __name__ == "__main__":
    sys.exit(main())
