"""Tensor-parallel building blocks: column/row-parallel linear, vocab-parallel embedding and LM head, vocab-parallel CE."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import _all_reduce, _size, copy_to_tp, gather_from_tp, reduce_from_tp, reduce_grad_columns
from .sharding import ShardSpec, ShardedModule, even_range, mark, padded_range, shard_tensor


def _param(t: torch.Tensor, requires_grad: bool, spec: ShardSpec | None = None) -> nn.Parameter:
    return mark(nn.Parameter(t, requires_grad=requires_grad), spec)


class ColumnParallelLinear(ShardedModule):
    """``y_local = x @ W[rows of this rank].T``: output features split across the TP group.

    ``input_grad_reduce`` puts f (identity forward, all-reduce backward) on the input; turn it off when
    the enclosing block already applied f once to an input shared by several column-parallel layers.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, *, input_grad_reduce: bool = True):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.input_grad_reduce = input_grad_reduce
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_rank: int, tp_size: int, group, **kw) -> "ColumnParallelLinear":
        start, stop = even_range(linear.out_features, tp_size, tp_rank)
        spec = ShardSpec(0, start, stop, linear.out_features, stop - start)
        weight = _param(shard_tensor(linear.weight.data, 0, start, stop), linear.weight.requires_grad, spec)
        bias = None
        if linear.bias is not None:
            bias = _param(shard_tensor(linear.bias.data, 0, start, stop), linear.bias.requires_grad, spec)
        return cls(weight, bias, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_grad_reduce:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out_local={self.out_features}, bias={self.bias is not None}"


class RowParallelLinear(ShardedModule):
    """``y = sum_r x_r @ W_r.T + b``: input features split, partial sums all-reduced, bias added once.

    With ``reduce_output=False`` the partial sum is returned without the bias; the caller reduces it
    together with other partial sums (one all-reduce per block) and then adds ``self.bias``.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, *, reduce_output: bool = True):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.reduce_output = reduce_output
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_rank: int, tp_size: int, group, **kw) -> "RowParallelLinear":
        start, stop = even_range(linear.in_features, tp_size, tp_rank)
        spec = ShardSpec(1, start, stop, linear.in_features, stop - start)
        weight = _param(shard_tensor(linear.weight.data, 1, start, stop), linear.weight.requires_grad, spec)
        bias = None
        if linear.bias is not None:
            bias = _param(linear.bias.data.clone(), linear.bias.requires_grad)
        return cls(weight, bias, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.reduce_output:
            return y
        y = reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_local={self.in_features}, out={self.out_features}, reduce={self.reduce_output}"


class HeadSelectLinear(ShardedModule):
    """Key/value projection kept whole when tp does not divide the key/value heads (GQA).

    Every rank computes all key/value heads and keeps ``[start, stop)``, the heads its query heads
    use; backward all-reduces the output gradient, so the whole weight gets the summed gradient on
    every rank (each head's users hold a part of it) and stays identical across ranks.
    """

    def __init__(self, linear: nn.Linear, start: int, stop: int, group):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.start, self.stop, self.group = start, stop, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_grad_columns(F.linear(x, self.weight, self.bias), 0, self.group)
        return y[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, keeps=[{self.start}, {self.stop})"


class GradSummedRMSNorm(ShardedModule):
    """RMSNorm (transformers' formula) whose weight gradient is summed over the TP group: for a norm
    shared by attention heads that are split across ranks (Qwen3's q_norm/k_norm)."""

    def __init__(self, norm: nn.Module, group):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        self.group = group

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return copy_to_tp(self.weight, self.group) * hidden_states.to(input_dtype)


class ReplicatedLinear(ShardedModule):
    """A linear every rank holds whole; backward all-reduces the output-gradient columns ``[grad_sum_from:]``.

    MLA's ``kv_a_proj_with_mqa`` is the case: its latent columns feed the column-parallel ``kv_b_proj``
    (whose f already sums that gradient) while its rope columns feed every rank's heads directly.
    """

    def __init__(self, linear: nn.Linear, grad_sum_from: int, group):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.grad_sum_from, self.group = grad_sum_from, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_grad_columns(F.linear(x, self.weight, self.bias), self.grad_sum_from, self.group)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, grad_sum_from={self.grad_sum_from}"


def _vocab_shard(weight: torch.Tensor, tp_rank: int, tp_size: int, requires_grad: bool):
    vocab = weight.shape[0]
    start, stop, block = padded_range(vocab, tp_size, tp_rank)
    spec = ShardSpec(0, start, stop, vocab, block)
    return _param(shard_tensor(weight, 0, start, stop, padded=block), requires_grad, spec), spec


class VocabParallelEmbedding(ShardedModule):
    """Rows of the embedding split over the TP group; a vocab tp does not divide is padded here only."""

    def __init__(self, weight: nn.Parameter, spec: ShardSpec, group, padding_idx: int | None = None):
        super().__init__()
        self.weight, self.group = weight, group
        self.vocab_start, self.vocab_stop, self.num_embeddings = spec.start, spec.stop, spec.full
        self.embedding_dim = weight.shape[1]
        local_pad = None
        if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_stop:
            local_pad = padding_idx - self.vocab_start
        self.padding_idx = local_pad

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, tp_rank: int, tp_size: int, group) -> "VocabParallelEmbedding":
        weight, spec = _vocab_shard(emb.weight.data, tp_rank, tp_size, emb.weight.requires_grad)
        return cls(weight, spec, group, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _size(self.group) == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_stop - self.vocab_start)
        # clamp + multiply instead of boolean-mask indexing (unsupported in NPU graph mode)
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight, self.padding_idx)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, local=[{self.vocab_start}, {self.vocab_stop}), dim={self.embedding_dim}"


class ParallelLMHead(ShardedModule):
    """Column-parallel LM head over the (padded) vocab.

    ``gather_output=True`` returns full-vocab logits (the HF contract); ``False`` returns this rank's
    vocab slice for :func:`vocab_parallel_cross_entropy`, never materialising the full logits.
    """

    def __init__(self, weight: nn.Parameter, spec: ShardSpec, bias: nn.Parameter | None, group, gather_output: bool = True):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.vocab_start, self.vocab_stop, self.vocab_size = spec.start, spec.stop, spec.full
        self.gather_output = gather_output
        self.in_features = weight.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_rank: int, tp_size: int, group, shared_weight=None) -> "ParallelLMHead":
        if shared_weight is not None:
            weight, spec = shared_weight, shared_weight.np_shard
        else:
            weight, spec = _vocab_shard(linear.weight.data, tp_rank, tp_size, linear.weight.requires_grad)
        bias = None
        if linear.bias is not None:
            bias = _param(shard_tensor(linear.bias.data, 0, spec.start, spec.stop, padded=spec.padded),
                          linear.bias.requires_grad, spec)
        return cls(weight, spec, bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        if not self.gather_output:
            return logits
        return gather_from_tp(logits, self.group)[..., : self.vocab_size]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, vocab={self.vocab_size}, local=[{self.vocab_start}, {self.vocab_stop}), gather={self.gather_output}"


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_stop, group, ignore_index):
        logits = logits.float()
        n_local = vocab_stop - vocab_start
        if logits.shape[-1] > n_local:  # padding columns past the real vocab never win the softmax
            col = torch.arange(logits.shape[-1], device=logits.device)
            logits = logits.masked_fill(col >= n_local, float("-inf"))
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local_t = target - vocab_start
        outside = (local_t < 0) | (local_t >= n_local)
        safe_t = local_t.clamp(0, logits.shape[-1] - 1)
        picked = shifted.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1) * (~outside).to(shifted.dtype)
        _all_reduce(picked, group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, group)
        loss = sum_exp.log() - picked
        valid = (target != ignore_index).to(loss.dtype)
        loss = loss * valid
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, safe_t, outside, valid)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, safe_t, outside, valid = ctx.saved_tensors
        g = softmax.clone()
        onehot = F.one_hot(safe_t, g.shape[-1]).to(g.dtype) * (~outside).to(g.dtype).unsqueeze(-1)
        g = (g - onehot) * (grad * valid).unsqueeze(-1)
        return g, None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_stop: int, group,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy from vocab-sharded logits; three small all-reduces, no full-vocab tensor."""
    if _size(group) == 1:
        logits = local_logits[..., : vocab_stop - vocab_start].float()
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                               reduction="none").view(target.shape)
    return _VocabParallelCE.apply(local_logits, target, vocab_start, vocab_stop, group, ignore_index)
