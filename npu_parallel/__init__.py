"""npu_parallel: tensor/expert-parallel fine-tuning of Hugging Face MoE models on Ascend NPUs, GPUs and CPUs."""

from ._version import __version__
from .convert_model import convert_model
from .distributed import ParallelState, init_distributed
from .loading import load_pretrained
from .sharded import load_sharded, load_training_state, save_sharded

__all__ = [
    "__version__", "ParallelState", "convert_model", "init_distributed", "load_pretrained", "load_sharded",
    "load_training_state", "save_sharded",
]
