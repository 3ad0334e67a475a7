"""torch_npu's MoE kernels behind one adapter, and a grouped matmul on them with a backward of our own.

What the kernels do, the documentation pages relied on, and why no other kernel is used: ``docs/npu_kernels.md``.
Tests run the ``"npu"`` dispatcher on CPU through ``tests/npu_reference.py::ReferenceNpuOps``, a strict
stand-in with the same three methods as :class:`NpuOps`.
"""

from __future__ import annotations

import torch

from npu_parallel.parallel import device as _device

__all__ = ["NpuOps", "npu_grouped_mm", "npu_ops"]

_REQUIRED = ("npu_moe_token_permute", "npu_moe_token_unpermute", "npu_grouped_matmul")


class NpuOps:
    """The torch_npu kernels the ``"npu"`` dispatcher uses, same names, argument names and semantics."""

    def __init__(self, module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> NpuOps:
        return self  # stateless, and a Python module cannot be copied: copies of a model share the kernels

    def npu_moe_token_permute(self, tokens, indices, num_out_tokens=None, padded_mode=False):
        return self.module.npu_moe_token_permute(
            tokens, indices, num_out_tokens=num_out_tokens, padded_mode=padded_mode
        )

    def npu_moe_token_unpermute(
        self, permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None
    ):
        return self.module.npu_moe_token_unpermute(
            permuted_tokens, sorted_indices, probs=probs, padded_mode=padded_mode, restore_shape=restore_shape
        )

    def npu_grouped_matmul(self, x, weight, *, group_list=None, split_item=0, group_type=-1, group_list_type=0):
        # only the arguments used here are forwarded: older torch_npu builds lack some later keywords
        return self.module.npu_grouped_matmul(
            x,
            weight,
            group_list=group_list,
            split_item=split_item,
            group_type=group_type,
            group_list_type=group_list_type,
        )


def npu_ops() -> NpuOps:
    """The real kernels; a clear error when torch_npu is absent or too old to have them."""
    module = _device.torch_npu_module()
    if module is None:
        raise RuntimeError(
            "moe_impl='npu' needs torch_npu (Ascend's PyTorch plugin), which is not installed or failed to "
            "import. Install it matching your torch and CANN versions, e.g. `pip install -e .[npu]`, or use "
            "moe_impl='grouped'."
        )
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"moe_impl='npu' needs torch_npu.{', torch_npu.'.join(missing)}, missing from torch_npu "
            f"{getattr(module, '__version__', '?')}; upgrade torch_npu (`pip install -e .[npu]`) or use "
            "moe_impl='grouped'."
        )
    return NpuOps(module)


class _GroupedMatmul(torch.autograd.Function):
    """``y[rows of group g] = x[rows of g] @ w[g]`` on ``npu_grouped_matmul``, with a backward of our own.

    ``x [M, K]`` (rows grouped by ``counts``, an int64 device tensor of per-group sizes summing to M),
    ``w [G, K, N]`` -> ``[M, N]``. Backward: ``dx`` by m-axis grouping with ``w.transpose(1, 2)``,
    ``dw [G, K, N]`` by k-axis grouping of ``x.t()`` (a transposed view, as the doc requires) with ``dy``.
    """

    @staticmethod
    def forward(ctx, ops, x, w, counts):
        ctx.ops = ops
        ctx.save_for_backward(x, w, counts)
        if x.shape[0] == 0:  # a rank with no local rows: the docs do not promise empty inputs work
            return x.new_zeros(0, w.shape[-1])
        return ops.npu_grouped_matmul([x], [w], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]

    @staticmethod
    def backward(ctx, grad):
        x, w, counts = ctx.saved_tensors
        ops, gx, gw = ctx.ops, None, None
        grad = grad.contiguous()
        if ctx.needs_input_grad[1]:
            gx = (
                torch.zeros_like(x)
                if x.shape[0] == 0
                else ops.npu_grouped_matmul(
                    [grad], [w.transpose(1, 2)], group_list=counts, split_item=2, group_type=0, group_list_type=1
                )[0]
            )
        if ctx.needs_input_grad[2]:
            if x.shape[0] == 0:
                gw = torch.zeros_like(w)
            else:
                gw = ops.npu_grouped_matmul(
                    [x.t()], [grad], group_list=counts, split_item=3, group_type=2, group_list_type=1
                )[0]
                # what k-axis grouping writes for an empty group is undocumented: zero it (where, not *0: NaN)
                gw = torch.where((counts > 0).view(-1, 1, 1), gw, gw.new_zeros(()))
        return None, gx, gw, None


def npu_grouped_mm(ops: NpuOps, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` rows in groups of ``counts`` (int64 device tensor, sum M), group g times ``w[g]`` -> ``[M, N]``."""
    return _GroupedMatmul.apply(ops, x, w, counts)
