"""Turning a loaded Hugging Face model into its tensor/expert-parallel form, one family plan at a time.

A :class:`~npu_parallel.convert.plan.Plan` (one file per family in ``plans/``) owns every fact about a
family: which module paths get which parallel style, the sizes tp must divide, where the config keeps
the number of routed experts, how its checkpoints name tensors. ``styles`` are the few reusable ways
to parallelise a module; ``conversion.convert_model`` applies a plan in place and records a
:class:`~npu_parallel.convert.conversion.ConversionInfo` on the model; ``moe_blocks`` finds a model's
MoE blocks through its plan for the tools; ``lora`` adds LoRA adapters sharded like the layers they wrap.
"""
