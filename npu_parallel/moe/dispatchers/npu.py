"""``moe_impl="npu"``: torch_npu's fused permute / grouped matmul / unpermute kernels (docs/npu_kernels.md).

Shapes: T tokens, k top-k, E experts (global), E_local this rank's experts, R local slots, H hidden.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from npu_parallel.moe.dispatchers.base import Dispatcher, Routed, local_keys, slot_counts
from npu_parallel.moe.dispatchers.grouped import GroupedDispatcher
from npu_parallel.moe.experts import LocalExperts
from npu_parallel.moe.npu_ops import NpuOps, npu_grouped_mm, npu_ops
from npu_parallel.parallel import device as _device
from npu_parallel.parallel.probe import probe, probe_results

PROBE_NAME = "npu_moe_token_permute -> npu_grouped_matmul -> npu_moe_token_unpermute"


@dataclass
class _Combine:
    sorted_indices: torch.Tensor  # [T*k] int32, each slot's row in the permuted order
    weights: torch.Tensor  # [T, k]
    slots: int  # T*k
    dtype: torch.dtype  # the input's


class NpuDispatcher(Dispatcher, name="npu", order=30):
    """No host sync when this rank holds every expert, one (the local row count) under expert parallelism.

    ``ops``: the kernels (default: torch_npu's through :func:`npu_ops`, after :func:`kernels_work` proved
    them on this device; tests pass a CPU stand-in).
    """

    auto_for = ("npu",)

    def __init__(self, *, ops: NpuOps | None = None) -> None:
        super().__init__()
        self._check_dtype = ops is None  # torch_npu's own kernels: their documented dtypes
        if ops is None:
            if _device.torch_npu_module() is None:
                raise ValueError(
                    "moe_impl='npu' needs torch_npu (pip install -e .[npu] over your CANN stack); "
                    "use moe_impl='grouped' on this machine"
                )
            ops = npu_ops()  # names kernels an old torch_npu lacks, at conversion rather than in the first step
            if not kernels_work(ops, _device.device_type()):
                raise ValueError(
                    f"moe_impl='npu': torch_npu {_device.describe().torch_npu_version}'s MoE kernels failed the "
                    f"capability probe ({probe_results()[PROBE_NAME]}); use moe_impl='grouped' (or 'auto', "
                    "which falls back to it)"
                )
        self.ops = ops

    @classmethod
    def usable(cls, device_type: str) -> bool:
        """``auto`` takes this implementation only where torch_npu's kernels pass the capability probe."""
        return kernels_work(None, device_type)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> Routed:
        n_local, slots = experts.num_local, indices.numel()
        if self._check_dtype and x.dtype != torch.bfloat16:
            self._check_dtype = False
            warnings.warn(
                f"moe_impl='npu' on {x.dtype} tokens: torch_npu documents npu_moe_token_permute/unpermute for "
                "bfloat16 only (and the capability probe ran bfloat16); compare with moe_impl='grouped' or train "
                "in bfloat16",
                RuntimeWarning,
                stacklevel=2,
            )
        keys = local_keys(indices, experts)  # [T, k], E_local for other ranks' slots
        permuted, sorted_indices = self.ops.npu_moe_token_permute(x, keys.to(torch.int32))  # [T*k, H], [T*k]
        counts = slot_counts(keys, n_local + 1)[:n_local]  # [E_local]
        if experts.expert_start == 0 and n_local == experts.num_experts:
            rows = slots  # every slot is local: no sentinel rows, no sync
        else:
            rows = int(counts.sum())  # the one host sync: the grouped matmul wants sum(group_list) == rows of x
        ops = self.ops
        if n_local == 1:
            # a group list of length 1 is forbidden with group_list_type=1 (npu_grouped_matmul docs): one
            # expert's rows are a plain matmul
            matmul = lambda a, w: a @ w[0]  # rows [R, K] @ [K, N]
        else:
            matmul = lambda a, w: npu_grouped_mm(ops, a, w, counts)  # rows [R, K], w [E_local, K, N]
        return Routed(permuted[:rows], matmul, _Combine(sorted_indices, weights, slots, x.dtype))

    def combine(self, y: torch.Tensor, routed: Routed) -> torch.Tensor:
        c: _Combine = routed.state
        if y.shape[0] < c.slots:  # the sentinel slots' rows: zeros, so other ranks' slots contribute nothing
            y = torch.cat([y, y.new_zeros(c.slots - y.shape[0], y.shape[-1])])  # [T*k, H]
        # Every torch_npu release documents the unpermute for equal token and probs dtypes (bf16; its tests
        # cover nothing else): the routing weights are cast to the tokens' dtype, not the tokens to fp32.
        out = self.ops.npu_moe_token_unpermute(y, c.sorted_indices, probs=c.weights.to(y.dtype))
        return out.to(c.dtype)  # [T, H]


def _probe_case(ops: NpuOps, dev: torch.device, dtype: torch.dtype, start: int, n_local: int) -> None:
    """Forward and backward of both dispatchers on a tiny layer; raises if a gradient is missing or differs."""
    g = torch.Generator().manual_seed(0)
    t, k, h, i, e = 8, 2, 16, 8, 4
    experts = LocalExperts(
        torch.nn.Parameter((torch.randn(n_local, 2 * i, h, generator=g, device="cpu") / 4).to(dev, dtype)),
        torch.nn.Parameter((torch.randn(n_local, h, i, generator=g, device="cpu") / 4).to(dev, dtype)),
        torch.nn.SiLU(),
        num_experts=e,
        expert_start=start,
    )
    idx = torch.stack([torch.randperm(e, generator=g, device="cpu")[:k] for _ in range(t)]).to(dev)  # [T, k]
    w0 = torch.rand(t, k, generator=g, device="cpu").softmax(-1).to(dev)  # [T, k] fp32, as the routers give them
    x0 = torch.randn(t, h, generator=g, device="cpu").to(dev, dtype)
    grad = torch.randn(t, h, generator=g, device="cpu").to(dev, dtype)
    results = []
    for dispatcher in (NpuDispatcher(ops=ops), GroupedDispatcher()):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        params = [experts.gate_up_proj, experts.down_proj]
        out = dispatcher(x, idx, w, experts)
        grads = torch.autograd.grad(out, [x, w, *params], grad, allow_unused=True)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    tol = 1e-2 if dtype == torch.float32 else 6e-2  # fp32 matmuls may run in HF32 on Ascend
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg="forward differs from 'grouped'")
    names = ("tokens", "routing weights", "gate_up_proj", "down_proj")
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        if got is None:
            raise RuntimeError(f"no gradient reaches the {name} (the kernels have no autograd here)")
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=f"gradient of the {name}")


def probe_device(device_type: str) -> torch.device:
    """The device this process drives (init_distributed set it): where the probe runs."""
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, getattr(torch, device_type).current_device())


def kernels_work(ops: NpuOps | None, device_type: str) -> bool:
    """Run the permute -> grouped matmul -> unpermute probe once per process (bf16, all-local and EP).

    ``ops`` None: torch_npu's, whose absence or missing kernels fail the probe with the reason.
    """

    def check() -> None:
        kernels = npu_ops() if ops is None else ops
        dev = probe_device(device_type)
        # bf16: what training computes in on Ascend (bf16 compute, fp32 master weights)
        _probe_case(kernels, dev, torch.bfloat16, start=0, n_local=4)  # every expert local: no sentinel rows
        _probe_case(kernels, dev, torch.bfloat16, start=1, n_local=2)  # expert parallelism: sentinel rows, one sync

    return probe(PROBE_NAME, check, device_type=device_type)
