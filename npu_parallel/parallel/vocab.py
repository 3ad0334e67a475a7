"""The vocabulary split over the TP group: embedding, LM head and a cross-entropy that never gathers logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from npu_parallel.parallel.collectives import _all_reduce, copy_to_tp, gather_from_tp, reduce_from_tp
from npu_parallel.parallel.linear import sharded_param
from npu_parallel.parallel.shard_spec import ShardedModule, ShardSpec, padded_range, shard_tensor, spec_of
from npu_parallel.parallel.state import Group


def _vocab_shard(weight: torch.Tensor, tp: Group, requires_grad: bool) -> tuple[nn.Parameter, ShardSpec]:
    vocab = weight.shape[0]
    start, stop, block = padded_range(vocab, tp.size, tp.rank)
    spec = ShardSpec(0, start, stop, vocab, block)
    return sharded_param(shard_tensor(weight, 0, start, stop, padded=block), requires_grad, spec), spec


class VocabParallelEmbedding(ShardedModule):
    """Rows of the embedding split over the TP group; a vocab tp does not divide is padded here only."""

    def __init__(self, weight: nn.Parameter, spec: ShardSpec, tp: Group, padding_idx: int | None = None):
        super().__init__()
        self.weight, self.tp = weight, tp
        self.vocab_start, self.vocab_stop, self.num_embeddings = spec.start, spec.stop, spec.full
        self.embedding_dim = weight.shape[1]
        local_pad = None
        if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_stop:
            local_pad = padding_idx - self.vocab_start
        self.padding_idx = local_pad

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, tp: Group) -> VocabParallelEmbedding:
        weight, spec = _vocab_shard(emb.weight.data, tp, emb.weight.requires_grad)
        return cls(weight, spec, tp, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_stop - self.vocab_start)
        # clamp + multiply instead of boolean-mask indexing (unsupported in NPU graph mode)
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight, self.padding_idx)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return reduce_from_tp(out, self.tp)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, local=[{self.vocab_start}, {self.vocab_stop}), dim={self.embedding_dim}"


class ParallelLMHead(ShardedModule):
    """Column-parallel LM head over the (padded) vocab.

    ``gather_output=True`` returns full-vocab logits (the HF contract); ``False`` returns this rank's
    vocab slice for :func:`vocab_parallel_cross_entropy`, never materialising the full logits.
    """

    def __init__(
        self, weight: nn.Parameter, spec: ShardSpec, bias: nn.Parameter | None, tp: Group, gather_output: bool = True
    ):
        super().__init__()
        self.weight, self.bias, self.tp = weight, bias, tp
        self.vocab_start, self.vocab_stop, self.vocab_size = spec.start, spec.stop, spec.full
        self.gather_output = gather_output
        self.in_features = weight.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: Group, shared_weight: nn.Parameter | None = None) -> ParallelLMHead:
        if shared_weight is not None:
            weight, spec = shared_weight, spec_of(shared_weight)
            assert spec is not None, "a tied LM head shares the vocab-parallel embedding's shard"
        else:
            weight, spec = _vocab_shard(linear.weight.data, tp, linear.weight.requires_grad)
        bias = None
        if linear.bias is not None:
            bias = sharded_param(
                shard_tensor(linear.bias.data, 0, spec.start, spec.stop, padded=spec.padded),
                linear.bias.requires_grad,
                spec,
            )
        return cls(weight, spec, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)
        if not self.gather_output:
            return logits
        return gather_from_tp(logits, self.tp)[..., : self.vocab_size]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, vocab={self.vocab_size}, local=[{self.vocab_start}, {self.vocab_stop}), "
            f"gather={self.gather_output}"
        )


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_stop, group, ignore_index):
        # logits [..., V_local] (padded columns past the real vocab at the end), target [...]
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
    local_logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    vocab_stop: int,
    tp: Group,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy from vocab-sharded logits; three small all-reduces, no full-vocab tensor."""
    if tp.size == 1:
        logits = local_logits[..., : vocab_stop - vocab_start].float()
        return F.cross_entropy(
            logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index, reduction="none"
        ).view(target.shape)
    return _VocabParallelCE.apply(local_logits, target, vocab_start, vocab_stop, tp.group, ignore_index)
