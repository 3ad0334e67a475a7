"""OpAudit: banned ops, host syncs, collectives, phases and scopes, with their user source lines."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn

from npu_parallel.tools.audit import OpAudit, OpEvent, audit_ops


def _line(marker: str) -> int:
    """Line number in this file of the (unique) source line ending with ``# <marker>``."""
    lines = inspect.getsource(inspect.getmodule(_line)).splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


def _at(marker: str) -> str:
    return f"{__file__}:{_line(marker)}"


def _banned_forward(fn) -> list[OpEvent]:
    x = torch.tensor([1.0, -2.0, 3.0, 1.0])
    with OpAudit() as audit:
        fn(x)
    return audit.banned()


@pytest.mark.parametrize(
    "case, op",
    [
        ("nonzero", "aten.nonzero.default"),
        ("bool_index", "aten.index.Tensor"),
        ("bool_index_put", "aten.index_put_.default"),
        ("unique", "aten._unique2.default"),
        ("masked_select", "aten.masked_select.default"),
    ],
)
def test_banned_ops_recorded_with_source_line(case: str, op: str) -> None:
    def nonzero(x):
        torch.nonzero(x)  # nonzero

    def bool_index(x):
        x[x > 0]  # bool_index

    def bool_index_put(x):
        x[x < 0] = 0  # bool_index_put

    def unique(x):
        torch.unique(x)  # unique

    def masked_select(x):
        torch.masked_select(x, x > 0)  # masked_select

    banned = _banned_forward(locals()[case])
    assert [(e.op, e.kind, e.phase, e.scope, e.where) for e in banned] == [(op, "banned", "forward", "", _at(case))]


def test_integer_index_is_not_banned() -> None:
    x = torch.arange(6.0)
    idx = torch.tensor([4, 0, 2])
    with OpAudit() as audit:
        y = x[idx]
        x[idx] = y * 2
    assert audit.banned() == []
    assert audit.events == []


@pytest.mark.parametrize(
    "case, op",
    [
        ("item", "aten._local_scalar_dense.default"),
        ("bool", "aten._local_scalar_dense.default"),
        ("tolist", "Tensor.tolist"),
        ("numpy", "Tensor.numpy"),
        ("cpu", "Tensor.cpu"),
        ("print", "Tensor.__repr__"),
    ],
)
def test_host_sync_counted_once(case: str, op: str) -> None:
    x = torch.randn(3, 4)

    def run():
        if case == "item":
            x.sum().item()  # item
        elif case == "bool":
            bool(x.sum() > 0)  # bool
        elif case == "tolist":
            x.tolist()  # tolist
        elif case == "numpy":
            x.numpy()  # numpy
        elif case == "cpu":
            x.cpu()  # cpu
        else:
            # one repr calls tolist once per row, with dispatch modes off: still one sync
            str(x)  # print

    with OpAudit() as audit:
        run()
    assert audit.host_syncs() == 1
    assert [(e.op, e.kind, e.where) for e in audit.events] == [(op, "host_sync", _at(case))]


def test_tensor_methods_restored_even_after_an_exception() -> None:
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "__repr__")}
    own = {name: name in torch.Tensor.__dict__ for name in originals}
    with pytest.raises(ValueError):
        with OpAudit():
            assert torch.Tensor.tolist is not originals["tolist"]
            raise ValueError
    for name, original in originals.items():
        assert getattr(torch.Tensor, name) is original
        assert (name in torch.Tensor.__dict__) == own[name]
    with OpAudit() as audit:
        pass
    torch.ones(2).tolist()
    assert torch.Tensor.tolist is originals["tolist"]
    assert audit.events == []


class _SyncInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        grad.sum().item()  # backward item
        return grad * 2


def test_backward_phase() -> None:
    x = torch.tensor([1.0, -1.0, 2.0], requires_grad=True)
    with OpAudit() as audit:
        y = _SyncInBackward.apply(x)
        z = y[y > 0]  # forward mask
        z.sum().backward()
    assert x.grad is not None
    assert audit.host_syncs(phase="forward") == 0
    assert audit.host_syncs(phase="backward") == 1
    sync = next(e for e in audit.events if e.kind == "host_sync")
    assert sync.where == _at("backward item")
    # the mask index and its backward (an index_put with the same mask) are both banned, one per phase
    assert [(e.op, e.phase) for e in audit.banned()] == [
        ("aten.index.Tensor", "forward"),
        ("aten.index_put.default", "backward"),
    ]
    assert audit.banned()[0].where == _at("forward mask")


def test_autograd_grad_is_backward_phase() -> None:
    x = torch.ones(3, requires_grad=True)
    with OpAudit() as audit:
        (g,) = torch.autograd.grad(_SyncInBackward.apply(x).sum(), x)
    assert torch.equal(g, torch.full((3,), 2.0))
    assert audit.host_syncs(phase="backward") == 1 and audit.host_syncs(phase="forward") == 0


