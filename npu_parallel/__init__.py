"""npu_parallel: tensor/expert-parallel fine-tuning of Hugging Face MoE models on Ascend NPUs, GPUs and CPUs."""

from npu_parallel._version import __version__
from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.save import load_training_state, save_sharded
from npu_parallel.convert.conversion import convert_model
from npu_parallel.parallel.state import ParallelState, init_distributed

__all__ = [
    "ParallelState",
    "__version__",
    "convert_model",
    "init_distributed",
    "load_pretrained",
    "load_sharded",
    "load_training_state",
    "save_sharded",
]
