"""The fused dense kernels (parallel/kernels.py) and the fp32 weight-gradient accumulation: twins against the
transformers formulas they replace, the stand-in kernels against the twins, and a converted model with every
fused path forced on (stand-in kernels on CPU) against transformers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds2

import npu_parallel
from npu_parallel.convert.attention import padded_value_sdpa
from npu_parallel.convert.fused import InterleavedRotaryEmbedding, RMSNorm, use_fused_kernels
from npu_parallel.moe.dispatchers.grouped import GroupedDispatcher
from npu_parallel.moe.dispatchers.npu import NpuDispatcher
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.npu_ops import accumulate_wgrad, enable_main_grad
from npu_parallel.parallel import kernels
from npu_parallel.parallel.probe import probe_results, reset_probes
from npu_parallel.tools.audit import OpAudit

from .models import VARIANTS
from .npu_reference import ReferenceKernels


@pytest.fixture(autouse=True)
def _fresh_probes():
    reset_probes()
    yield
    reset_probes()


class Recording(ReferenceKernels):
    """The stand-in, counting calls per kernel name."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __deepcopy__(self, memo):
        return self  # each MoE block's copy of the dispatcher shares the kernels (and the count), as NpuOps does

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if not name.startswith("npu_"):
            return attr
        calls = object.__getattribute__(self, "calls")

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


# -- twins against what they replace ----------------------------------------------------------------------------


def _tables(b=1, s=7, half=8, scale=1.0):
    pos = torch.arange(s).float().expand(b, s)
    freqs = pos[..., None] * (1.0 / (10000 ** (torch.arange(half).float() / half)))  # [B, S, D/2]
    return torch.polar(torch.ones_like(freqs), freqs) * scale


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_rotary_twin_is_the_complex_product_exactly(scale):
    """Given the same cos/sin, the real interleaved rotation is bit-for-bit transformers' complex one."""
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 1, 7, 16)
    table = _tables(b=2, scale=scale)
    want_q, want_k = ds2.apply_rotary_emb(q, k, table)  # complex tables: transformers' own function
    cos, sin = table.real.contiguous(), table.imag.contiguous()
    assert torch.equal(kernels.rotary_interleaved(q, cos, sin), want_q)
    assert torch.equal(kernels.rotary_interleaved(k, cos, sin), want_k)
    bf16 = q.to(torch.bfloat16)  # computed in float32 and cast back, as the complex version does
    assert torch.equal(kernels.rotary_interleaved(bf16, cos, sin), ds2.apply_rotary_emb(bf16, bf16, table)[0])


def test_rotary_module_matches_transformers_rotary():
    config = VARIANTS["deepseek_v2"][0](**VARIANTS["deepseek_v2"][2])
    source = ds2.DeepseekV2RotaryEmbedding(config)
    real = InterleavedRotaryEmbedding(copy.deepcopy(source))
    x, pos = torch.randn(1, 9, 4), torch.arange(9)[None]
    complex_table, real_table = source(x, pos), real(x, pos)
    assert real_table.shape == (2, *complex_table.shape) and not real_table.is_complex()
    # torch.cos/sin against polar's sincos: at most one float32 ulp apart
    torch.testing.assert_close(real_table[0], complex_table.real, atol=2e-7, rtol=0)
    torch.testing.assert_close(real_table[1], complex_table.imag, atol=2e-7, rtol=0)


