"""``npu-parallel audit``: one forward and backward of a small batch under :class:`~npu_parallel.tools.audit.OpAudit`.

tp = 1 runs in this process, tp > 1 on launched ranks (:func:`npu_parallel.tools.jobs.run_jobs`); inside a
torchrun job (``WORLD_SIZE`` set) every rank audits itself in place.

At pp > 1 every rank audits its stage's part of one pipelined step (``pipeline_step``, 1F1B over ``grad_accum``
micro-batches, after one unaudited step that builds the schedule): the stage's banned ops and host syncs, its
collectives, and the point-to-point sends and receives between the stages, reported per stage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from npu_parallel.convert.conversion import conversion_info
from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.jobs import quiet, random_batch, run_jobs, timed

__all__ = ["audit_rank", "audit_summary", "run_audit", "stage_lines"]


def audit_rank(
    path: str,
    state: ParallelState,
    *,
    moe_impl: str = "auto",
    unconverted: bool = False,
    experts_implementation: str | None = None,
    batch: int = 2,
    seq: int = 16,
    seed: int = 1234,
    grad_accum: int | None = None,
) -> dict:
    """One forward and backward under OpAudit on this rank (its stage's part of a pipelined step at pp > 1): its
    events and what ran."""
    from npu_parallel.tools.audit import OpAudit

    quiet()
    if unconverted:
        from npu_parallel.checkpoint.load import load_unconverted

        kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
        model: PreTrainedModel = load_unconverted(path, torch.float32, None, **kwargs)  # fp8 dequantized
        what = (
            f"unconverted transformers model (experts_implementation={model.config._experts_implementation})"
            if hasattr(model.config, "_experts_implementation")
            else "unconverted transformers model"
        )
    else:
        from npu_parallel.checkpoint.load import load_pretrained

        model = load_pretrained(path, state, dtype=torch.float32, moe_impl=moe_impl, progress=False)
        what = f"converted, tp={state.tp_size}, moe_impl={conversion_info(model).moe_impl}"
    ids = random_batch(model.config.vocab_size, batch, seq, seed)
    model.train()
    stage = None
    if state.pp_size > 1:
        audit, stage = _audit_pipelined(model, state, ids, grad_accum or state.pp_size)
        what += f", pp={state.pp_size}"
    else:
        ids = ids.to(state.device)
        with OpAudit(model) as audit:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
    return {
        "rank": state.rank,
        "what": what,
        "tokens": [batch, seq],
        "events": [dict(e.__dict__) for e in audit.events],
        "table": audit.table(),
        "stage": stage,
    }


def _audit_pipelined(model: PreTrainedModel, state: ParallelState, ids: torch.Tensor, micro: int) -> tuple:
    """(OpAudit of this rank's part of one 1F1B step over ``micro`` copies of ``ids``, its stage's description)."""
    from npu_parallel.tools.audit import OpAudit
    from npu_parallel.training.batch import Batch
    from npu_parallel.training.pipeline import build_pipeline, pipeline_step

    pipe = build_pipeline(model, state, schedule="1f1b")
    batches = [Batch.from_windows(ids).to(state.device)] * micro
    pipeline_step(pipe, batches, state)  # builds the schedule (once per shape): the audited step is a steady one
    for p in pipe.parameters():
        p.grad = None
    with OpAudit(model) as audit:
        pipeline_step(pipe, batches, state)
    start, stop = pipe.split.ranges()[state.pp_rank]
    parts = [f"layers {start}-{stop - 1}" if stop - start > 1 else f"layer {start}"]
    parts += ["embedding"] if state.pp_rank == 0 else []
    parts += ["norm, head"] if state.pp_rank == state.pp_size - 1 else []
    # the hidden states [B, L, H] cross the stages forward (activations, to the next stage) and backward (their
    # gradients, to the previous one); the side vector of the load-balancing sums travels beside them
    hidden = f"{str(pipe.hidden_dtype).removeprefix('torch.')}{[*ids.shape, int(model.config.hidden_size)]}"
    p2p = audit.p2p()
    return audit, {
        "stage": state.pp_rank,
        "stages": state.pp_size,
        "holds": " + ".join(parts),
        "micro": micro,
        "schedule": "1f1b",
        "p2p": p2p,
        "activation_sends": p2p.get(f"send to {state.pp_rank + 1} {hidden}", 0),
        "gradient_sends": p2p.get(f"send to {state.pp_rank - 1} {hidden}", 0),
    }


def run_audit(path: str, tp: int = 1, progress: Callable[[str], None] | None = None, pp: int = 1, **kw) -> list[dict]:
    """Per-rank audit results in rank order (inside torchrun: every rank's on rank 0, this rank's on the others);
    ``kw`` as :func:`audit_rank`'s.

    ``progress`` gets a line as the audit (and each of its ranks) starts and finishes.
    """
    job = {"task": "audit", "path": str(path), "kwargs": kw}
    what = "auditing one forward and backward" if pp == 1 else "auditing one pipelined step"
    (results,) = timed(what, tp, lambda say: run_jobs(tp, [job], progress=say, pp=pp), progress, pp=pp)
    return _gather_in_place(results)


def _gather_in_place(results: list[dict]) -> list[dict]:
    """Inside torchrun every rank audited itself: rank 0 gets every rank's result (the stages' too), in rank order."""
    import torch.distributed as dist

    from npu_parallel.tools.jobs import in_torchrun

    if not (in_torchrun() and dist.is_initialized() and dist.get_world_size() > 1):
        return results
    every: list = [None] * dist.get_world_size()
    dist.gather_object(results[0], every if dist.get_rank() == 0 else None, dst=0)
    return every if dist.get_rank() == 0 else results


def audit_summary(results: list[dict]) -> tuple[str, int]:
    """(summary line, number of banned ops over all ranks)."""
    per_rank = []
    total_banned = 0
    for res in results:
        kinds = Counter((e["kind"], e["phase"]) for e in res["events"])
        banned = kinds[("banned", "forward")] + kinds[("banned", "backward")]
        total_banned += banned
        per_rank.append(
            (
                banned,
                kinds[("host_sync", "forward")],
                kinds[("host_sync", "backward")],
                kinds[("collective", "forward")] + kinds[("collective", "backward")],
            )
        )
    b, sf, sb, c = per_rank[0]
    head = results[0]
    line = (
        f"{head['what']}: forward+backward on {head['tokens'][0]}x{head['tokens'][1]} tokens: "
        f"{b} banned ops, {sf + sb} host syncs (forward {sf}, backward {sb}), {c} collectives"
    )
    if len(results) > 1:
        same = all(p == per_rank[0] for p in per_rank)
        line += f" (rank 0; {len(results)} ranks, {'all the same' if same else 'per rank ' + str(per_rank)})"
    line += "  -> " + ("CLEAN" if total_banned == 0 else f"BANNED OPS FOUND ({total_banned})")
    return line, total_banned


def stage_lines(results: list[dict]) -> list[str]:
    """At pp > 1, one line per stage (its first rank's figures): what it holds, banned ops, host syncs, collectives
    and the point-to-point transfers of the step; empty at pp 1."""
    lines: list[tuple[int, str]] = []
    seen: set[int] = set()
    for res in results:
        stage = res.get("stage")
        if not stage or stage["stage"] in seen:
            continue
        seen.add(stage["stage"])
        events = res["events"]
        banned = sum(e["kind"] == "banned" for e in events)
        syncs = sum(e["kind"] == "host_sync" for e in events)
        others = Counter(e["op"] for e in events if e["kind"] == "collective" and e["op"] not in ("send", "recv"))
        p2p = ", ".join(f"{k} x{v}" for k, v in sorted(stage["p2p"].items())) or "none"
        coll = ", ".join(f"{k} x{v}" for k, v in sorted(others.items())) or "none"
        lines.append(
            (
                stage["stage"],
                f"stage {stage['stage']} (rank {res['rank']}: {stage['holds']}): {banned} banned ops, "
                f"{syncs} host syncs, "
                f"{stage['activation_sends']} activation sends, {stage['gradient_sends']} gradient sends per "
                f"{stage['schedule']} step of {stage['micro']} micro-batches; P2P: {p2p}; other collectives: {coll}",
            )
        )
    return [line for _, line in sorted(lines)]
