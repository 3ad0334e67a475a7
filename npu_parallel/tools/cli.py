"""The npu-parallel command: env, inspect, convert, merge, audit, verify, plan, generate, eval, upcycle, train.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from npu_parallel.tools.checks import UserError, check_args, check_output_file, write_output
from npu_parallel.tools.cli_common import Parser, checkpoint_errors, parse_dtype
from npu_parallel.tools.cli_env import cmd_env
from npu_parallel.tools.cli_eval import add_eval_parser
from npu_parallel.tools.cli_generate import add_generate_parser
from npu_parallel.tools.cli_plan import add_plan_parser
from npu_parallel.tools.cli_runs import cmd_audit, cmd_verify
from npu_parallel.tools.cli_train import add_train_parser
from npu_parallel.tools.cli_upcycle import add_upcycle_parser
from npu_parallel.training.errors import EXIT_BAD_INPUT, EXIT_OK


@checkpoint_errors
def cmd_inspect(args: argparse.Namespace) -> int:
    """What a user needs before converting: structure, sizes, valid tp sizes."""
    if getattr(args, "routing", False):
        return cmd_inspect_routing(args)
    if getattr(args, "serving", False):
        return cmd_inspect_serving(args)
    from npu_parallel.checkpoint.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


@checkpoint_errors
def cmd_convert(args: argparse.Namespace) -> int:
    """HF checkpoint -> tp rank files, streamed; no process group needed."""
    from npu_parallel.checkpoint.offline import convert_checkpoint

    out = convert_checkpoint(
        args.path,
        args.tp,
        args.out,
        dtype=parse_dtype(args.dtype),
        overwrite=args.overwrite,
        progress=not args.quiet,
        ep=args.ep,
    )
    print(f"wrote {out} (tp={args.tp}" + (f", ep={args.ep})" if args.ep else ")"))
    return EXIT_OK


@checkpoint_errors
def cmd_merge(args: argparse.Namespace) -> int:
    """tp rank files -> a Hugging Face checkpoint that from_pretrained loads and a serving engine serves."""
    from pathlib import Path

    from npu_parallel.checkpoint.lora_checkpoint import checkpoint_lora, export_lora_checkpoint
    from npu_parallel.checkpoint.manifest import MARKER
    from npu_parallel.checkpoint.offline import merge_checkpoint
    from npu_parallel.tools.merge_serving import merge_with_adapter, serving_lines, training_template

    src = Path(args.path)
    if args.lora_adapter and (args.merge_lora or ((src / "manifest.json").is_file() and checkpoint_lora(src))):
        raise UserError("--lora_adapter folds a PEFT adapter into a full model; a LoRA run's folder: --merge_lora")
    kw = dict(
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        progress=not args.quiet,
        tokenizer=args.tokenizer,
        keep_others=not args.clean,
        dtype=parse_dtype(args.dtype),
        chat_template=training_template(src, args.tokenizer, args.chat_template),
    )
    if args.lora_adapter:
        out = merge_with_adapter(src, args.lora_adapter, Path(args.out), **kw)
    elif args.merge_lora or checkpoint_lora(args.path) is not None:  # a LoRA run: adapters only
        out = export_lora_checkpoint(
            args.path, args.out, merge=args.merge_lora, base=args.base, overwrite=args.overwrite
        )
        if not args.merge_lora:
            print(f"wrote {out}: a PEFT adapter folder (peft.PeftModel.from_pretrained loads it)")
            return EXIT_OK
    else:
        out = merge_checkpoint(args.path, args.out, **kw)
    mark = json.loads((out / MARKER).read_text())
    tok = mark["tokenizer"]
    got = [f"{', '.join(tok['files'])} from {tok['from']}"] if tok["files"] else []
    got += [f"kept {', '.join(tok['kept'])}"] if tok["kept"] else []
    dtype = f" in {mark['dtype']}" if mark.get("dtype") else ""
    tokenizer = "; ".join(got) or "none (see the warning above)"
    print(f"wrote {out}: {mark['tensors']} tensors{dtype}; tokenizer: {tokenizer}")
    for line in serving_lines(out):
        print(line)
    return EXIT_OK


@checkpoint_errors
def cmd_inspect_serving(args: argparse.Namespace) -> int:
    """What vLLM would miss in a Hugging Face folder: exit 1 when anything would fail."""
    from npu_parallel.checkpoint.serving_check import format_serving, serving_report
    from npu_parallel.training.errors import EXIT_FAILED

    findings = serving_report(args.path)
    print(json.dumps(findings, indent=2) if args.json else format_serving(findings))
    return EXIT_FAILED if any(f["level"] == "error" for f in findings) else EXIT_OK


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


TRUST_HELP = (
    "run the checkpoint's own code (auto_map) even where transformers has the model type; "
    "required where it has none (DeepSeek-MoE 16B)"
)


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
    p.add_argument("--serving", action="store_true", help="what vLLM would miss in a HF folder (exit 1 on errors)")
    p.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="split a HF checkpoint into tp rank files, offline")
    p.add_argument("path", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size, a multiple of --tp (default: --tp)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--dtype", default=None, help="cast floating tensors: bf16, fp16 or fp32 (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier npu-parallel output in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="join tp rank files back into a Hugging Face checkpoint")
    p.add_argument("path", help="folder written by save_sharded or `npu-parallel convert`")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors file to write (GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier npu-parallel output in --out")
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer files from DIR (default: the source checkpoint)"
    )
    p.add_argument("--clean", action="store_true", help="with --overwrite: also delete files merge did not write")
    p.add_argument(
        "--dtype",
        default=None,
        help="dtype of the weights written: bf16, fp16 or fp32 (default: a training run's compute dtype, bf16 for a "
        "bf16 run whose checkpoint holds fp32 master weights; else as stored)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--merge_lora", action="store_true", help="a LoRA run: the base model with the adapters folded in (HF folder)"
    )
    p.add_argument("--base", default=None, metavar="DIR", help="a LoRA run's base model (default: the one it trained)")
    p.add_argument("--lora_adapter", default=None, metavar="DIR", help="fold this PEFT adapter folder into the weights")
    p.add_argument(
        "--chat_template",
        default=None,
        metavar="FILE",
        help="the merged tokenizer's chat template (default: the run's)",
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("audit", help="op audit of one forward+backward: banned ops, host syncs, collectives")
    p.add_argument("path", help="Hugging Face checkpoint folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (>1 launches the ranks with torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages: audit one 1F1B step per stage (tp x pp ranks)")
    p.add_argument("--grad_accum", type=int, default=None, help="micro-batches of the pipelined step (default: --pp)")
    p.add_argument("--moe_impl", default="auto", help="MoE implementation of the converted model")
    p.add_argument("--unconverted", action="store_true", help="audit transformers' own model instead of ours")
    p.add_argument(
        "--experts_implementation",
        choices=("eager", "grouped_mm", "batched_mm"),
        default=None,
        help="with --unconverted: transformers' experts implementation (its default: grouped_mm)",
    )
    p.add_argument("--batch", type=int, default=2, help="sequences in the batch (default 2)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every event and the summary to OUT")
    p.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("verify", help="converted vs transformers' model, per layer, at each tp size")
    p.add_argument("path", help="Hugging Face checkpoint folder")
    p.add_argument("--tp", default="1,2", help="comma-separated tp sizes (default 1,2); each >1 launches torchrun")
    p.add_argument(
        "--pp",
        default="1",
        help="comma-separated pipeline sizes (default 1): each tp size runs at each (tp x pp ranks)",
    )
    p.add_argument("--grad_accum", type=int, default=None, help="micro-batches of a pipelined step (default: --pp)")
    p.add_argument("--backward", action="store_true", help="also compare every gradient, gathered to full shape")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--moe_impl", default="auto", help="MoE implementation of the converted model")
    p.add_argument(
        "--atol", type=float, default=None, help="max abs diff of outputs (fp32 1e-4, bf16 2.5e-2, fp16 5e-2)"
    )
    p.add_argument("--grad_atol", type=float, default=None, help="max abs diff of gradients (default: --atol)")
    p.add_argument(
        "--min_agree", type=float, default=None, help="router top-k agreement in percent (fp32 100, bf16 90, fp16 99)"
    )
    p.add_argument("--batch", type=int, default=2, help="sequences in the batch (default 2)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random input ids")
    p.add_argument("--json", default=None, metavar="OUT", help="write every figure to OUT")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="PNG of the worst error per layer per tp size")
    p.add_argument("--_perturb-expert", dest="perturb_expert", default=None, help=argparse.SUPPRESS)
    p.add_argument("--trust_remote_code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_verify)
    add_plan_parser(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_upcycle_parser(sub)
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its flags import torch to build: parsed by the verb itself (cli_train.main_train)
        from npu_parallel.tools.cli_train import main_train

        return _cann_guarded("train", lambda: main_train(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # which modules each plan rule converted: with -v only (else it precedes any error)
        logging.getLogger("npu_parallel.convert.conversion").setLevel(logging.WARNING)

    def run() -> int:
        try:
            check_args(args)
            check_transformers(args)
            return args.func(args)
        except UserError as exc:
            print(f"npu-parallel {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return _cann_guarded(args.command, run)


def _cann_guarded(command: str, run) -> int:
    """``run()``, with torch (or transformers) failing to load a torch_npu without CANN said in one line, exit 2."""
    try:
        return run()
    except (ImportError, RuntimeError) as exc:
        from npu_parallel._cann import cann_not_sourced

        hint = cann_not_sourced(exc)
        if hint is None:
            raise
        print(f"npu-parallel {command}: error: {hint}", file=sys.stderr)
        return EXIT_BAD_INPUT


def check_transformers(args: argparse.Namespace) -> None:
    """The installed transformers within the supported range; ``--trust_remote_code`` passed on to launched ranks."""
    from npu_parallel.checkpoint.remote_code import ENV
    from npu_parallel.hf_compat import unsupported_transformers

    if why := unsupported_transformers():
        raise UserError(why)
    if getattr(args, "trust_remote_code", False):
        os.environ[ENV] = "1"


if __name__ == "__main__":
    sys.exit(main())