@pytest.mark.parametrize("scaling", [1.0, 1.3])  # 1.3: tables past the kernel's [-1, 1] get the third plane
def test_converted_rotary_path_matches_transformers_complex_path(scaling):
    config_cls, model_cls, kw = VARIANTS["deepseek_v2"]
    model = model_cls(config_cls(**kw))
    source = copy.deepcopy(model.model.rotary_emb)
    source.attention_scaling = model.model.rotary_emb.attention_scaling = scaling
    use_fused_kernels(model)
    assert isinstance(model.model.rotary_emb, InterleavedRotaryEmbedding)
    x, pos = torch.randn(1, 9, 4), torch.arange(9)[None]
    table = model.model.rotary_emb(x, pos)
    assert table.shape[0] == (2 if scaling <= 1 else 3)
    q, k = torch.randn(1, 8, 9, 16), torch.randn(1, 1, 9, 16)
    got = ds2.apply_rotary_emb(q, k, table)  # conversion taught transformers' function the real tables
    want = ds2.apply_rotary_emb(q, k, source(x, pos))  # complex tables: the original function
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    stand_in = Recording()
    with kernels.use_kernels(stand_in):
        fused_q, _ = ds2.apply_rotary_emb(q, k, table)
    torch.testing.assert_close(fused_q, want[0], atol=1e-6, rtol=0)
    assert ("npu_rotary_mul" in stand_in.calls) == (scaling <= 1)  # the kernel only on tables within [-1, 1]


def test_swiglu_and_rms_norm_twins_are_the_transformers_formulas():
    h = torch.randn(5, 12)
    gate, up = h.chunk(2, -1)
    assert torch.equal(kernels.swiglu(h), nn.SiLU()(gate) * up)
    assert torch.equal(kernels.swiglu_pair(gate, up), nn.SiLU()(gate) * up)
    for dtype in (torch.float32, torch.bfloat16):
        norm = ds2.DeepseekV2RMSNorm(12, eps=1e-5).to(dtype)
        nn.init.normal_(norm.weight)
        x = torch.randn(3, 5, 12).to(dtype)
        assert torch.equal(RMSNorm(norm)(x), norm(x))
    mixed = ds2.DeepseekV2RMSNorm(12)  # an fp32 weight on bf16 input promotes: the twin keeps that
    assert RMSNorm(mixed)(x).dtype == mixed(x).dtype == torch.float32


def test_attention_without_value_padding_matches_the_padded_path():
    module = nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 6, 24), torch.randn(2, 4, 6, 24), torch.randn(2, 4, 6, 16)  # Dk 24 > Dv 16
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6).clone()
    mask[1, :, 2:, 0] = False  # later tokens of the second sequence do not see its first
    for attention_mask in (None, mask):
        want, _ = padded_value_sdpa(module, q, k, v, attention_mask, scaling=0.2)
        with kernels.use_kernels(Recording()), warnings.catch_warnings():
            warnings.simplefilter("error")
            got, _ = padded_value_sdpa(module, q, k, v, attention_mask, scaling=0.2)
        assert got.shape == want.shape == (2, 6, 4, 16)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- the fused paths (stand-in kernels) against the twins, and the probe -----------------------------------------


