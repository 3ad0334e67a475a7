#!/usr/bin/env python
"""Fine-tune any supported Mixture-of-Experts checkpoint with tensor/expert parallelism under torchrun.

    torchrun --nproc_per_node 4 examples/train_tp_moe.py --model_path /models/DeepSeek-V2-Lite --tp_size 4 \\
        --batch_size 1 --max_length 512 --steps 200 --lr 1e-5 --save_dir ckpt --save_every 50

Resume exactly where a run stopped with --resume ckpt/step-N. `npu-parallel merge ckpt/step-N --out DIR`
turns a checkpoint into a Hugging Face folder.
"""

import argparse
import logging
import sys

import torch.distributed as dist

from npu_parallel.training.loop import add_train_args, config_from_args, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_args(parser, batch_size=1, max_length=512, steps=100, lr=1e-5, warmup_steps=10)
    args = parser.parse_args(argv)
    if not args.model_path:
        parser.error("--model_path is required (a Hugging Face checkpoint folder)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(config_from_args(args))
    if dist.get_rank() == 0:
        print(
            f"== done: loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}; checkpoint {result['checkpoint']}"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
