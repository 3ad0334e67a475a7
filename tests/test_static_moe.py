"""The static (graph-mode) MoE path: torch.compile(fullgraph=True) forward and backward, capacity and drops."""

import copy

import pytest
import torch
from torch import nn

import npu_parallel
from npu_parallel.moe.dispatchers.masked import MaskedDispatcher
from npu_parallel.moe.dispatchers.static import StaticDispatcher, capacity
from npu_parallel.moe.experts import LocalExperts

from .models import load_reference


def _experts(n_experts=16, n_local=8, start=8, hidden=32, inter=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LocalExperts(
        nn.Parameter(torch.randn(n_local, 2 * inter, hidden, generator=g) / 4),
        nn.Parameter(torch.randn(n_local, hidden, inter, generator=g) / 4),
        nn.SiLU(),
        n_experts,
        start,
    )


def _kept(idx: torch.Tensor, w: torch.Tensor, cap: int, start: int = 8, stop: int = 16) -> tuple[torch.Tensor, int]:
    """The weights with every slot past its local expert's capacity (in token order) zeroed, and their count."""
    kept, seen, dropped = w.clone(), {}, 0
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if start <= e < stop:
                seen[e] = seen.get(e, 0) + 1
                if seen[e] > cap:
                    kept[t, j], dropped = 0, dropped + 1
    return kept, dropped


def test_compiled_fullgraph_moe_layer_forward_backward(checkpoints):
    """A converted DeepSeek-V3 MoE block (router included) compiles as one graph and matches eager."""
    model = npu_parallel.convert_model(
        load_reference("deepseek_v3", checkpoints / "deepseek_v3"), npu_parallel.init_distributed(), moe_impl="static"
    )
    moe = model.model.layers[1].mlp
    x = torch.randn(2, 16, 64, requires_grad=True)
    eager = copy.deepcopy(moe)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = eager(x2)
    y2.square().sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for (n, p), (_, p2) in zip(moe.named_parameters(), eager.named_parameters(), strict=True):
        assert torch.allclose(p.grad, p2.grad, atol=1e-5), n


def test_static_dropless_equals_reference_and_reports_no_drops():
    ex = _experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=g)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(40)])
    w = torch.rand(40, 4, generator=g)
    static = StaticDispatcher()
    out = static(x, idx, w, ex)
    assert torch.allclose(out, MaskedDispatcher()(x, idx, w, ex), atol=1e-5) and int(static.stats["dropped"]) == 0


def test_capacity_factor_drops_latest_tokens_first():
    ex = _experts()
    x = torch.randn(40, 32)
    idx = torch.full((40, 2), 8)  # every token to local expert 0 (global 8) ...
    idx[:, 1] = torch.arange(40) % 16  # ... and one spread slot
    idx[idx[:, 1] == 8, 1] = 9
    w = torch.rand(40, 2)
    static = StaticDispatcher(capacity_factor=1.25)
    cap = capacity(40, 2, 16, 1.25)
    out = static(x, idx, w, ex)
    # reference: masked with the slots past each expert's capacity (in token order) given weight zero
    kept_w, expected_drops = _kept(idx, w, cap)
    assert int(static.stats["dropped"]) == expected_drops > 0
    assert torch.allclose(out, MaskedDispatcher()(x, idx, kept_w, ex), atol=1e-5)


def test_capacity_factor_needs_static(checkpoints):
    model = load_reference("deepseek_v2", checkpoints / "deepseek_v2")
    with pytest.raises(ValueError, match=r"capacity_factor=1.25 needs moe_impl='static'"):
        npu_parallel.convert_model(model, npu_parallel.init_distributed(), capacity_factor=1.25)
