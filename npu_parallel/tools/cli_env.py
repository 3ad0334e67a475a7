"""``npu-parallel env``: device, backend, world/tp/dp sizes and the HCCL/allocator settings in force."""

from __future__ import annotations

import argparse
import json
import os

from npu_parallel.tools.checks import UserError
from npu_parallel.training.errors import EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    """Device, backend, world/tp/dp sizes, the HCCL settings in force and the kernels' capability probes."""
    try:
        import torch

        from npu_parallel.parallel import device
    except Exception as exc:
        from npu_parallel._cann import cann_not_sourced

        hint = cann_not_sourced(exc)
        if hint is None:
            raise
        raise UserError(hint) from None
    from npu_parallel.parallel.state import check_tp_size

    info = device.describe()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = world if args.tp is None else args.tp
    try:
        check_tp_size(tp, world)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    hccl = device.hccl_settings()
    would_apply = device.pending_defaults()
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
    probes = report["kernel_probes"] = _probes(info.kind)
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
    print("  kernel capability probes:" + ("" if probes else "  none run (no NPU here)"))
    for name, verdict in probes.items():
        print(f"    {name}: {verdict}")
    return EXIT_OK


def _probes(kind: str) -> dict[str, str]:
    """Run every torch_npu kernel's capability probe (only on an NPU): the MoE path, the fused dense kernels and
    the fp32 weight-gradient kernel; return every verdict of this process."""
    from npu_parallel.parallel.probe import probe_results

    if kind == "npu":
        from npu_parallel.moe import npu_ops
        from npu_parallel.moe.dispatchers.npu import NpuDispatcher
        from npu_parallel.parallel import device, kernels

        NpuDispatcher.usable(kind)
        absent = kernels.probe_all(kind)
        module = device.torch_npu_module()
        if module is not None:
            npu_ops.gmm_add_ok(npu_ops.NpuOps(module), kind)
        return {**probe_results(), **absent}
    return probe_results()
