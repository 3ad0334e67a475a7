#!/usr/bin/env python
"""Fine-tune any supported Mixture-of-Experts checkpoint with tensor/expert parallelism under torchrun.

    torchrun --nproc_per_node 4 examples/train_tp_moe.py --model_path /models/DeepSeek-V2-Lite --tp_size 4 \\
        --batch_size 1 --max_length 512 --steps 200 --lr 1e-5 --save_dir ckpt --save_every 50

`npu-parallel train` is this script as a verb; --config run.yaml gives any flag as a key (examples/configs/).
Resume exactly where a run stopped with --resume ckpt/step-N. `npu-parallel merge ckpt/step-N --out DIR`
turns a checkpoint into a Hugging Face folder. Exit codes: 0 trained, 2 a bad argument or input (one line on
stderr), 3 stopped on non-finite losses.
"""

import sys
from pathlib import Path

from npu_parallel.training.cli import TRAIN_DEFAULTS, run


def main(argv=None) -> int:
    return run(
        argv,
        description=__doc__.splitlines()[0],
        prog=Path(__file__).name,
        defaults=TRAIN_DEFAULTS,  # npu-parallel train's too
    )


if __name__ == "__main__":
    sys.exit(main())