def test_collective_counted() -> None:
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.ones(4)
        with OpAudit() as audit:
            dist.all_reduce(x)  # all_reduce
        assert audit.collectives() == 1
        assert audit.collectives("allreduce") == 1 and audit.collectives("allgather") == 0
        assert audit.events == [OpEvent("allreduce", "collective", "forward", "", _at("all_reduce"))]
    finally:
        if created:
            dist.destroy_process_group()


class ToyDecoderLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = _SyncInBackward.apply(h)  # one backward host sync per layer
        if h.sum() > 1e9:  # one forward host sync per layer
            h = h * 0
        return h + self.proj(h)


class ToyModel(nn.Module):
    def __init__(self, hidden: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(hidden, hidden)
        self.layers = nn.ModuleList(ToyDecoderLayer(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).sum()


def test_scopes_forward_and_backward() -> None:
    model = ToyModel()
    with OpAudit(model) as audit:
        loss = model(torch.randn(2, 4))
        float(loss.detach())  # outside every layer
        loss.backward()
    assert audit.counts_by_scope("host_sync") == {"layers.0": 1, "layers.1": 1, "": 1}
    assert audit.counts_by_scope("host_sync", phase="backward") == {"layers.0": 1, "layers.1": 1}
    assert audit.host_syncs(scope="layers.1", phase=None) == 2
    # hooks are gone after the with-block
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with OpAudit() as plain:
        model(torch.randn(2, 4))
    assert set(plain.counts_by_scope("host_sync")) == {""}


def test_scope_types_override() -> None:
    model = ToyModel()
    with OpAudit(model, scope_types=(nn.Linear,)) as audit:
        model(torch.randn(2, 4))
    # the layer's host sync is outside any nn.Linear
    assert audit.counts_by_scope("host_sync") == {"": 2}


def test_audit_ops_and_table() -> None:
    x = torch.tensor([1.0, 0.0, 2.0])

    def fn(t, *, k):
        for _ in range(k):
            torch.nonzero(t)
        return t.tolist()

    result, audit = audit_ops(fn, x, k=3)
    assert result == [1.0, 0.0, 2.0]
    table = audit.table().splitlines()
    assert table[0].split() == ["op", "kind", "count", "where"]
    assert table[1].split()[:3] == ["aten.nonzero.default", "banned", "3"]
    assert table[2].split()[:3] == ["Tensor.tolist", "host_sync", "1"]
    assert len(table) == 3


def test_data_sized_ops_are_host_syncs_and_nonzero_static_is_allowed():
    keys = torch.tensor([0, 2, 2, 1])
    with OpAudit() as audit:
        torch.bincount(keys, minlength=4)
        torch.arange(4).repeat_interleave(keys)
        torch.arange(4).repeat_interleave(keys, output_size=5)  # size given: no sync
        torch.arange(4).repeat_interleave(2)
        torch.nonzero_static(keys, size=4)
    assert audit.host_syncs() == 2
    assert audit.banned() == []


class _BadDtypes(nn.Module):
    """One NPU-hostile dtype per case, in the forward (and, through autograd, the backward)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.w
        if self.case == "complex":
            z = torch.view_as_complex(h.reshape(2, 2))  # complex
            return torch.view_as_real(z * z).sum()
        if self.case == "float64":
            return (h.double() * 2).sum().float()  # float64
        if self.case == "int_sort":
            order = torch.sort(x.to(torch.int64)).indices  # int_sort
            return h.index_select(0, order).sum()
        if self.case == "int_argsort":
            order = torch.argsort(x.to(torch.int32), stable=True)  # int_argsort
            return h.index_select(0, order).sum()
        order = torch.sort(x).indices  # float keys, real dtypes: clean
        return (h.index_select(0, order) * torch.arange(4).topk(2).values.sum()).sum()


@pytest.mark.parametrize(
    "case, dtype",
    [("complex", "complex64"), ("float64", "float64"), ("int_sort", "int64 keys"), ("int_argsort", "int32 keys")],
)
def test_npu_hostile_dtypes_are_banned_with_their_line(case: str, dtype: str) -> None:
    model = _BadDtypes(case)
    with OpAudit() as audit:
        model(torch.tensor([3.0, 1.0, 2.0, 0.0])).backward()
    banned = audit.banned()
    assert banned and all(e.op.endswith(f"[{dtype}]") for e in banned), audit.table()
    assert banned[0].where == _at(case) and banned[0].phase == "forward"
    if case in ("complex", "float64"):  # their backward runs the same dtype
        assert any(e.phase == "backward" for e in banned), audit.table()


def test_float_sort_integer_topk_and_real_dtypes_are_clean() -> None:
    model = _BadDtypes("clean")
    with OpAudit() as audit:
        model(torch.tensor([3.0, 1.0, 2.0, 0.0])).backward()
    assert audit.events == [], audit.table()
