#!/usr/bin/env python
"""Fine-tune DeepSeek-V2-Lite with tensor/expert parallelism under torchrun.

    torchrun --nproc_per_node 8 examples/train_deepseek_v2_lite.py --model_path /models/DeepSeek-V2-Lite --tp_size 8

Conservative defaults (batch 1, max_length 256, 20 steps), HCCL timeouts exported before the process
group exists, a JIT warmup before the first step, a line per step. Without --model_path it builds a tiny
DeepSeek-V2-Lite-shaped checkpoint and trains that on the Python standard library's source code.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from npu_parallel import init_distributed
from npu_parallel.parallel import device
from npu_parallel.tools.tiny import build_tiny_deepseek_v2_lite
from npu_parallel.training.loop import add_train_args, config_from_args, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(parser, batch_size=1, max_length=256, steps=20, lr=None, warmup_steps=2)
    parser.add_argument("--workdir", default="runs/deepseek_v2_lite", help="where the tiny default model is built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    state = init_distributed(args.tp_size, timeout_s=args.timeout_s)  # applies the HCCL defaults on NPU first
    if not args.model_path:
        args.model_path = str(Path(args.workdir) / "tiny-deepseek-v2-lite")
        if state.rank == 0:
            build_tiny_deepseek_v2_lite(args.model_path)
        dist.barrier()
        args.lr = args.lr or 1e-3
    args.lr = args.lr or 1e-5
    if state.rank == 0:
        print(f"== DeepSeek-V2-Lite fine-tuning: {state.describe()}")
        print(f"   model {args.model_path}")
        print(
            f"   data {args.data or 'Python standard library (.py files)'}; batch {args.batch_size} x "
            f"{args.max_length} tokens x accum {args.grad_accum} x dp {state.dp_size}; {args.steps} steps; lr {args.lr}"
        )
        if state.device.type == "npu":
            print("   HCCL: " + ", ".join(f"{k}={v}" for k, v in device.hccl_settings().items() if v))
    result = train(config_from_args(args))
    if state.rank == 0:
        losses = result["losses"]
        print(
            f"== done: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps"
            + (f"; checkpoint {result['checkpoint']}" if result["checkpoint"] else "")
            + (f"; metrics {result['metrics']}" if result["metrics"] else "")
            + (f"; loss curve {result['plot']}" if result["plot"] else "")
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
