"""Fine-tuning a converted model: the loop and the pieces it is built from.

``loop`` is the training loop behind ``examples/train_*.py`` (tensor parallelism inside a node, data
parallelism across, AdamW with warmup and cosine decay, accumulation, clipping by the true global norm,
JIT warmup, sharded checkpoints and exact resume); ``config`` holds its flags and checks every argument and
input before the model loads; ``cli`` is the command line the examples share (exit codes 0, 2, 3);
``guards`` makes the decisions every rank must take alike (input errors, non-finite steps, a tp group's
batch); ``data`` packs text into fixed-length sequences per data-parallel rank; chat and instruction data go
``formats`` (one module per format) -> ``templates`` -> ``labels`` (assistant-only targets) -> ``dataset``
(``packing``, the per-step micro-batches and the eval set), read by ``sources`` and checked by ``data_inputs``;
``optim`` builds the optimizer and computes the global gradient norm; ``losses`` gives the causal-LM loss, gathered or
vocab-parallel; ``metrics`` writes the JSONL log and loss curve; ``errors`` names what a run reports.
"""
