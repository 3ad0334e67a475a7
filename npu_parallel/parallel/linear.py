"""Tensor-parallel linear layers: column- and row-parallel, and the replicated forms MLA and GQA need."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import Self

from npu_parallel.parallel import kernels
from npu_parallel.parallel.collectives import copy_to_tp, reduce_from_tp, reduce_grad_columns
from npu_parallel.parallel.shard_spec import ShardedModule, ShardSpec, even_range, mark, shard_tensor
from npu_parallel.parallel.state import Group


def with_adapter(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus the output of an adapter attached as ``module.lora`` (LoRA, convert/lora.py) on ``x``.

    The sum in the adapter's dtype (fp32 adapters on a bf16 layer, as PEFT), returned in ``y``'s.
    """
    lora = module._modules.get("lora")
    return y if lora is None else (y + lora(x)).to(y.dtype)


def sharded_param(t: torch.Tensor, requires_grad: bool, spec: ShardSpec | None = None) -> nn.Parameter:
    """A new parameter over ``t`` carrying its shard spec (None: replicated)."""
    param = nn.Parameter(t, requires_grad=requires_grad)
    mark(param, spec)
    return param


class _SplitLinear(ShardedModule):
    """A linear whose weight is split along ``split_dim`` (0: output features, 1: input features)."""

    split_dim: ClassVar[int]

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp: Group):
        super().__init__()
        self.weight, self.bias, self.tp = weight, bias, tp
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: Group, **options: bool) -> Self:
        """This rank's even slice of ``linear``; the bias is split with the output features, else kept whole."""
        dim = cls.split_dim
        full = linear.weight.shape[dim]
        start, stop = even_range(full, tp.size, tp.rank)
        spec = ShardSpec(dim, start, stop, full, stop - start)
        weight = sharded_param(shard_tensor(linear.weight.data, dim, start, stop), linear.weight.requires_grad, spec)
        bias = None
        if linear.bias is not None:
            data = shard_tensor(linear.bias.data, 0, start, stop) if dim == 0 else linear.bias.data.clone()
            bias = sharded_param(data, linear.bias.requires_grad, spec if dim == 0 else None)
        return cls(weight, bias, tp, **options)


class ColumnParallelLinear(_SplitLinear):
    """``y_local = x @ W[rows of this rank].T``: output features split across the TP group.

    ``input_grad_reduce`` puts f (identity forward, all-reduce backward) on the input; turn it off when
    the enclosing block already applied f once to an input shared by several column-parallel layers.
    """

    split_dim = 0

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp: Group, *, input_grad_reduce: bool = True):
        super().__init__(weight, bias, tp)
        self.input_grad_reduce = input_grad_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_grad_reduce:
            x = copy_to_tp(x, self.tp)
        return with_adapter(self, x, F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out_local={self.out_features}, bias={self.bias is not None}"


class RowParallelLinear(_SplitLinear):
    """``y = sum_r x_r @ W_r.T + b``: input features split, partial sums all-reduced, bias added once.

    With ``reduce_output=False`` the partial sum is returned without the bias; the caller reduces it
    together with other partial sums (one all-reduce per block) and then adds ``self.bias``.
    """

    split_dim = 1

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp: Group, *, reduce_output: bool = True):
        super().__init__(weight, bias, tp)
        self.reduce_output = reduce_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = with_adapter(self, x, F.linear(x, self.weight))  # an adapter's partial sum joins the layer's
        if not self.reduce_output:
            return y
        y = reduce_from_tp(y, self.tp)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_local={self.in_features}, out={self.out_features}, reduce={self.reduce_output}"


class HeadSelectLinear(ShardedModule):
    """Key/value projection kept whole when tp does not divide the key/value heads (GQA).

    Every rank computes all key/value heads and keeps ``[start, stop)``, the heads its query heads
    use; backward all-reduces the output gradient, so the whole weight gets the summed gradient on
    every rank (each head's users hold a part of it) and stays identical across ranks.
    """

    def __init__(self, linear: nn.Linear, start: int, stop: int, tp: Group):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.start, self.stop, self.tp = start, stop, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_grad_columns(with_adapter(self, x, F.linear(x, self.weight, self.bias)), 0, self.tp)
        return y[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, keeps=[{self.start}, {self.stop})"


class GradSummedRMSNorm(ShardedModule):
    """RMSNorm (transformers' formula) whose weight gradient is summed over the TP group: for a norm
    shared by attention heads that are split across ranks (Qwen3's q_norm/k_norm)."""

    def __init__(self, norm: nn.Module, tp: Group):
        super().__init__()
        self.weight: nn.Parameter = norm.weight  # type: ignore[assignment]
        self.variance_epsilon = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        self.tp = tp

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(hidden_states, copy_to_tp(self.weight, self.tp), self.variance_epsilon)


class ReplicatedLinear(ShardedModule):
    """A linear every rank holds whole; backward all-reduces the output-gradient columns ``[grad_sum_from:]``.

    MLA's ``kv_a_proj_with_mqa`` is the case: its latent columns feed the column-parallel ``kv_b_proj``
    (whose f already sums that gradient) while its rope columns feed every rank's heads directly.
    """

    def __init__(self, linear: nn.Linear, grad_sum_from: int, tp: Group):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.grad_sum_from, self.tp = grad_sum_from, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = with_adapter(self, x, F.linear(x, self.weight, self.bias))
        return reduce_grad_columns(y, self.grad_sum_from, self.tp)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, grad_sum_from={self.grad_sum_from}"
