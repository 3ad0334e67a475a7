"""torch_npu's MoE kernels behind one adapter, and a grouped matmul on them with a backward of our own.

What the kernels do, the documentation pages relied on, and why no other kernel is used: ``docs/npu_kernels.md``.
Tests run the ``"npu"`` dispatcher on CPU through ``tests/npu_reference.py::ReferenceNpuOps``, a strict
stand-in with the same three methods as :class:`NpuOps`.
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import _disable_current_modes

from npu_parallel.parallel import device as _device
from npu_parallel.parallel.kernels import probe_device, release
from npu_parallel.parallel.probe import probe

__all__ = ["NpuOps", "accumulate_wgrad", "enable_main_grad", "gmm_add_ok", "npu_grouped_mm", "npu_ops"]

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

    def npu_grouped_matmul_add_(self, y, x, weight, group_list, *, transpose_x=True, transpose_weight=False,
                                group_type=2):  # fmt: skip
        # the 2.5/2.6 schema has no group_list_type: group_list is cumulative ends, the kernel's default
        return self.module.npu_grouped_matmul_add_(
            y, x, weight, group_list, transpose_x=transpose_x, transpose_weight=transpose_weight, group_type=group_type
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
                main_grad = _main_grad(w)
                if main_grad is not None:
                    accumulate_wgrad(ops, main_grad, x, grad, counts)
                    return None, gx, None, None  # the gradient lives in main_grad, in float32
                gw = _wgrad(ops, x, grad, counts)
        return None, gx, gw, None


def _wgrad(ops, x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[G, K, N]``: group g's ``x[rows].t() @ grad[rows]``, by k-axis grouping; zero for empty groups."""
    gw = ops.npu_grouped_matmul([x.t()], [grad], group_list=counts, split_item=3, group_type=2, group_list_type=1)[0]
    # what k-axis grouping writes for an empty group is undocumented: zero it (where, not *0: NaN)
    return torch.where((counts > 0).view(-1, 1, 1), gw, gw.new_zeros(()))


def _main_grad(w: torch.Tensor) -> torch.Tensor | None:
    """The float32 ``main_grad`` buffer of the parameter ``w`` is (a transposed view of), if it has one."""
    base = w._base if w._base is not None else w
    return getattr(base, "main_grad", None)


def enable_main_grad(*params: torch.nn.Parameter) -> None:
    """Give expert weights ``[E, N, K]`` a float32 ``main_grad`` buffer that the ``"npu"`` backward accumulates
    into (``npu_grouped_matmul_add_`` on bf16/fp16 compute), instead of setting ``.grad``: fp32 master weights
    read their gradient from there; zero it (``main_grad.zero_()``) where ``.grad`` would be set to None.

    Not for weights sharded by ``data_parallel`` (FSDP2): there the backward sees FSDP's all-gathered copy, and
    FSDP2 already reduce-scatters and accumulates the gradient in float32 (docs/npu_kernels.md); a ValueError.
    """
    from torch.distributed.tensor import DTensor

    for p in params:
        if isinstance(p, DTensor):
            raise ValueError(
                f"enable_main_grad: a parameter of shape {tuple(p.shape)} is sharded by data_parallel (FSDP2), "
                "whose float32 reduce-scatter already accumulates its gradient in .grad (fp32 master weights); "
                "drop the enable_main_grad call (it is for unsharded bf16 expert weights outside data_parallel)"
            )
        if getattr(p, "main_grad", None) is None:
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)  # type: ignore[attr-defined]


def accumulate_wgrad(
    ops, main_grad: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``main_grad[g] += grad[rows of g].t() @ x[rows of g]`` in float32: ``x [R, K]``, ``grad [R, N]``,
    ``main_grad [G, N, K]`` (the parameter's layout), ``counts`` per-group rows (int64, device).

    ``npu_grouped_matmul_add_`` (k-axis grouping straight into the fp32 buffer) for bf16/fp16 rows where its
    probe passed; else the twin: the k-axis grouped matmul, then ``add_`` in float32.
    """
    if x.dtype in (torch.bfloat16, torch.float16) and gmm_add_ok(ops, x.device.type):
        # transpose_x: the kernel reads grad [R, N] as its transposed x [N, R]; group_list: cumulative ends
        ops.npu_grouped_matmul_add_(main_grad, grad, x, counts.cumsum(0), transpose_x=True, transpose_weight=False,
                                    group_type=2)  # fmt: skip
        return main_grad
    return main_grad.add_(_wgrad(ops, grad, x, counts).float())


# the first torch_npu with a META kernel for npu_grouped_matmul_add_ (2.5.1 has the schema only): graph mode
# cannot trace it before (tests/test_npu_wheels.py)
GMM_ADD_META = (2, 6)


def gmm_add_ok(ops, device_type: str) -> bool:
    """Whether :func:`accumulate_wgrad` uses ``npu_grouped_matmul_add_`` for ``ops`` (runs its probe once)."""
    module = getattr(ops, "module", ops)
    if not hasattr(module, "npu_grouped_matmul_add_"):
        return False  # the release lacks the kernel: never tried
    if torch.compiler.is_compiling() and release(module) < GMM_ADD_META:
        return False
    label = (
        "npu_grouped_matmul_add_"
        if module is _device.torch_npu_module()
        else f"npu_grouped_matmul_add_ ({type(module).__name__})"
    )
    return probe(label, functools.partial(_check_gmm_add, ops, device_type), device_type=device_type)


def _check_gmm_add(ops, device_type: str) -> None:
    """Two groups (one empty) of bf16 rows into a non-zero fp32 buffer, against the twin."""
    dev = probe_device(device_type)
    with _disable_current_modes():
        g = torch.Generator().manual_seed(0)
        x, grad = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
        counts = torch.tensor([2, 0, 3], device=dev)
        x, grad = x.to(dev, torch.bfloat16), grad.to(dev, torch.bfloat16)
        got = torch.full((3, 3, 4), 0.5, device=dev)
        ops.npu_grouped_matmul_add_(got, grad, x, counts.cumsum(0), transpose_x=True, transpose_weight=False,
                                    group_type=2)  # fmt: skip
        want = torch.full((3, 3, 4), 0.5, device=dev)
        want[0] += grad[:2].float().t() @ x[:2].float()
        want[2] += grad[2:].float().t() @ x[2:].float()
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def npu_grouped_mm(ops: NpuOps, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` rows in groups of ``counts`` (int64 device tensor, sum M), group g times ``w[g]`` -> ``[M, N]``."""
    return _GroupedMatmul.apply(ops, x, w, counts)
