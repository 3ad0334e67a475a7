"""The ``npu-parallel`` command: ``env`` now; inspect, convert, merge, verify, audit as they land.

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npu-parallel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("env", help="device, backend, world/tp/dp sizes, HCCL settings")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size to check against WORLD_SIZE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)
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
