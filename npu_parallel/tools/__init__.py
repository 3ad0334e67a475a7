"""The user-facing tools, on top of everything else: the command line and what proves a conversion right.

``launch`` runs any ``"module:function"`` on N torchrun ranks and returns their results (verify, audit,
the tests and the benchmarks all start ranks through it); ``verify`` and ``verify_report`` compare a
converted model with transformers' layer by layer; ``audit`` (a TorchDispatchMode) and ``audit_run``
record NPU-hostile ops, host syncs and collectives of a real forward and backward; ``jobs`` decides where
those checks run; ``cli`` is the ``npu-parallel`` command; ``routing`` counts tokens per expert;
``tiny`` writes small random checkpoints shaped like the real models.
"""
