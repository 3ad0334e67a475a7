"""Fine-tuning a converted model: the loop and the pieces it is built from.

``loop`` is the training loop behind ``examples/train_*.py`` (tensor parallelism inside a node, data
parallelism across, AdamW with warmup and cosine decay, accumulation, clipping by the true global norm,
JIT warmup, sharded checkpoints and exact resume); ``data`` packs text into fixed-length sequences per
data-parallel rank; ``optim`` builds the optimizer and computes the global gradient norm; ``losses``
gives the causal-LM loss, gathered or vocab-parallel; ``metrics`` writes the JSONL log and loss curve.
"""
