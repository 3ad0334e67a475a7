"""A faithful stand-in for DeepSeek's ``trust_remote_code`` MoE modules (modeling_deepseek.py).

Same module tree and attribute names as the published code: ``DeepseekV2MoE`` with ``gate`` (a
``MoEGate`` holding ``weight``, ``top_k``, ``topk_method``, ``n_group``, ``topk_group``,
``norm_topk_prob``, ``routed_scaling_factor``, ``alpha``, ``seq_aux``), ``experts`` (an
``nn.ModuleList`` of MLPs) and ``shared_experts``; training-mode auxiliary loss attached with
``AddAuxiliaryLoss``. Written from the public description, used only as a test fixture: it puts
those modules into a transformers DeepseekV2 model in place of its fused MoE blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class DeepseekV2MLP(nn.Module):
    def __init__(self, config, hidden_size=None, intermediate_size=None):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size if hidden_size is None else hidden_size
        self.intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.gating_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty((self.n_routed_experts, self.gating_dim)))

    def forward(self, hidden_states):
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        else:
            raise NotImplementedError(f"unsupported scoring function for MoE gating: {self.scoring_func}")

        if self.topk_method == "greedy":
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(bsz * seq_len, self.n_group, -1).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = (
                group_mask.unsqueeze(-1)
                .expand(bsz * seq_len, self.n_group, self.n_routed_experts // self.n_group)
                .reshape(bsz * seq_len, -1)
            )
            tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
            topk_weight, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)

        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
            topk_weight = topk_weight / denominator
        else:
            topk_weight = topk_weight * self.routed_scaling_factor

        if self.training and self.alpha > 0.0:
            scores_for_aux = scores
            aux_topk = self.top_k
            topk_idx_for_aux_loss = topk_idx.view(bsz, -1)
            if self.seq_aux:
                scores_for_seq_aux = scores_for_aux.view(bsz, seq_len, -1)
                ce = torch.zeros(bsz, self.n_routed_experts, device=hidden_states.device)
                ce.scatter_add_(
                    1, topk_idx_for_aux_loss, torch.ones(bsz, seq_len * aux_topk, device=hidden_states.device)
                ).div_(seq_len * aux_topk / self.n_routed_experts)
                aux_loss = (ce * scores_for_seq_aux.mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                mask_ce = F.one_hot(topk_idx_for_aux_loss.view(-1), num_classes=self.n_routed_experts)
                ce = mask_ce.float().mean(0)
                pi = scores_for_aux.mean(0)
                fi = ce * self.n_routed_experts
                aux_loss = (pi * fi).sum() * self.alpha
        else:
            aux_loss = None
        return topk_idx, topk_weight, aux_loss


class AddAuxiliaryLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, loss):
        assert loss.numel() == 1
        ctx.dtype = loss.dtype
        ctx.required_aux_loss = loss.requires_grad
        return x

    @staticmethod
    def backward(ctx, grad_output):
        grad_loss = None
        if ctx.required_aux_loss:
            grad_loss = torch.ones(1, dtype=ctx.dtype, device=grad_output.device)
        return grad_output, grad_loss


class DeepseekV2MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts_per_tok = config.num_experts_per_tok
        self.ep_size, self.experts_per_rank, self.ep_rank = 1, config.n_routed_experts, 0
        self.experts = nn.ModuleList(
            [
                DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size)
                for _ in range(config.n_routed_experts)
            ]
        )
        self.gate = MoEGate(config)
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekV2MLP(
                config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
            )

    def forward(self, hidden_states):
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight, aux_loss = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(*orig_shape)
            if aux_loss is not None:
                y = AddAuxiliaryLoss.apply(y, aux_loss)
        else:
            y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(*orig_shape)
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        tokens_per_expert = tokens_per_expert.cpu().numpy()
        outputs, start_idx = [], 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return (
            new_x.view(*topk_ids.shape, -1)
            .type(topk_weight.dtype)
            .mul_(topk_weight.unsqueeze(dim=-1))
            .sum(dim=1)
            .type(new_x.dtype)
        )


def _copy_routed(moe: nn.Module, fused: nn.Module, inter: int) -> nn.Module:
    """Router and routed experts of a transformers fused MoE block copied into the remote-code modules."""
    with torch.no_grad():
        moe.gate.weight.copy_(fused.gate.weight)
        for e, expert in enumerate(moe.experts):
            expert.gate_proj.weight.copy_(fused.experts.gate_up_proj[e, :inter])
            expert.up_proj.weight.copy_(fused.experts.gate_up_proj[e, inter:])
            expert.down_proj.weight.copy_(fused.experts.down_proj[e])
    return moe


REMOTE_DEFAULTS = {"scoring_func": "softmax", "aux_loss_alpha": 0.1, "seq_aux": True, "norm_topk_prob": True}


def to_remote_layout(model: nn.Module) -> nn.Module:
    """Replace every fused transformers MoE block of a DeepseekV2 model with the remote-code modules, same weights."""
    config = model.config
    for key, value in REMOTE_DEFAULTS.items():
        if not hasattr(config, key):
            setattr(config, key, value)
    for layer in model.model.layers:
        fused = layer.mlp
        if not hasattr(fused, "experts"):
            continue
        moe = _copy_routed(DeepseekV2MoE(config).to(fused.gate.weight.dtype), fused, config.moe_intermediate_size)
        moe.shared_experts = fused.shared_experts
        layer.mlp = moe
    return model


class DeepseekMoE(DeepseekV2MoE):
    """DeepSeek-MoE 16B (v1): the same MoE block as V2's remote code (greedy softmax MoEGate, aux loss)."""


class DeepseekMLP(DeepseekV2MLP):
    pass


V1_DEFAULTS = {
    "n_routed_experts": None,
    "n_shared_experts": 1,
    "moe_intermediate_size": None,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.1,
    "seq_aux": True,
    "norm_topk_prob": False,
    "topk_method": "greedy",
    "routed_scaling_factor": 1.0,
    "n_group": None,
    "topk_group": None,
}


def to_remote_v1_layout(model: nn.Module, seed: int = 1234) -> nn.Module:
    """A transformers Mixtral model (standard attention, fused experts) turned into DeepSeek-MoE v1's remote-code
    tree: model_type "deepseek", a dense first layer, DeepseekMoE (MoEGate, ModuleList experts, shared_experts)."""
    config = model.config
    experts0 = model.model.layers[0].mlp.experts
    values = dict(
        V1_DEFAULTS, n_routed_experts=experts0.gate_up_proj.shape[0], moe_intermediate_size=experts0.down_proj.shape[2]
    )
    for key, value in values.items():
        setattr(config, key, value)
    config.model_type = "deepseek"
    config.architectures = ["DeepseekForCausalLM"]
    config.output_router_logits = False
    g = torch.Generator().manual_seed(seed)
    inter = config.moe_intermediate_size
    for i, layer in enumerate(model.model.layers):
        fused = layer.mlp
        if i < config.first_k_dense_replace:
            dense = DeepseekMLP(config, intermediate_size=4 * inter)
            with torch.no_grad():
                for p in dense.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            layer.mlp = dense
            continue
        moe = _copy_routed(DeepseekMoE(config), fused, inter)
        with torch.no_grad():
            for p in moe.shared_experts.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        layer.mlp = moe
    return model
