"""``npu-parallel audit`` and ``verify``: the verbs that launch ranks (or run in place inside torchrun)."""

from __future__ import annotations

import argparse
import os

from npu_parallel.tools.checks import UserError, check_output_file, write_output
from npu_parallel.tools.cli_common import DTYPES, checkpoint_errors, dump_json, progress, ranks_failed
from npu_parallel.training.errors import EXIT_FAILED, EXIT_OK


def tp_list(value: str, flag: str = "--tp") -> list[int]:
    try:
        sizes = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not sizes or any(n < 1 for n in sizes):
        raise UserError(f"{flag} {value!r}: expected positive integers, e.g. 1,2,4")
    return sorted(set(sizes))


def check_pp_sizes(path: str, sizes: list[int], micro: int | None) -> None:
    """Bad pipeline layouts (exit 2) before any rank starts: more stages than decoder layers, fewer micro-batches
    than a 1F1B step needs (the rules of :func:`~npu_parallel.training.pipeline_split.resolve_split` and
    :func:`~npu_parallel.training.pipeline.check_schedule`, in this verb's flags)."""
    if micro is not None and micro < 1:
        raise UserError(f"--grad_accum {micro}: must be a positive integer")
    if all(pp == 1 for pp in sizes):
        return
    from npu_parallel.checkpoint.hf_source import load_config
    from npu_parallel.training.errors import ConfigError
    from npu_parallel.training.pipeline_split import resolve_split

    config = load_config(path)
    for pp in sizes:
        try:
            resolve_split(config, pp)
        except ConfigError:
            n = config.num_hidden_layers
            raise UserError(
                f"--pp {pp}: the model has {n} decoder layers and every pipeline stage needs at least one; "
                f"use --pp {n} or fewer"
            ) from None
        if micro is not None and micro < pp:
            raise UserError(f"--grad_accum {micro}: a 1F1B step at pp {pp} needs at least {pp} micro-batches")


def torchrun_layout(tp_sizes: list[int], pp_sizes: list[int]) -> tuple[int, int]:
    """Inside torchrun: the one (tp, pp) with tp x pp = WORLD_SIZE that runs in place."""
    from npu_parallel.parallel.state import check_pp_size

    world = int(os.environ["WORLD_SIZE"])
    if len(pp_sizes) > 1:
        raise UserError(f"inside torchrun (WORLD_SIZE={world}) one --pp runs in place; got --pp {pp_sizes}")
    pp = pp_sizes[0]
    try:
        check_pp_size(pp, world)
    except ValueError as exc:
        raise UserError(f"--pp {pp}: {exc}") from None
    tp = world // pp
    if pp > 1 and tp not in tp_sizes:
        raise UserError(
            f"inside torchrun (WORLD_SIZE={world}) --pp {pp} runs at tp {tp} (world = tp x pp); got --tp "
            f"{','.join(map(str, tp_sizes))}"
        )
    return (in_torchrun_world(tp_sizes)[0] if pp == 1 else tp), pp


def check_tp_sizes(path: str, sizes: list[int], moe_impl: str) -> None:
    """Bad input (exit 2) before any rank starts: unreadable config, no plan, a tp size the model cannot use,
    an unknown MoE implementation, corrupt safetensors files or weights of another config."""
    from npu_parallel.checkpoint.hf_source import load_config
    from npu_parallel.convert.plans import plan_for
    from npu_parallel.tools.checks import check_moe_impl, check_weights

    config = load_config(path)
    plan = plan_for(config)
    for tp in sizes:
        plan.check_tp(config, tp)
    check_moe_impl(moe_impl)
    check_weights(path)


def in_torchrun_world(sizes: list[int], flag: str = "--tp") -> list[int]:
    """Inside torchrun only tp = WORLD_SIZE runs (in place)."""
    world = int(os.environ["WORLD_SIZE"])
    if world not in sizes:
        raise UserError(
            f"inside torchrun (WORLD_SIZE={world}) only {flag} {world} can run in place; "
            f"got {flag} {','.join(map(str, sizes))} (run without torchrun to launch each tp size)"
        )
    return [world]


