"""npu_parallel: tensor/expert-parallel fine-tuning of Hugging Face MoE models on Ascend NPUs, GPUs and CPUs.

The names below are imported on first use, so that ``npu-parallel --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from npu_parallel._version import __version__

if TYPE_CHECKING:
    from npu_parallel.checkpoint.load import load_pretrained, load_sharded
    from npu_parallel.checkpoint.peft_adapter import apply_lora, save_lora
    from npu_parallel.checkpoint.save import load_training_state, save_sharded
    from npu_parallel.convert.conversion import convert_model
    from npu_parallel.convert.lora import merge_lora
    from npu_parallel.convert.options import ConversionOptions
    from npu_parallel.moe.gate_options import GateOptions
    from npu_parallel.moe.routing_hooks import override_routing, record_routing
    from npu_parallel.parallel.data_parallel import data_parallel
    from npu_parallel.parallel.state import ParallelState, init_distributed

_LAZY = {
    "ConversionOptions": "npu_parallel.convert.options",
    "GateOptions": "npu_parallel.moe.gate_options",
    "ParallelState": "npu_parallel.parallel.state",
    "apply_lora": "npu_parallel.checkpoint.peft_adapter",
    "convert_model": "npu_parallel.convert.conversion",
    "data_parallel": "npu_parallel.parallel.data_parallel",
    "init_distributed": "npu_parallel.parallel.state",
    "load_pretrained": "npu_parallel.checkpoint.load",
    "load_sharded": "npu_parallel.checkpoint.load",
    "load_training_state": "npu_parallel.checkpoint.save",
    "merge_lora": "npu_parallel.convert.lora",
    "override_routing": "npu_parallel.moe.routing_hooks",
    "record_routing": "npu_parallel.moe.routing_hooks",
    "save_lora": "npu_parallel.checkpoint.peft_adapter",
    "save_sharded": "npu_parallel.checkpoint.save",
}

__all__ = [
    "ConversionOptions",
    "GateOptions",
    "ParallelState",
    "__version__",
    "apply_lora",
    "convert_model",
    "data_parallel",
    "init_distributed",
    "load_pretrained",
    "load_sharded",
    "load_training_state",
    "merge_lora",
    "override_routing",
    "record_routing",
    "save_lora",
    "save_sharded",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except Exception as exc:
            from npu_parallel._cann import cann_not_sourced

            hint = cann_not_sourced(exc)
            if hint is None:
                raise
            raise ImportError(hint) from exc
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'npu_parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
