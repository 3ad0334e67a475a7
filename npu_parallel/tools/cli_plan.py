"""``npu-parallel plan``: the verb's flags and its command (the planner itself is :mod:`npu_parallel.tools.plan`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from npu_parallel.tools.checks import UserError
from npu_parallel.training.errors import EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-card memory and communication of every valid layout, ranked; from the config alone."""
    from npu_parallel.tools.plan import as_json, format_plan, parse_bytes, plan, read_config

    for name in ("nodes", "cards_per_node", "micro_batch", "seq", "lora_rank", "grad_accum"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    try:
        card = parse_bytes(args.card_memory)
        config = read_config(args.model)
        layouts = plan(
            config,
            nodes=args.nodes,
            cards_per_node=args.cards_per_node,
            card_bytes=card,
            dtype=args.dtype,
            dp_mode=args.dp_mode,
            lora=args.lora,
            lora_rank=args.lora_rank,
            micro_batch=args.micro_batch,
            seq=args.seq,
            recompute=args.recompute,
            pp_sizes=args.pp,
            grad_accum=args.grad_accum,
            pp_schedule=args.pp_schedule,
        )
    except (ValueError, OSError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    if args.json:
        print(json.dumps(as_json(layouts), indent=1))
        return EXIT_OK
    what = "LoRA" if args.lora else "full fine-tuning"
    title = (
        f"{Path(args.model).name} on {args.nodes}x{args.cards_per_node} cards of {args.card_memory}, {what}, "
        f"{args.dtype}, micro-batch {args.micro_batch}x{args.seq}{', recompute' if args.recompute else ''}, "
        f"dp {args.dp_mode}: {sum(lay.fits for lay in layouts)} of {len(layouts)} layouts fit"
    )
    print(format_plan(layouts, title, limit=args.top))
    return EXIT_OK


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-card memory and communication of each (tp, ep, dp, pp) layout, from a config")
    p.add_argument("model", help="a checkpoint folder (its config.json) or a config file")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--cards_per_node", type=int, default=8, help="cards per node (default 8); tp stays inside one")
    p.add_argument("--card_memory", default="64GB", help="memory of one card, e.g. 64GB or 32GiB (default 64GB)")
    p.add_argument("--lora", action="store_true", help="LoRA: base frozen, adapters on attention and MLP linears")
    p.add_argument("--lora_rank", type=int, default=16, help="--lora: adapter rank (default 16)")
    p.add_argument("--micro_batch", type=int, default=1, help="sequences per dp rank per step (default 1)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="compute dtype")
    p.add_argument("--dp_mode", default="fsdp", choices=("fsdp", "replicate"), help="data parallel: FSDP2 or DDP")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing per layer")
    p.add_argument(
        "--pp", type=int, nargs="+", default=None, help="pipeline sizes to consider (default: every valid one)"
    )
    p.add_argument(
        "--grad_accum", type=int, default=8, help="micro-batches per step: the pipeline's in-flight ones and bubble"
    )
    p.add_argument("--pp_schedule", default="1f1b", choices=("1f1b", "gpipe"), help="pipeline schedule (default 1f1b)")
    p.add_argument("--top", type=int, default=12, help="layouts to show (default 12)")
    p.add_argument("--json", action="store_true", help="every layout, machine-readable")
    p.set_defaults(func=cmd_plan)
