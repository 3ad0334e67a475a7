"""Checkpoints in and out of a converted model.

A :class:`~npu_parallel.checkpoint.source.TensorSource` (a Hugging Face folder: ``hf_source``; our sharded
format: ``sharded_source``) feeds the one loop in ``materialize`` that load_pretrained, load_sharded (``load``)
and the offline ``convert`` use. ``keys`` maps memory names to checkpoint keys both ways, ``manifest`` owns
the sharded format's files and which output folders may be replaced, ``save`` writes it from a live model
(``train_state``: optimizer, scheduler and RNG as safetensors plus JSON, never a pickle), ``offline``
converts and merges without a process group, ``inspect`` reports on any checkpoint from headers alone.
``peft_adapter`` reads and writes PEFT LoRA adapter folders (``apply_lora``/``save_lora``), ``lora_checkpoint``
the adapter-only step folders of a LoRA run.
"""
