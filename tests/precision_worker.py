"""Rank workers for the data-parallel and mixed-precision tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.parallel.data_parallel import local_tensor
from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.verify import _full_grads

from .common import seeded_ids

SEQ = 16


def _batch(vocab: int, rows: int) -> torch.Tensor:
    return seeded_ids(vocab, rows, SEQ, 11)


def _grad_diffs(path: str, state: ParallelState, ids: torch.Tensor, expert_units: bool = False) -> dict:
    """Max abs diff of every gradient of the data_parallel model (each dp rank on its rows of ``ids``) against the
    unconverted fp32 model's gradient of the mean loss over all of ``ids``, and the largest reference gradient."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    ref(input_ids=ids, labels=ids).loss.backward()
    model = load_pretrained(path, state, dtype=torch.float32, progress=False).train()
    from npu_parallel.parallel.data_parallel import dp_mesh, is_experts

    units = sum(is_experts(m) for m in model.modules())
    # expert_units: the routed experts in FSDP2 units of their own (over the dp mesh here; issue 15 gives another)
    mesh = dp_mesh(state) if expert_units else None
    model = npu_parallel.data_parallel(model, state, precision="fp32", expert_mesh=mesh)
    rows = ids.shape[0] // state.dp_size
    mine = ids[state.dp_rank * rows : (state.dp_rank + 1) * rows]
    model(input_ids=mine, labels=mine).loss.backward()
    from npu_parallel.training.optim import global_grad_norm

    norm = global_grad_norm(model, state).item()  # over tp and dp: DTensor gradients, each shard once
    got = _full_grads(model, state)
    diffs = {n: (got[n] - p.grad).abs().max().item() for n, p in ref.named_parameters() if p.grad is not None}
    return {
        "max_diff": max(diffs.values()),
        "worst": max(diffs, key=lambda n: diffs[n]),
        "max_grad": max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None),
        "norm": norm,
        "ref_norm": torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters() if p.grad is not None)).item(),
        "compared": len(diffs),
        "params": len(dict(ref.named_parameters())),
        "dp": state.dp_size,
        "tp": state.tp_size,
        "dtensor": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "expert_modules": units,
        "expert_units": sum(type(m).__name__.startswith("FSDP") and is_experts(m) for m in model.modules()),
    }


def dp_grads(path: str) -> list[dict]:
    """On a world of 4: tp 2 x dp 2, tp 1 x dp 4 (new groups on the same world), tp 2 x dp 2 with the experts in
    FSDP2 units of their own, each against the
    unconverted model's mean-loss gradient over the same global batch of 4 sequences."""
    out = []
    for tp, expert_units in ((2, False), (1, False), (2, True)):
        state = npu_parallel.init_distributed(tp)
        out.append(_grad_diffs(path, state, _batch(250, 4), expert_units))
    return out


def learn(path: str, steps: int, precisions: list[str]) -> dict:
    """Loss drop (first - last) of the same short run in each precision; train() picks up the process group."""
    from npu_parallel.training.loop import TrainConfig, train

    out = {}
    for precision in precisions:
        cfg = TrainConfig(
            model_path=path,
            batch_size=2,
            max_length=32,
            steps=steps,
            lr=1e-5,
            warmup_steps=0,
            min_lr_ratio=1.0,
            jit_warmup_steps=0,
            seed=3,
            precision=precision,
        )
        losses = train(cfg)["losses"]
        out[precision] = {"first": losses[0], "last": losses[-1], "drop": losses[0] - losses[-1]}
    return out


# -- every collective of a training run: dtype and device ------------------------------------------------------

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather_tensor",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
)
# what HCCL (and NCCL) reduce and move; uint8 carries the pickled objects of all_gather_object & co.
DEVICE_DTYPES = {torch.float32, torch.bfloat16, torch.int32, torch.int64, torch.uint8}


class CollectiveCheck:
    """Wraps torch.distributed's collective functions (and the functional ones DTensor uses) and records each
    call's tensors: a float64 tensor, a dtype outside DEVICE_DTYPES or a tensor off ``device`` is a finding."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        self.device, self.calls, self.findings = device, {}, []
        self._saved = []
        for module in (dist, c10d, funcol):
            for name in COLLECTIVES:
                fn = getattr(module, name, None)
                if callable(fn):
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(f"{module.__name__.rpartition('.')[2]}.{name}", fn))

    def _wrap(self, name: str, fn):
        def wrapper(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            for t in _tensors(list(args) + list(kwargs.values())):
                if t.dtype not in DEVICE_DTYPES or t.device != self.device:
                    self.findings.append(f"{name}: {t.dtype} on {t.device}")
            return fn(*args, **kwargs)

        return wrapper

    def close(self) -> None:
        for module, name, fn in self._saved:
            setattr(module, name, fn)


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(local_tensor(v))
        elif isinstance(v, list | tuple):
            out += _tensors(v)
    return out


def checked_run(path: str, save_dir: str) -> dict:
    """A bf16-mixed training run at tp 2 x dp 2 (grad accumulation 2, a checkpoint at step 2, 3 steps) and its
    resume from step 2, every collective checked; the checker first proves it catches a float64 all-reduce."""
    import torch.distributed as dist

    from npu_parallel.training.loop import TrainConfig, train

    state = npu_parallel.init_distributed(2)
    check = CollectiveCheck(state.device)
    try:
        dist.all_reduce(torch.zeros(1, dtype=torch.float64), group=state.dp_group)
        caught = list(check.findings)
        check.findings.clear()
        base = dict(
            model_path=path,
            tp_size=2,
            batch_size=1,
            max_length=16,
            steps=3,
            lr=1e-3,
            warmup_steps=1,
            grad_accum=2,
            jit_warmup_steps=1,
            seed=7,
            precision="bf16",
            save_dir=save_dir,
            save_every=2,
        )
        full = train(TrainConfig(**base))["losses"]
        resumed = train(TrainConfig(**dict(base, resume=f"{save_dir}/step-2")))["losses"]
    finally:
        check.close()
    return {
        "caught": caught,
        "findings": check.findings,
        "calls": check.calls,
        "full": full,
        "resumed": resumed,
        "load_into_sharded": _load_into_sharded(path, f"{save_dir}/step-2", state),
    }


def _load_into_sharded(path: str, ckpt: str, state: ParallelState) -> float:
    """load_sharded(model=...) into a data_parallel model: each rank copies its own dp rows; max abs diff of the
    gathered parameters from the checkpoint loaded plainly."""
    from npu_parallel.checkpoint.load import load_sharded
    from npu_parallel.parallel.data_parallel import full_tensor

    plain = dict(load_sharded(ckpt, state).named_parameters())
    model = npu_parallel.data_parallel(load_pretrained(path, state, dtype=torch.float32, progress=False), state)
    load_sharded(ckpt, state, model=model)
    return max((full_tensor(p) - plain[n]).abs().max().item() for n, p in model.named_parameters())


def dp_world4(path: str, save_dir: str) -> dict:
    """One launch of 4 ranks: the data-parallel gradients, then the checked bf16 run with its resume."""
    return {"grads": dp_grads(path), "run": checked_run(path, save_dir)}
