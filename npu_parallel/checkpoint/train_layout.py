"""Which training state a rank resumes from: the saved layout (world, tp, ep, pp) against this run's, and the
optimizer state of a run saved at another pipeline size put back together by parameter name.

Optimizer state is per rank (each rank's AdamW moments of the parameters it trains, its dp rows of them under
FSDP2). A run resumes at another ``pp`` when tp, ep and dp (world / pp) are the same: the rank at stage index
``i`` of its stage (``rank % (world / pp)``, the same dp and tp coordinates) reads the files of every saved
stage at that index and takes each of its parameters' state from the stage that trained it, by the parameter
names saved beside the state (``param_names``, one list per param group in the optimizer's order).
"""

from __future__ import annotations

from typing import Any

from npu_parallel.parallel.state import ParallelState

__all__ = ["merge_by_name", "param_names", "same_stage_layout", "saved_layout", "source_ranks"]


def saved_layout(training: dict) -> tuple[int, int, int, int]:
    """(world, tp, ep, pp) a checkpoint's training state was saved with (pp 1 before pipelines were recorded)."""
    tp = int(training.get("tp_size") or 1)
    world, ep, pp = (int(training.get(k) or d) for k, d in (("world_size", 1), ("ep_size", tp), ("pp_size", 1)))
    return world, tp, ep, pp


def same_stage_layout(saved: tuple[int, int, int, int], state: ParallelState) -> bool:
    """Whether this run can take the saved optimizer state: the same tp, ep and dp; pp may differ."""
    world, tp, ep, pp = saved
    return (world // pp, tp, ep) == (state.world_size // state.pp_size, state.tp_size, state.ep_size)


def source_ranks(saved: tuple[int, int, int, int], state: ParallelState) -> list[int]:
    """The saved ranks holding this rank's (dp, tp) coordinates, one per saved stage, in stage order."""
    world, _, _, pp = saved
    block = world // pp
    index = state.rank % (state.world_size // state.pp_size)
    return [s * block + index for s in range(pp)]


def param_names(optimizer: Any) -> list[list[str]] | None:
    """The names :func:`~npu_parallel.training.optim.build_optimizer` recorded for each param group's params."""
    names = getattr(optimizer, "np_param_names", None)
    return [list(g) for g in names] if names is not None else None


def merge_by_name(saved: list[dict], optimizer: Any) -> dict:
    """One optimizer ``state_dict`` (local rows, as :func:`~npu_parallel.parallel.data_parallel.local_state` saves
    it) for ``optimizer`` from the saved per-stage states: each parameter's state from the stage that saved it.
    KeyError names a parameter no saved stage's optimizer held."""
    by_name: dict[str, Any] = {}
    known: set[str] = set()
    groups_by_decay: dict[float, dict] = {}
    for s in saved:
        opt = s["optimizer"]
        flat = [n for group in s["param_names"] for n in group]
        known.update(flat)
        for group in opt["param_groups"]:
            groups_by_decay.setdefault(float(group.get("weight_decay", 0.0)), group)
        for index, entry in opt["state"].items():
            by_name.setdefault(flat[int(index)], entry)
    names = param_names(optimizer)
    assert names is not None, "build_optimizer records the parameter names"
    current = optimizer.state_dict()
    state, groups, k = {}, [], 0
    for group, group_names in zip(current["param_groups"], names, strict=True):
        hyper = groups_by_decay.get(float(group.get("weight_decay", 0.0)), group)
        groups.append({**{n: v for n, v in hyper.items() if n != "params"}, "params": group["params"]})
        for name in group_names:
            if name not in known:
                raise KeyError(f"no saved stage's optimizer holds {name}")
            if name in by_name:  # a parameter that never had a gradient has no state, as at save time
                state[k] = by_name[name]
            k += 1
    return {"state": state, "param_groups": groups}
