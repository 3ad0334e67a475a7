"""The Dispatcher registry and its resolution at conversion; the MoE block's route -> dispatch -> combine contract."""

import types

import pytest
import torch
from torch import nn

import npu_parallel
from npu_parallel.convert.conversion import conversion_info
from npu_parallel.moe.block import MoEBlock
from npu_parallel.moe.dispatchers import Dispatcher, Routed, base, choices, implementations, resolve_dispatcher
from npu_parallel.moe.dispatchers import npu as npu_dispatcher
from npu_parallel.moe.dispatchers.grouped import GroupedDispatcher
from npu_parallel.moe.dispatchers.masked import MaskedDispatcher
from npu_parallel.moe.dispatchers.npu import NpuDispatcher
from npu_parallel.moe.dispatchers.static import StaticDispatcher
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.router import router_outputs
from npu_parallel.parallel import device
from npu_parallel.parallel.probe import probe_results, reset_probes
from npu_parallel.parallel.state import Group

from .models import load_reference
from .npu_reference import fake_torch_npu
from .registry import portable_impls

CAPACITY_ERROR = (
    r"capacity_factor={} needs moe_impl='static' and a value > 0 \(e.g. 1.25\); "
    r"the other implementations never drop tokens"
)


def test_every_module_registers_in_listing_order():
    assert implementations() == ["grouped", "static", "masked", "npu", "alltoall", "alltoall_static"]
    assert choices() == ["auto", "grouped", "static", "masked", "npu", "alltoall", "alltoall_static"]


def test_auto_picks_per_device(monkeypatch):
    assert type(resolve_dispatcher("auto", "cpu")) is GroupedDispatcher
    assert type(resolve_dispatcher("auto", "cuda")) is GroupedDispatcher
    assert resolve_dispatcher("auto", "cpu", cross_group=True).name == "alltoall"  # ep above tp: tokens must move
    monkeypatch.setattr(device, "torch_npu_module", lambda: fake_torch_npu("2.14.0"))
    monkeypatch.setattr(npu_dispatcher, "probe_device", lambda kind: torch.device("cpu"))  # the "device" here
    reset_probes()
    assert type(resolve_dispatcher("auto", "npu")) is NpuDispatcher
    assert probe_results() == {npu_dispatcher.PROBE_NAME: "ok"}


def test_auto_falls_back_to_grouped_when_the_kernels_fail_the_probe(monkeypatch):
    """torch_npu 2.5.1: the kernels exist (hasattr passes) but permute/unpermute have no autograd."""
    monkeypatch.setattr(device, "torch_npu_module", lambda: fake_torch_npu("2.5.1"))
    monkeypatch.setattr(npu_dispatcher, "probe_device", lambda kind: torch.device("cpu"))
    reset_probes()
    with pytest.warns(RuntimeWarning, match=r"failed its capability probe on npu with torch_npu 2\.5\.1") as caught:
        assert type(resolve_dispatcher("auto", "npu")) is GroupedDispatcher
        assert type(resolve_dispatcher("auto", "npu")) is GroupedDispatcher  # cached: no second probe or warning
    assert len([w for w in caught if "capability probe" in str(w.message)]) == 1
    assert probe_results()[npu_dispatcher.PROBE_NAME].startswith("failed: ")
    with pytest.raises(ValueError, match=r"moe_impl='npu': torch_npu 2\.5\.1.*failed the capability probe.*'grouped'"):
        resolve_dispatcher("npu", "npu")  # asked for by name: an error, never a silent wrong gradient
    reset_probes()


def test_env_runs_and_prints_the_probe_only_on_an_npu(monkeypatch):
    from npu_parallel.tools import cli_env

    reset_probes()
    assert cli_env._probes("cpu") == {}  # no NPU: nothing run
    monkeypatch.setattr(device, "torch_npu_module", lambda: fake_torch_npu("2.5.1"))
    monkeypatch.setattr(npu_dispatcher, "probe_device", lambda kind: torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="capability probe"):
        verdicts = cli_env._probes("npu")
    assert verdicts[npu_dispatcher.PROBE_NAME].startswith("failed: ValueError: group_type currently only support")
    reset_probes()


def test_auto_names_missing_kernels_once(monkeypatch):
    """An old torch_npu without the MoE kernels: auto takes 'grouped' and the warning says which are missing."""
    monkeypatch.setattr(device, "torch_npu_module", lambda: types.SimpleNamespace(__version__="2.1.0"))
    reset_probes()
    with pytest.warns(RuntimeWarning, match=r"torch_npu 2\.1\.0 .*npu_moe_token_permute"):
        assert type(resolve_dispatcher("auto", "npu")) is GroupedDispatcher
    reset_probes()


@pytest.mark.parametrize(
    "impl, cf", [("grouped", 1.25), ("masked", 1.25), ("auto", 1.25), ("static", 0), ("static", -1.0)]
)
def test_capacity_factor_needs_static_and_a_positive_value(impl, cf):
    with pytest.raises(ValueError, match=CAPACITY_ERROR.format(cf)):
        resolve_dispatcher(impl, "cpu", capacity_factor=cf)


