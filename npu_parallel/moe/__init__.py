"""The Mixture-of-Experts block of a converted model, and the ways to run its experts.

``block.MoEBlock`` is written as route -> dispatch -> compute -> combine: the family's own router runs
replicated on every rank (``router.router_outputs`` reads whatever it returns), a
:class:`~npu_parallel.moe.dispatchers.Dispatcher` groups the token-slots of this rank's experts, the
:class:`~npu_parallel.moe.experts.LocalExperts` compute them through the dispatcher's matmul (grouped GEMM,
batched capacity buffers, torch_npu kernels), and the dispatcher combines them back into the partial output
the block all-reduces together with the shared experts. Implementations live one per file in
``dispatchers/`` and are chosen once, at conversion, by ``moe_impl``; everything here is NPU-safe.
"""
