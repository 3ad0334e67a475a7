"""The ``npu-parallel`` command: env, inspect, convert, merge.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line with exit code 2."""


def cmd_env(args: argparse.Namespace) -> int:
    """Device, backend, world/tp/dp sizes and the HCCL settings in force."""
    import torch

    from . import device
    from .distributed import check_tp_size

    info = device.describe()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tp or world
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
    print(f"npu_parallel environment")
    print(f"  torch        {report['torch']}")
    print(f"  torch_npu    {report['torch_npu'] or 'not installed'}")
    print(f"  device       {report['device']} x {report['device_count']}  (backend {report['backend']}, bf16 {'yes' if report['bf16'] else 'no'})")
    print(f"  world/tp/dp  {world} / {tp} / {world // tp}")
    print("  HCCL / allocator settings:")
    for key, value in hccl.items():
        note = ""
        if value is None and key in would_apply:
            note = f"  (init_distributed sets {would_apply[key]} on NPU)" if info.kind == "npu" else f"  (default {would_apply[key]} on NPU)"
        print(f"    {key:<28} {value if value is not None else '-'}{note}")
    return EXIT_OK


DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


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
    from .inspect_checkpoint import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


@_checkpoint_errors
def cmd_convert(args: argparse.Namespace) -> int:
    """HF checkpoint -> tp rank files, streamed; no process group needed."""
    from .offline import convert_checkpoint

    out = convert_checkpoint(args.path, args.tp, args.out, dtype=parse_dtype(args.dtype), overwrite=args.overwrite,
                             progress=not args.quiet)
    print(f"wrote {out} (tp={args.tp})")
    return EXIT_OK


@_checkpoint_errors
def cmd_merge(args: argparse.Namespace) -> int:
    """tp rank files -> a Hugging Face checkpoint that from_pretrained loads."""
    from .offline import merge_checkpoint

    out = merge_checkpoint(args.path, args.out, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 1e9),
                           progress=not args.quiet)
    print(f"wrote {out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npu-parallel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("env", help="device, backend, world/tp/dp sizes, HCCL settings")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size to check against WORLD_SIZE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("inspect", help="architecture, experts, parameters, bytes, valid tp sizes of a checkpoint")
    p.add_argument("path", help="a Hugging Face checkpoint folder or an npu-parallel sharded checkpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"npu-parallel {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
