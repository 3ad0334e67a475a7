"""The ``npu-parallel`` command: env, inspect, convert, merge, audit, verify.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from npu_parallel.tools.checks import UserError, check_args, check_output_file, write_output
from npu_parallel.training.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def progress(verb: str):
    """A printer of ``npu-parallel VERB: ...`` progress lines on stderr (stdout keeps the tables)."""

    def say(message: str) -> None:
        print(f"npu-parallel {verb}: {message}", file=sys.stderr, flush=True)

    return say


def cmd_env(args: argparse.Namespace) -> int:
    """Device, backend, world/tp/dp sizes and the HCCL settings in force."""
    import torch

    from npu_parallel.parallel import device
    from npu_parallel.parallel.state import check_tp_size

    info = device.describe()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = world if args.tp is None else args.tp
    try:
        check_tp_size(tp, world)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    hccl = device.hccl_settings()
    would_apply = {k: v for k, v in device.HCCL_DEFAULTS.items() if hccl.get(k) is None}
    report = {
        "torch": info.torch_version,
        "torch_npu": info.torch_npu_version,
        "device": info.kind,
        "device_count": info.count,
        "backend": info.backend,
        "bf16": device.supports_bf16(info.kind),
        "world_size": world,
        "tp_size": tp,
        "dp_size": world // tp,
        "rank": int(os.environ.get("RANK", "0")),
        "hccl_env": hccl,
        "hccl_defaults_applied_on_npu": would_apply if info.kind == "npu" else {},
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print("npu_parallel environment")
    print(f"  torch        {report['torch']}")
    print(f"  torch_npu    {report['torch_npu'] or 'not installed'}")
    print(
        f"  device       {report['device']} x {report['device_count']}  "
        f"(backend {report['backend']}, bf16 {'yes' if report['bf16'] else 'no'})"
    )
    print(f"  world/tp/dp  {world} / {tp} / {world // tp}")
    print("  HCCL / allocator settings:")
    for key, value in hccl.items():
        note = ""
        if value is None and key in would_apply:
            note = (
                f"  (init_distributed sets {would_apply[key]} on NPU)"
                if info.kind == "npu"
                else f"  (default {would_apply[key]} on NPU)"
            )
        print(f"    {key:<28} {value if value is not None else '-'}{note}")
    return EXIT_OK


DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def parse_dtype(value: str | None):
    import torch

    if value is None:
        return None
    if value.lower() not in DTYPES:
        raise UserError(f"--dtype {value!r} is not one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[value.lower()])


def _checkpoint_errors(fn):
    """Turn the checkpoint's and the plan's ValueErrors (bad input) into exit code 2."""

    def run(args):
        try:
            return fn(args)
        except ValueError as exc:  # CheckpointError included
            raise UserError(str(exc).splitlines()[0]) from None

    run.__doc__ = fn.__doc__
    return run


@_checkpoint_errors
def cmd_inspect(args: argparse.Namespace) -> int:
    """What a user needs before converting: structure, sizes, valid tp sizes."""
    if getattr(args, "routing", False):
        return cmd_inspect_routing(args)
    from npu_parallel.checkpoint.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


@_checkpoint_errors
def cmd_convert(args: argparse.Namespace) -> int:
    """HF checkpoint -> tp rank files, streamed; no process group needed."""
    from npu_parallel.checkpoint.offline import convert_checkpoint

    out = convert_checkpoint(
        args.path, args.tp, args.out, dtype=parse_dtype(args.dtype), overwrite=args.overwrite, progress=not args.quiet
    )
    print(f"wrote {out} (tp={args.tp})")
    return EXIT_OK


@_checkpoint_errors
def cmd_merge(args: argparse.Namespace) -> int:
    """tp rank files -> a Hugging Face checkpoint that from_pretrained loads."""
    from npu_parallel.checkpoint.manifest import MARKER
    from npu_parallel.checkpoint.offline import merge_checkpoint

    out = merge_checkpoint(
        args.path,
        args.out,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        progress=not args.quiet,
        tokenizer=args.tokenizer,
        keep_others=not args.clean,
    )
    mark = json.loads((out / MARKER).read_text())
    tok = mark["tokenizer"]
    got = [f"{', '.join(tok['files'])} from {tok['from']}"] if tok["files"] else []
    got += [f"kept {', '.join(tok['kept'])}"] if tok["kept"] else []
    print(f"wrote {out}: {mark['tensors']} tensors; tokenizer: {'; '.join(got) or 'none (see the warning above)'}")
    return EXIT_OK


def cmd_inspect_routing(args: argparse.Namespace) -> int:
    """Tokens per expert per MoE layer on a sample (unconverted model, one process)."""
    from npu_parallel.tools.checks import check_weights, read_text
    from npu_parallel.tools.routing import format_routing, inspect_routing, plot_routing

    if args.data:
        read_text(args.data)
    check_output_file(args.plot, "--plot")
    check_weights(args.path, need_plan=False)
    rows, source = inspect_routing(args.path, data=args.data, tokens=args.tokens)
    if args.plot:
        write_output(args.plot, "--plot", lambda p: plot_routing(rows, p, source))
    if args.json:
        print(json.dumps({"source": source, "layers": rows}, indent=2))
    else:
        print(format_routing(rows, source))
        if args.plot:
            print(f"heat map: {args.plot}")
    return EXIT_OK


def _tp_list(value: str) -> list[int]:
    try:
        sizes = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--tp {value!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not sizes or any(n < 1 for n in sizes):
        raise UserError(f"--tp {value!r}: expected positive integers, e.g. 1,2,4")
    return sorted(set(sizes))


def _check_tp_sizes(path: str, sizes: list[int], moe_impl: str) -> None:
    """Bad input (exit 2) before any rank starts: unreadable config, no plan, a tp size the model cannot use,
    an unknown MoE implementation, corrupt safetensors files or weights of another config."""
    from npu_parallel.checkpoint.hf_source import load_config
    from npu_parallel.convert.plan import plan_for
    from npu_parallel.tools.checks import check_moe_impl, check_weights

    config = load_config(path)
    plan = plan_for(config)
    for tp in sizes:
        plan.check_tp(config, tp)
    check_moe_impl(moe_impl)
    check_weights(path)


def _in_torchrun_world(sizes: list[int], flag: str = "--tp") -> list[int]:
    """Inside torchrun only tp = WORLD_SIZE runs (in place)."""
    world = int(os.environ["WORLD_SIZE"])
    if world not in sizes:
        raise UserError(
            f"inside torchrun (WORLD_SIZE={world}) only {flag} {world} can run in place; "
            f"got {flag} {','.join(map(str, sizes))} (run without torchrun to launch each tp size)"
        )
    return [world]


@_checkpoint_errors
def cmd_audit(args: argparse.Namespace) -> int:
    """One forward and backward under the op audit: banned ops, host syncs, collectives with file:line."""
    from npu_parallel.tools.audit_run import audit_summary, run_audit
    from npu_parallel.tools.jobs import in_torchrun

    if args.unconverted and args.tp != 1:
        raise UserError("--unconverted audits transformers' own single-process model: use --tp 1")
    if args.experts_implementation and not args.unconverted:
        raise UserError("--experts-implementation applies to transformers' model: add --unconverted")
    if args.tp < 1:
        raise UserError(f"--tp {args.tp}: must be a positive integer")
    if in_torchrun():
        args.tp = _in_torchrun_world([args.tp])[0]
    check_output_file(args.json, "--json")
    if args.unconverted:
        from npu_parallel.tools.checks import check_weights

        check_weights(args.path, need_plan=False)
    else:
        _check_tp_sizes(args.path, [args.tp], args.moe_impl)
    kw = dict(batch=args.batch, seq=args.seq)
    if args.unconverted:
        kw.update(unconverted=True, experts_implementation=args.experts_implementation)
    else:
        kw.update(moe_impl=args.moe_impl)
    try:
        results = run_audit(args.path, args.tp, progress=progress("audit"), **kw)
    except RuntimeError as exc:
        return _ranks_failed("audit", exc)
    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_OK
    line, banned = audit_summary(results)
    print(results[0]["table"])
    print(line)
    if args.json:
        report = {"summary": line, "banned": banned, "ranks": results}
        write_output(args.json, "--json", lambda p: _dump_json(report, p))
    return EXIT_FAILED if banned else EXIT_OK


def _dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _ranks_failed(verb: str, exc: RuntimeError) -> int:
    """Exit 1 for ranks that failed; a collective that failed in place (inside torchrun) is named in one line."""
    from npu_parallel.parallel.watchdog import explain

    line = explain(exc)
    print(f"npu-parallel {verb}: the ranks failed: {line or exc}", file=sys.stderr)
    return EXIT_FAILED


@_checkpoint_errors
def cmd_verify(args: argparse.Namespace) -> int:
    """The converted model against transformers', layer by layer, at each tp size."""
    from npu_parallel.tools.jobs import in_torchrun
    from npu_parallel.tools.verify import run_verify
    from npu_parallel.tools.verify_report import evaluate, format_table, plot_errors, tolerances_for

    sizes = _tp_list(args.tp)
    dtype = DTYPES.get(args.dtype.lower()) if args.dtype else None
    if dtype is None:
        raise UserError(f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    if in_torchrun():
        sizes = _in_torchrun_world(sizes)
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    _check_tp_sizes(args.path, sizes, args.moe_impl)
    tol = tolerances_for(dtype, args.atol, args.grad_atol, args.min_agree)
    try:
        results = run_verify(
            args.path,
            sizes,
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
        return _ranks_failed("verify", exc)
    if not results:  # a non-zero rank inside torchrun: rank 0 reports
        return EXIT_OK
    for tp in sorted(results):
        print(format_table(results[tp], tol))
        print()
    failed = evaluate(results, tol)
    if args.json:
        report = {
            "path": str(args.path),
            "tolerances": tol.__dict__,
            "passed": not failed,
            "failures": failed,
            "results": {str(tp): r for tp, r in results.items()},
        }
        write_output(args.json, "--json", lambda p: _dump_json(report, p))
    if args.plot:
        write_output(args.plot, "--plot", lambda p: plot_errors(results, p, tol))
        print(f"plot: {args.plot}")
    if failed:
        print(f"FAILED: {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
        return EXIT_FAILED
    print(
        f"PASSED: tp {','.join(map(str, sorted(results)))}: every layer within atol {tol.atol:g} (outputs), "
        f"{tol.grad_atol:g} (grads{'' if args.backward else ', not run'}), router agreement >= {tol.min_agree:g}%"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="npu-parallel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("env", help="device, backend, world/tp/dp sizes, HCCL settings")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size to check against WORLD_SIZE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("inspect", help="architecture, experts, parameters, bytes, valid tp sizes of a checkpoint")
    p.add_argument("path", help="a Hugging Face checkpoint folder or an npu-parallel sharded checkpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--routing", action="store_true", help="load the model, run a sample and count tokens per expert per MoE layer"
    )
    p.add_argument(
        "--data", default=None, help="--routing: text file to route (tokenizer, else bytes); default random ids"
    )
    p.add_argument("--tokens", type=int, default=256, help="--routing: tokens in the sample (default 256)")
    p.add_argument("--plot", default=None, help="--routing: PNG heat map, layer x expert")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="split a HF checkpoint into tp rank files, offline")
    p.add_argument("path", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--dtype", default=None, help="cast floating tensors: bf16, fp16 or fp32 (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier npu-parallel output in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="join tp rank files back into a Hugging Face checkpoint")
    p.add_argument("path", help="folder written by save_sharded or `npu-parallel convert`")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file to write (GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier npu-parallel output in --out")
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer files from DIR (default: the source checkpoint)"
    )
    p.add_argument("--clean", action="store_true", help="with --overwrite: also delete files merge did not write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("audit", help="op audit of one forward+backward: banned ops, host syncs, collectives")
    p.add_argument("path", help="Hugging Face checkpoint folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (>1 launches the ranks with torchrun)")
    p.add_argument("--moe-impl", default="auto", help="MoE implementation of the converted model")
    p.add_argument("--unconverted", action="store_true", help="audit transformers' own model instead of ours")
    p.add_argument(
        "--experts-implementation",
        choices=("eager", "grouped_mm", "batched_mm"),
        default=None,
        help="with --unconverted: transformers' experts implementation (its default: grouped_mm)",
    )
    p.add_argument("--batch", type=int, default=2, help="sequences in the batch (default 2)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every event and the summary to OUT")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("verify", help="converted vs transformers' model, per layer, at each tp size")
    p.add_argument("path", help="Hugging Face checkpoint folder")
    p.add_argument("--tp", default="1,2", help="comma-separated tp sizes (default 1,2); each >1 launches torchrun")
    p.add_argument("--backward", action="store_true", help="also compare every gradient, gathered to full shape")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--moe-impl", default="auto", help="MoE implementation of the converted model")
    p.add_argument("--atol", type=float, default=None, help="max abs diff of outputs (fp32 1e-4, bf16/fp16 5e-2)")
    p.add_argument("--grad-atol", type=float, default=None, help="max abs diff of gradients (default: --atol)")
    p.add_argument(
        "--min-agree", type=float, default=None, help="router top-k agreement in percent (fp32 100, bf16/fp16 99)"
    )
    p.add_argument("--batch", type=int, default=2, help="sequences in the batch (default 2)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random input ids")
    p.add_argument("--json", default=None, metavar="OUT", help="write every figure to OUT")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="PNG of the worst error per layer per tp size")
    p.add_argument("--_perturb-expert", dest="perturb_expert", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # which modules each plan rule converted: with -v only (else it precedes any error)
        logging.getLogger("npu_parallel.convert.conversion").setLevel(logging.WARNING)
    try:
        check_args(args)
        return args.func(args)
    except UserError as exc:
        print(f"npu-parallel {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