def test_options_belong_to_the_dispatcher():
    static = resolve_dispatcher("static", "cpu", capacity_factor=1.25)
    assert isinstance(static, StaticDispatcher) and static.capacity_factor == 1.25
    assert resolve_dispatcher("static", "cpu", capacity_factor=None).capacity_factor is None  # None: the default
    assert "capacity_factor=1.25" in repr(static)
    assert resolve_dispatcher(static, "cpu") is static  # an instance is used as given
    with pytest.raises(ValueError, match=r"give.*capacity_factor.*to its constructor"):
        resolve_dispatcher(static, "cpu", capacity_factor=2.0)
    with pytest.raises(ValueError, match="not an option of any MoE implementation"):
        resolve_dispatcher("grouped", "cpu", block_size=64)


def test_an_implementation_is_one_subclass(monkeypatch):
    """A subclass with a name registers itself: listed, resolvable, and it computes through the block's experts."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # forget it after the test

    class Dense(Dispatcher, name="dense_bmm", order=25):
        """Every local expert on every token in one bmm."""

        def dispatch(self, x, indices, weights, experts):
            local = torch.arange(experts.num_local) + experts.expert_start  # [E_local]
            mask = ((indices.unsqueeze(-1) == local).to(weights.dtype) * weights.unsqueeze(-1)).sum(1)  # [T, E_local]
            return Routed(x.expand(experts.num_local, -1, -1), torch.bmm, mask)

        def combine(self, y, routed):
            return torch.einsum("eth,te->th", y, routed.state)

    assert implementations() == ["grouped", "static", "masked", "dense_bmm", "npu", "alltoall", "alltoall_static"]
    assert type(resolve_dispatcher("dense_bmm", "cpu")) is Dense
    with pytest.raises(ValueError, match="is taken"):
        type("Again", (Dispatcher,), {}, name="grouped")
    ex = _experts()
    x, idx, w = torch.randn(6, 8), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    torch.testing.assert_close(Dense()(x, idx, w, ex), MaskedDispatcher()(x, idx, w, ex))


def test_convert_model_takes_a_dispatcher_and_gives_each_block_its_own(checkpoints):
    mine = StaticDispatcher(capacity_factor=1.0)
    model = npu_parallel.convert_model(
        load_reference("deepseek_v3", checkpoints / "deepseek_v3"), npu_parallel.init_distributed(), moe_impl=mine
    )
    assert conversion_info(model).moe_impl == "static"
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) >= 2
    dispatchers = [b.dispatcher for b in blocks]
    assert len({id(d) for d in dispatchers}) == len(blocks) and mine not in dispatchers
    assert all(d.capacity_factor == 1.0 for d in dispatchers)
    model(input_ids=torch.randint(0, 250, (2, 16)))
    assert mine.stats == {}  # the blocks' copies count, the template does not
    for d in dispatchers:
        assert isinstance(d.stats["dropped"], torch.Tensor) and d.stats["dropped"].dim() == 0


def _experts(num_experts=4, hidden=8, inter=6):
    g = torch.Generator().manual_seed(0)
    return LocalExperts(
        nn.Parameter(torch.randn(num_experts, 2 * inter, hidden, generator=g)),
        nn.Parameter(torch.randn(num_experts, hidden, inter, generator=g)),
        nn.SiLU(),
        num_experts,
        0,
    )


class _TopK(nn.Module):
    """A transformers-5.x-style router: ``(logits, weights, indices)``."""

    def __init__(self, hidden=8, experts=4, k=2):
        super().__init__()
        self.proj, self.k = nn.Linear(hidden, experts, bias=False), k

    def forward(self, x):
        logits = self.proj(x.reshape(-1, x.shape[-1]))
        weights, indices = logits.softmax(-1).topk(self.k, dim=-1)
        return logits, weights, indices


@pytest.mark.parametrize("impl", portable_impls())
def test_block_is_route_dispatch_compute_combine(impl):
    ex = _experts()
    router = _TopK()
    block = MoEBlock(router=router, experts=ex, dispatcher=resolve_dispatcher(impl, "cpu"), tp=Group())
    x = torch.randn(2, 3, 8)
    _, weights, indices = router(x)
    expected = MaskedDispatcher()(x.reshape(6, 8), indices, weights, ex).view(2, 3, 8)
    torch.testing.assert_close(block(x), expected)
    assert [n for n, _ in block.named_parameters()] == ["gate.proj.weight", "experts.gate_up_proj", "experts.down_proj"]


def test_block_rejects_a_router_that_gives_logits_only():
    block = MoEBlock(router=nn.Linear(8, 4, bias=False), experts=_experts(), dispatcher=GroupedDispatcher(), tp=Group())
    with pytest.raises(TypeError, match="Linear returned no top-k indices and weights"):
        block(torch.randn(2, 3, 8))


def test_router_outputs_when_every_expert_is_picked():
    """k == E: the logits have the weights' shape; the weights are the float tensor next to the indices."""
    logits = torch.randn(5, 2)
    weights, indices = logits.softmax(-1).topk(2, dim=-1)
    got = router_outputs((logits, weights, indices))  # transformers 5.x order
    assert got[0] is indices and got[1] is weights and got[2] is None
    aux = torch.tensor(0.5)
    got = router_outputs((indices, weights, aux))  # remote-code MoEGate order
    assert got[0] is indices and got[1] is weights and got[2] is aux