@checkpoint_errors
def cmd_audit(args: argparse.Namespace) -> int:
    """One forward and backward under the op audit: banned ops, host syncs, collectives with file:line."""
    from npu_parallel.tools.audit_run import audit_summary, run_audit, stage_lines
    from npu_parallel.tools.jobs import in_torchrun

    if args.unconverted and args.tp != 1:
        raise UserError("--unconverted audits transformers' own single-process model: use --tp 1")
    if args.experts_implementation and not args.unconverted:
        raise UserError("--experts_implementation applies to transformers' model: add --unconverted")
    if args.tp < 1:
        raise UserError(f"--tp {args.tp}: must be a positive integer")
    if args.pp < 1:
        raise UserError(f"--pp {args.pp}: must be a positive integer")
    if args.unconverted and args.pp != 1:
        raise UserError("--unconverted audits transformers' own single-process model: use --pp 1")
    if in_torchrun():
        args.tp, args.pp = torchrun_layout([args.tp], [args.pp])
    check_output_file(args.json, "--json")
    if args.unconverted:
        from npu_parallel.tools.checks import check_weights

        check_weights(args.path, need_plan=False)
    else:
        check_tp_sizes(args.path, [args.tp], args.moe_impl)
        check_pp_sizes(args.path, [args.pp], args.grad_accum)
    kw: dict = dict(batch=args.batch, seq=args.seq)
    if args.pp > 1:
        kw.update(grad_accum=args.grad_accum)
    if args.unconverted:
        kw.update(unconverted=True, experts_implementation=args.experts_implementation)
    else:
        kw.update(moe_impl=args.moe_impl)
    try:
        results = run_audit(args.path, args.tp, progress=progress("audit"), pp=args.pp, **kw)
    except RuntimeError as exc:
        return ranks_failed("audit", exc)
    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_OK
    line, banned = audit_summary(results)
    stages = stage_lines(results)
    if stages:  # one table per stage (its first rank's), then a line per stage
        firsts = {r["stage"]["stage"]: r for r in reversed(results)}
        for s, r in sorted(firsts.items()):
            print(f"stage {s} (rank {r['rank']}):\n{r['table']}\n")
    else:
        print(results[0]["table"])
    print("\n".join(stages + [line]))
    if args.json:
        report = {"summary": line, "stages": stages, "banned": banned, "ranks": results}
        write_output(args.json, "--json", lambda p: dump_json(report, p))
    return EXIT_FAILED if banned else EXIT_OK


@checkpoint_errors
def cmd_verify(args: argparse.Namespace) -> int:
    """The converted model against transformers', layer by layer, at each tp size (and each pp size)."""
    from npu_parallel.tools.jobs import in_torchrun
    from npu_parallel.tools.verify import run_verify
    from npu_parallel.tools.verify_report import evaluate, format_table, layout_name, plot_errors, tolerances_for

    sizes = tp_list(args.tp)
    pps = tp_list(args.pp, "--pp")
    dtype = DTYPES.get(args.dtype.lower()) if args.dtype else None
    if dtype is None:
        raise UserError(f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    if in_torchrun():
        tp, pp = torchrun_layout(sizes, pps)
        sizes, pps = [tp], [pp]
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    check_tp_sizes(args.path, sizes, args.moe_impl)
    check_pp_sizes(args.path, pps, args.grad_accum)
    tol = tolerances_for(dtype, args.atol, args.grad_atol, args.min_agree)
    try:
        results = run_verify(
            args.path,
            sizes,
            pp_sizes=pps,
            grad_accum=args.grad_accum,
            dtype=dtype,
            moe_impl=args.moe_impl,
            backward=args.backward,
            batch=args.batch,
            seq=args.seq,
            seed=args.seed,
            perturb=args.perturb_expert,
            progress=progress("verify"),
        )
    except RuntimeError as exc:
        return ranks_failed("verify", exc)
    if not results:  # a non-zero rank inside torchrun: rank 0 reports
        return EXIT_OK
    for key in sorted(results):
        print(format_table(results[key], tol))
        print()
    failed = evaluate(results, tol)
    if args.json:  # keyed "2" at pp 1 (as before pp existed), "tp2_pp2" at pp > 1
        report = {
            "path": str(args.path),
            "tolerances": tol.__dict__,
            "passed": not failed,
            "failures": failed,
            "results": {(str(tp) if pp == 1 else f"tp{tp}_pp{pp}"): r for (tp, pp), r in results.items()},
        }
        write_output(args.json, "--json", lambda p: dump_json(report, p))
    if args.plot:
        write_output(args.plot, "--plot", lambda p: plot_errors(results, p, tol))
        print(f"plot: {args.plot}")
    if failed:
        print(f"FAILED: {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
        return EXIT_FAILED
    if all(pp == 1 for _, pp in results):
        passed = f"tp {','.join(str(tp) for tp, _ in sorted(results))}"
    else:
        passed = ", ".join(layout_name(tp, pp) for tp, pp in sorted(results))
    print(
        f"PASSED: {passed}: every layer within atol {tol.atol:g} (outputs), "
        f"{tol.grad_atol:g} (grads{'' if args.backward else ', not run'}), router agreement >= {tol.min_agree:g}%"
    )
    return EXIT_OK