def _fwd_bwd(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("kernel", ["swiglu", "rms_norm", "rotary"])
def test_fused_wrappers_match_their_twins(kernel):
    cos, sin = torch.randn(1, 5, 4).cos(), torch.randn(1, 5, 4).sin()
    cases = {
        "swiglu": (kernels.swiglu, kernels.swiglu_twin, [torch.randn(3, 10)]),
        "rms_norm": (
            lambda x, w: kernels.rms_norm(x, w, 1e-6),
            lambda x, w: kernels.rms_norm_twin(x, w, 1e-6),
            [torch.randn(3, 8), torch.randn(8)],
        ),
        "rotary": (
            lambda x: kernels.rotary_interleaved(x, cos, sin),
            lambda x: kernels.rotary_interleaved_twin(
                x, cos.unsqueeze(1).repeat_interleave(2, -1), sin.unsqueeze(1).repeat_interleave(2, -1)
            ),
            [torch.randn(2, 3, 5, 8)],
        ),
    }
    wrapper, twin, inputs = cases[kernel]
    name = {"swiglu": "npu_swiglu", "rms_norm": "npu_rms_norm", "rotary": "npu_rotary_mul"}[kernel]
    stand_in = Recording()
    with kernels.use_kernels(stand_in):
        out, grads = _fwd_bwd(wrapper, *inputs)
    assert stand_in.calls.get(name, 0) >= 2  # the probe's call and ours
    assert probe_results() == {f"{name} (Recording)": "ok"}
    want, want_grads = _fwd_bwd(twin, *inputs)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


class _Wrong(ReferenceKernels):
    def npu_swiglu(self, input, dim=-1):
        a, b = input.chunk(2, dim=dim)
        return torch.sigmoid(a) * b  # not silu


def test_a_failing_probe_warns_once_and_the_twin_runs():
    h = torch.randn(4, 6)
    with kernels.use_kernels(_Wrong()), pytest.warns(RuntimeWarning, match=r"npu_swiglu.*probe") as caught:
        first, second = kernels.swiglu(h), kernels.swiglu(h)
    assert len([w for w in caught if "npu_swiglu" in str(w.message)]) == 1
    assert torch.equal(first, kernels.swiglu_twin(h)) and torch.equal(second, first)
    assert probe_results()["npu_swiglu (_Wrong)"].startswith("failed: AssertionError")


def test_cpu_without_a_stand_in_never_probes():
    kernels.swiglu(torch.randn(2, 4))
    assert kernels.fused("npu_swiglu", "cpu") is None and probe_results() == {}


# -- the fp32 main-grad accumulation of the expert weight gradient --------------------------------------------------


def _experts(dtype):
    g = torch.Generator().manual_seed(0)
    return LocalExperts(
        nn.Parameter(torch.randn(4, 12, 8, generator=g).to(dtype)),
        nn.Parameter(torch.randn(4, 8, 6, generator=g).to(dtype)),
        nn.SiLU(),
        num_experts=8,
        expert_start=4,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_weight_gradient_accumulates_in_fp32_main_grad(dtype):
    """Two backward passes accumulate into main_grad (float32, the parameter's layout); .grad stays None.
    bf16 rows take npu_grouped_matmul_add_ (stand-in), float32 rows the twin (k-axis matmul, add_)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=g)
    x = torch.randn(10, 8, generator=g).to(dtype)
    ref = _experts(torch.float32)
    for _ in range(2):
        GroupedDispatcher()(x.float(), idx, weights, ref).sum().backward()
    experts, stand_in = _experts(dtype), Recording()
    enable_main_grad(experts.gate_up_proj, experts.down_proj)
    for _ in range(2):
        NpuDispatcher(ops=stand_in)(x, idx, weights.to(dtype), experts).sum().backward()
    assert stand_in.calls.get("npu_grouped_matmul_add_", 0) == (5 if dtype == torch.bfloat16 else 0)  # probe + 4
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=0.05)
    for p, want in ((experts.gate_up_proj, ref.gate_up_proj.grad), (experts.down_proj, ref.down_proj.grad)):
        assert p.grad is None and p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, want, **tol)


def test_accumulate_wgrad_twin_against_autograd():
    counts = torch.tensor([3, 0, 2])
    x, dy = torch.randn(5, 4), torch.randn(5, 6)
    main_grad = torch.ones(3, 6, 4)
    accumulate_wgrad(ReferenceKernels(), main_grad, x, dy, counts)
    w = torch.zeros(3, 6, 4, requires_grad=True)
    rows = torch.cat([x[:3] @ w[0].t(), x[3:] @ w[2].t()])
    rows.backward(dy)
    torch.testing.assert_close(main_grad, 1 + w.grad)


# -- a converted model with every fused path on, against transformers ---------------------------------------------


@pytest.mark.parametrize("name", ["deepseek_v2", "qwen3_moe", "llama"])
def test_converted_model_with_fused_kernels_matches_transformers(name):
    config_cls, model_cls, kw = VARIANTS[name]
    torch.manual_seed(0)
    ref = model_cls(config_cls(**kw, attn_implementation="sdpa")).float()
    model = copy.deepcopy(ref)
    stand_in = Recording()
    impl = NpuDispatcher(ops=stand_in) if name != "llama" else "auto"
    npu_parallel.convert_model(model, npu_parallel.init_distributed(), moe_impl=impl)
    ids = torch.randint(0, kw["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    ref.train(), model.train()
    with OpAudit() as ref_audit:
        want = ref(input_ids=ids, labels=ids)
        want.loss.backward()
    if name == "deepseek_v2":  # transformers' complex64 rotary: what the converted model replaces
        assert any(e.op.endswith("[complex64]") for e in ref_audit.banned()), ref_audit.table()
    with kernels.use_kernels(stand_in), OpAudit(model) as audit:
        got = model(input_ids=ids, labels=ids)
        got.loss.backward()
    assert not audit.banned(), audit.table()
    expected = {"npu_swiglu", "npu_rms_norm", "npu_fusion_attention"}
    expected |= {"npu_rotary_mul", "npu_moe_token_permute"} if name == "deepseek_v2" else set()
    assert expected <= set(stand_in.calls), stand_in.calls
    assert all(v == "ok" for v in probe_results().values()), probe_results()
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    grads = dict(model.named_parameters())
    for pname, p in ref.named_parameters():
        torch.testing.assert_close(grads[pname].grad, p.grad, atol=1e-4, rtol=1e-3, msg=pname)


def test_env_runs_every_probe_on_an_npu(monkeypatch, capsys):
    """`npu-parallel env` on an NPU: the MoE probe, every fused kernel's and the fp32 weight-gradient kernel's, all
    printed. An NPU simulated by the stand-in as torch_npu, its probes routed to the CPU."""
    import argparse

    from npu_parallel.moe import npu_ops
    from npu_parallel.moe.dispatchers import npu as npu_dispatcher
    from npu_parallel.parallel import device
    from npu_parallel.tools import cli_env

    stand_in = ReferenceKernels()
    stand_in.__version__ = "2.14.0"
    monkeypatch.setattr(device, "torch_npu_module", lambda: stand_in)
    cpu = lambda kind: torch.device("cpu")
    for module in (npu_dispatcher, kernels, npu_ops):
        monkeypatch.setattr(module, "probe_device", cpu)
    info = device.DeviceInfo(kind="npu", backend="hccl", count=1, torch_version=torch.__version__,
                             torch_npu_version="2.14.0")  # fmt: skip
    monkeypatch.setattr(device, "describe", lambda: info)
    assert cli_env.cmd_env(argparse.Namespace(tp=None, json=False)) == 0
    printed = capsys.readouterr().out
    variants = [f"{name} {v}" for name, vs in kernels.VARIANTS.items() for v in vs]  # npu_fusion_attention TND
    names = [npu_dispatcher.PROBE_NAME, *kernels.FUSED_KERNELS, *variants, "npu_grouped_matmul_add_"]
    assert sorted(probe_results()) == sorted(names)
    for name in names:
        assert probe_results()[name] == "ok" and f"    {name}: ok" in printed


def test_main_grad_refuses_weights_sharded_by_data_parallel():
    """Under FSDP2 the gradient is already reduced and accumulated in fp32: main_grad there would be a silent
    half-feature (the backward sees FSDP's all-gathered copy), so enable_main_grad refuses a sharded weight."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    ours = not dist.is_initialized()  # an earlier test's single-process group may already be up: use it
    if ours:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        sharded = nn.Parameter(distribute_tensor(torch.zeros(4, 3, 2), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"sharded by data_parallel \(FSDP2\).*drop the enable_main_grad call"):
            enable_main_grad(sharded)
    finally:
        if ours:
            dist.destroy_process_group()


def test_a_kernel_the_release_lacks_is_never_called_nor_probed():
    class _NoSwiglu:  # a torch_npu without npu_swiglu: the twin, no probe, no warning; env lists it as absent
        npu_rms_norm = ReferenceKernels().npu_rms_norm

    h = torch.randn(3, 8)
    with kernels.use_kernels(_NoSwiglu()), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(kernels.swiglu(h), kernels.swiglu_twin(h))
        absent = kernels.probe_all("cpu")
    assert set(absent) == {"npu_swiglu", "npu_rotary_mul", "npu_fusion_attention"}
    assert probe_results() == {"npu_rms_norm (_NoSwiglu)": "ok"}
