"""The parallel runtime, below everything else: where this process runs and how ranks talk.

``device`` picks the accelerator (npu > cuda > cpu), its collective backend and the HCCL presets;
``state`` reads torchrun's environment into a :class:`~npu_parallel.parallel.state.ParallelState` whose
dimensions (tp inside a node, dp across) are typed :class:`~npu_parallel.parallel.state.Group` handles;
``collectives`` holds Megatron's autograd-aware f/g pairs over a group; ``shard_spec`` records which
global rows a local tensor holds; ``linear`` and ``vocab`` are the tensor-parallel layers built from them;
``watchdog`` names the group and the missing ranks when a collective times out, and ends a rank whose
launcher died; ``data_parallel`` shards a model over the dp ranks with FSDP2 and mixed precision (bf16 compute,
fp32 master weights).
Nothing here knows a model family, a checkpoint or a training loop.
"""
