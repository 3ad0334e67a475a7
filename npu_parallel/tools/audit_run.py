"""``npu-parallel audit``: one forward and backward of a small batch under :class:`~npu_parallel.tools.audit.OpAudit`.

tp = 1 runs in this process, tp > 1 on launched ranks (:func:`npu_parallel.tools.jobs.run_jobs`); inside a
torchrun job (``WORLD_SIZE`` set) every rank audits itself in place.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from npu_parallel.convert.conversion import conversion_info
from npu_parallel.parallel.state import ParallelState
from npu_parallel.tools.jobs import quiet, random_batch, run_jobs, timed

__all__ = ["audit_rank", "audit_summary", "run_audit"]


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
) -> dict:
    """One forward and backward under OpAudit on this rank: its events and what ran."""
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
    ids = random_batch(model.config.vocab_size, batch, seq, seed).to(state.device)
    model.train()
    with OpAudit(model) as audit:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    return {
        "rank": state.rank,
        "what": what,
        "tokens": [batch, seq],
        "events": [dict(e.__dict__) for e in audit.events],
        "table": audit.table(),
    }


def run_audit(path: str, tp: int = 1, progress: Callable[[str], None] | None = None, **kw) -> list[dict]:
    """Per-rank audit results in rank order (inside torchrun: this rank's only); ``kw`` as :func:`audit_rank`'s.

    ``progress`` gets a line as the audit (and each of its ranks) starts and finishes.
    """
    job = {"task": "audit", "path": str(path), "kwargs": kw}
    (results,) = timed("auditing one forward and backward", tp, lambda say: run_jobs(tp, [job], progress=say), progress)
    return results


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
