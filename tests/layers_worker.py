"""Rank worker: each parallel layer against its plain torch counterpart, values and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import npu_parallel
from npu_parallel.parallel import collectives as comm
from npu_parallel.parallel.linear import ColumnParallelLinear, RowParallelLinear
from npu_parallel.parallel.vocab import ParallelLMHead, VocabParallelEmbedding, vocab_parallel_cross_entropy


def _full_grad(local: torch.Tensor, spec, group) -> torch.Tensor:
    """Reassemble a sharded gradient to the global shape (drops vocab padding)."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    full = torch.cat(parts, dim=spec.dim)
    return full.narrow(spec.dim, 0, spec.full)


def check_layers(tp: int, vocab: int) -> dict:
    state = npu_parallel.init_distributed(tp)
    tp, g, r, n = state.tp, state.tp_group, state.tp_rank, state.tp_size
    torch.manual_seed(0)
    out = {}

    # column -> row, the Megatron MLP pair, with biases: one f, one g, bias added once
    fc1, fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
    x = torch.randn(4, 16, requires_grad=True)
    ref = fc2(F.gelu(fc1(x)))
    ref.square().sum().backward()
    c1 = ColumnParallelLinear.from_linear(fc1, tp)
    c2 = RowParallelLinear.from_linear(fc2, tp)
    xp = x.detach().clone().requires_grad_(True)
    y = c2(F.gelu(c1(xp)))
    y.square().sum().backward()
    out["mlp_out"] = (y - ref).abs().max().item()
    out["mlp_dx"] = (xp.grad - x.grad).abs().max().item()
    out["mlp_dw1"] = (_full_grad(c1.weight.grad, c1.weight.np_shard, g) - fc1.weight.grad).abs().max().item()
    out["mlp_db1"] = (_full_grad(c1.bias.grad, c1.bias.np_shard, g) - fc1.bias.grad).abs().max().item()
    out["mlp_dw2"] = (_full_grad(c2.weight.grad, c2.weight.np_shard, g) - fc2.weight.grad).abs().max().item()
    out["mlp_db2"] = (c2.bias.grad - fc2.bias.grad).abs().max().item()

    # vocab-parallel embedding (vocab may not divide tp) and the gathered LM head
    emb, head = nn.Embedding(vocab, 8), nn.Linear(8, vocab, bias=False)
    ids = torch.randint(0, vocab, (3, 7))
    ids[0, 0], ids[0, 1] = 0, vocab - 1
    ref_logits = head(emb(ids))
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), ids.flatten())
    ref_loss.backward()
    pemb = VocabParallelEmbedding.from_embedding(emb, tp)
    phead = ParallelLMHead.from_linear(head, tp)
    logits = phead(pemb(ids))
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    out["logits_shape"] = tuple(logits.shape)
    out["logits"] = (logits - ref_logits).abs().max().item()
    out["emb_grad"] = (_full_grad(pemb.weight.grad, pemb.weight.np_shard, g) - emb.weight.grad).abs().max().item()
    out["head_grad"] = (_full_grad(phead.weight.grad, phead.weight.np_shard, g) - head.weight.grad).abs().max().item()
    out["padded_rows"] = pemb.weight.shape[0] * n - vocab

    # vocab-parallel cross-entropy from local logits equals CE of the gathered logits, value and grad
    phead.gather_output = False
    h = pemb(ids).detach().requires_grad_(True)
    h_ref = h.detach().clone().requires_grad_(True)
    labels = ids.clone()
    labels[1, 2] = -100
    local = phead(h)
    vp = (
        vocab_parallel_cross_entropy(local, labels, phead.vocab_start, phead.vocab_stop, tp).sum()
        / (labels != -100).sum()
    )
    phead.gather_output = True
    ce = F.cross_entropy(phead(h_ref).flatten(0, 1), labels.flatten())
    vp.backward()
    ce.backward()
    out["vp_ce"] = abs(vp.item() - ce.item())
    out["vp_ce_dh"] = (h.grad - h_ref.grad).abs().max().item()

    # scatter/gather conjugates
    t = torch.randn(2, 4 * n, requires_grad=True)
    s = comm.scatter_to_tp(t, tp)
    back = comm.gather_from_tp(s * (r + 1), tp)
    back.sum().backward()
    expect = torch.cat([torch.full((2, 4), float(i + 1)) for i in range(n)], dim=-1)
    out["scatter_gather_grad"] = (t.grad - expect).abs().max().item() if n > 1 else 0.0
    return out
