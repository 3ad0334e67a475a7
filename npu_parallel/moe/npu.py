"""The ``"npu"`` expert dispatch: torch_npu's fused MoE kernels (permute, grouped matmul, unpermute).

:func:`npu_moe` has the contract of :func:`npu_parallel.moe.dispatch.grouped`. The algorithm, its host syncs,
the kernel documentation relied on and why no other kernel is used: ``docs/npu_kernels.md``. Tests run it
on CPU through ``tests/npu_reference.py::ReferenceNpuOps``, a strict stand-in with the methods of
:class:`NpuOps`.
"""

from __future__ import annotations

import torch

from npu_parallel.parallel import device as _device
from npu_parallel.moe.experts import LocalExperts

__all__ = ["NpuOps", "npu_ops", "npu_moe"]

_REQUIRED = ("npu_moe_token_permute", "npu_moe_token_unpermute", "npu_grouped_matmul")


class NpuOps:
    """The torch_npu kernels :func:`npu_moe` uses, same names, argument names and semantics."""

    def __init__(self, module) -> None:
        self.module = module

    def npu_moe_token_permute(self, tokens, indices, num_out_tokens=None, padded_mode=False):
        return self.module.npu_moe_token_permute(tokens, indices, num_out_tokens=num_out_tokens,
                                                 padded_mode=padded_mode)

    def npu_moe_token_unpermute(self, permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                                restore_shape=None):
        return self.module.npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=probs,
                                                   padded_mode=padded_mode, restore_shape=restore_shape)

    def npu_grouped_matmul(self, x, weight, *, group_list=None, split_item=0, group_type=-1, group_list_type=0):
        # only the arguments used here are forwarded: older torch_npu builds lack some later keywords
        return self.module.npu_grouped_matmul(x, weight, group_list=group_list, split_item=split_item,
                                              group_type=group_type, group_list_type=group_list_type)


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


# --- the implementation -----------------------------------------------------------------------------


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
        return ops.npu_grouped_matmul([x], [w], group_list=counts, split_item=2, group_type=0,
                                      group_list_type=1)[0]

    @staticmethod
    def backward(ctx, grad):
        x, w, counts = ctx.saved_tensors
        ops, gx, gw = ctx.ops, None, None
        grad = grad.contiguous()
        if ctx.needs_input_grad[1]:
            gx = (torch.zeros_like(x) if x.shape[0] == 0 else
                  ops.npu_grouped_matmul([grad], [w.transpose(1, 2)], group_list=counts, split_item=2,
                                         group_type=0, group_list_type=1)[0])
        if ctx.needs_input_grad[2]:
            if x.shape[0] == 0:
                gw = torch.zeros_like(w)
            else:
                gw = ops.npu_grouped_matmul([x.t()], [grad], group_list=counts, split_item=3, group_type=2,
                                            group_list_type=1)[0]
                # what k-axis grouping writes for an empty group is undocumented: zero it (where, not *0: NaN)
                gw = torch.where((counts > 0).view(-1, 1, 1), gw, gw.new_zeros(()))
        return None, gx, gw, None


def _local_keys(indices: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
    """Local expert number of each slot, ``num_local`` (a sentinel that sorts last) when remote."""
    local = indices - experts.expert_start
    inside = (local >= 0) & (local < experts.num_local)
    return torch.where(inside, local, torch.full_like(local, experts.num_local))


def npu_moe(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts,
            ops: NpuOps | None = None) -> torch.Tensor:
    """This rank's partial MoE output ``[T, H]`` on torch_npu's fused kernels (contract of ``dispatch.grouped``).

    No host sync when the rank holds all experts, one (the local row count) under expert parallelism.
    """
    ops = npu_ops() if ops is None else ops
    t, k = indices.shape
    n_local, slots = experts.num_local, indices.numel()
    keys = _local_keys(indices, experts)
    permuted, sorted_indices = ops.npu_moe_token_permute(x, keys.to(torch.int32))
    flat = keys.reshape(-1)
    counts = flat.new_zeros(n_local + 1).scatter_add_(0, flat, torch.ones_like(flat))[:n_local]
    if experts.expert_start == 0 and n_local == experts.num_experts:
        rows = slots  # every slot is local: no sentinel rows, no sync
    else:
        rows = int(counts.sum())  # the one host sync: the grouped matmul wants sum(group_list) == rows of x
    xs = permuted[:rows]
    gate, up = _GroupedMatmul.apply(ops, xs, experts.gate_up_proj.transpose(1, 2), counts).chunk(2, dim=-1)
    h = _GroupedMatmul.apply(ops, experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2), counts)
    if rows < slots:  # the sentinel slots' rows: zeros, so other ranks' slots contribute nothing
        h = torch.cat([h, h.new_zeros(slots - rows, h.shape[-1])])
    # routing weights and the k-slot sum in the weights' dtype, as dispatch.grouped does
    out = ops.npu_moe_token_unpermute(h.to(weights.dtype), sorted_indices, probs=weights)
    return out.to(x.dtype)
