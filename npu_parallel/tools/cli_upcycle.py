"""``npu-parallel upcycle DENSE --out DIR --experts E --top_k K``: a dense HF checkpoint -> an MoE HF checkpoint."""

from __future__ import annotations

import argparse

from npu_parallel.tools.checks import UserError
from npu_parallel.tools.cli_common import checkpoint_errors
from npu_parallel.training.errors import EXIT_OK

TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")


@checkpoint_errors
def cmd_upcycle(args: argparse.Namespace) -> int:
    """Copy (or split, with --granularity) each dense FFN into E experts; the output equals the dense model."""
    from npu_parallel.checkpoint.upcycle import upcycle_checkpoint

    if args.max_shard_gb <= 0:
        raise UserError(f"--max_shard_gb {args.max_shard_gb}: must be a positive number of GB")
    out, req = upcycle_checkpoint(
        args.path,
        args.out,
        experts=args.experts,
        top_k=args.top_k,
        granularity=args.granularity,
        layers=args.layers,
        shared_experts=args.shared_experts,
        target=args.to,
        seed=args.seed,
        norm_topk_prob=not args.no_norm_topk_prob,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        progress=not args.quiet,
    )
    exact = "equals the dense model at init" if req.exact() else "does NOT equal the dense model at init (see above)"
    print(
        f"wrote {out}: {req.target}, {req.experts} experts, top_k {req.top_k}, granularity {req.granularity}, "
        f"{len(req.layers)}/{req.num_layers} layers MoE, {req.shared} shared; {exact}"
    )
    return EXIT_OK


def add_upcycle_parser(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense HF checkpoint into an MoE one that equals it at init")
    p.add_argument(
        "path", help="dense Hugging Face checkpoint folder (Llama, Mistral, Qwen2, Qwen3, dense DeepSeek-V2)"
    )
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer (E)")
    p.add_argument("--top_k", type=int, required=True, help="experts per token (K, a multiple of --granularity)")
    p.add_argument(
        "--granularity", type=int, default=1, help="split each FFN into G chunks along its intermediate dim (default 1)"
    )
    p.add_argument("--layers", default=None, help="layers to make MoE, e.g. 1-3,5 (default all)")
    p.add_argument(
        "--shared_experts",
        type=int,
        default=None,
        help="1: a shared expert holds the dense FFN (qwen2_moe and deepseek_v2 always have one: the default 1 "
        "there, 0 elsewhere)",
    )
    p.add_argument("--to", choices=TARGETS, default=None, help="target format (default: the source's natural one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router init (default 0)")
    p.add_argument(
        "--no_norm_topk_prob",
        action="store_true",
        help="qwen targets: do not renormalize the top-k weights (NOT function-preserving; warns)",
    )
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors file to write (GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier npu-parallel output in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_upcycle)
