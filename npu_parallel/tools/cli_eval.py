"""``npu-parallel eval MODEL --data FILE --tp N``: eval loss and perplexity over a data file, one JSON line.

MODEL is a Hugging Face folder, a training run's step-N checkpoint (a LoRA run's too: its base is the one the
run recorded), or a base HF folder with ``--lora_adapter`` (a PEFT folder). The ranks start as ``verify``'s do
(in this process at tp 1, in place inside torchrun, else one launch of tp ranks); every example is evaluated once
and the loss is token-weighted (:mod:`npu_parallel.training.eval`). Exit 0, or 2 with one line on bad input
(before any rank starts), 1 when the ranks fail.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from npu_parallel.tools.checks import UserError
from npu_parallel.tools.cli_common import checkpoint_errors, progress, ranks_failed
from npu_parallel.training.errors import EXIT_OK

__all__ = ["add_eval_parser", "cmd_eval", "eval_rank"]

DEFAULT_LENGTH = 1024


def add_eval_parser(sub) -> None:
    """Register ``npu-parallel eval``."""
    p = sub.add_parser("eval", help="eval loss and perplexity of a model over a data file (one JSON line)")
    p.add_argument("model", help="Hugging Face folder, step-N checkpoint, or a base folder with --lora_adapter")
    p.add_argument(
        "--data",
        required=True,
        help="the eval file: raw text (.txt/.jsonl text: windows of --max_length) or chat/instruction data "
        "(messages, sharegpt, alpaca, prompt_completion: the assistant tokens are scored, as in training)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1; above 1 launches torchrun)")
    p.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chat data: best-fit examples into --max_length rows (default) or one per row; the loss is the same "
        "either way (text files are always windows of --max_length)",
    )
    p.add_argument("--format", default="auto", help="the data format (default: detected from the first record)")
    p.add_argument("--template", default=None, help="chat template: a built-in name or a .jinja file")
    p.add_argument("--field_map", default=None, help="rename fields, e.g. messages=conversation")
    p.add_argument("--truncation", default="truncate", help="examples over --max_length: truncate (default) or drop")
    p.add_argument(
        "--max_length", type=int, default=None, help=f"tokens per row (default: {DEFAULT_LENGTH} or the model's limit)"
    )
    p.add_argument(
        "--batch_size", type=int, default=1, help="rows per forward (default 1); the loss does not depend on it"
    )
    p.add_argument("--lora_adapter", default=None, help="a PEFT adapter folder put on MODEL (a base HF folder)")
    p.add_argument("--text_field", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--moe_impl", "--moe-impl", dest="moe_impl", default="auto", help="MoE implementation")
    p.add_argument("--trust_remote_code", action="store_true", help="build the model from the checkpoint's code")
    p.set_defaults(func=cmd_eval)


def _manifest(path: Path) -> dict | None:
    from npu_parallel.checkpoint.manifest import MANIFEST

    file = path / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else None


def _base_of(path: Path, manifest: dict) -> str | None:
    """The HF folder a training run started from (its tokenizer, and a LoRA run's base weights)."""
    config = ((manifest.get("training") or {}).get("extra") or {}).get("config") or {}
    return config.get("model_path")


def _spec(args: argparse.Namespace) -> dict:
    """What every rank needs, checked here (exit 2 before any rank starts)."""
    from npu_parallel.checkpoint.hf_source import load_config
    from npu_parallel.checkpoint.lora_checkpoint import checkpoint_lora
    from npu_parallel.convert.plans import plan_for
    from npu_parallel.tools.checks import check_moe_impl

    path = Path(args.model)
    if not path.is_dir():
        raise UserError(f"MODEL {path}: no such folder; pass a Hugging Face folder or a step-N checkpoint")
    if args.tp < 1:
        raise UserError(f"--tp {args.tp}: must be a positive integer")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max_length {args.max_length}: must be at least 2 (a token and its next one)")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    check_moe_impl(args.moe_impl)
    manifest = _manifest(path)
    kind, base, tokenizer = "hf", str(path), str(path)
    if manifest is not None:
        if args.lora_adapter:
            raise UserError(f"--lora_adapter with the checkpoint {path}: pass a base Hugging Face folder as MODEL")
        kind = "lora" if checkpoint_lora(path) is not None else "sharded"
        recorded = _base_of(path, manifest)
        if kind == "lora" and not (recorded and Path(recorded).is_dir()):
            raise UserError(f"MODEL {path}: a LoRA checkpoint whose base {recorded!r} is not a folder here")
        base = str(recorded) if kind == "lora" else str(path)
        tokenizer = recorded if recorded and Path(recorded).is_dir() else str(path)
    if kind == "sharded":
        from npu_parallel.checkpoint.sharded_source import ShardedSource

        config = ShardedSource(path, trust_remote_code=args.trust_remote_code).read_config()
    else:
        config = load_config(base, args.trust_remote_code)
    plan_for(config).check_tp(config, args.tp)
    if args.lora_adapter and not (Path(args.lora_adapter) / "adapter_config.json").is_file():
        raise UserError(f"--lora_adapter {args.lora_adapter}: no adapter_config.json; pass a PEFT adapter folder")
    max_pos = getattr(config, "max_position_embeddings", None)
    if args.max_length is None:
        args.max_length = min(DEFAULT_LENGTH, max_pos or DEFAULT_LENGTH)
    if max_pos is not None and args.max_length > max_pos:
        raise UserError(f"--max_length {args.max_length}: above the model's max_position_embeddings {max_pos}")
    spec = dict(
        path=str(path),
        kind=kind,
        base=base,
        tokenizer=tokenizer,
        data=str(args.data),
        max_length=args.max_length,
        batch_size=args.batch_size,
        lora_adapter=args.lora_adapter,
        text_field=args.text_field,
        moe_impl=args.moe_impl,
        trust_remote_code=args.trust_remote_code,
        data_flags=dict(
            format=args.format,
            template=args.template,
            field_map=args.field_map,
            truncation=args.truncation,
            packing=args.packing,
            text_field=args.text_field,
        ),
    )
    _eval_set(spec, config, 1, 0)  # the data read once here: a bad file is exit 2 before any rank starts
    return spec


def _eval_set(spec: dict, config, dp_size: int, dp_rank: int):
    from npu_parallel.training.data import first_eos
    from npu_parallel.training.errors import ConfigError
    from npu_parallel.training.eval import text_eval_set

    try:
        chat = _chat_eval_set(spec, dp_size, dp_rank)
        if chat is not None:
            return chat
        return text_eval_set(
            spec["data"],
            spec["tokenizer"],
            vocab_size=config.vocab_size,
            eos_token_id=first_eos(getattr(config, "eos_token_id", None)),
            max_length=spec["max_length"],
            batch_size=spec["batch_size"],
            dp_size=dp_size,
            dp_rank=dp_rank,
            text_field=spec["text_field"],
            flag="--data",
        )
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def _chat_eval_set(spec: dict, dp_size: int, dp_rank: int):
    """Chat or instruction data: the training code's eval set (its template, labels and packing); None for raw
    text (``--no-packing`` there is an error: text is scored in windows)."""
    from types import SimpleNamespace

    from npu_parallel.training.config import TrainConfig
    from npu_parallel.training.data_inputs import check_data_args, hf_tokenizer, plain_text
    from npu_parallel.training.dataset import build_eval_batches, prepare
    from npu_parallel.training.errors import ConfigError

    flags = spec["data_flags"]
    cfg = TrainConfig(
        model_path=spec["tokenizer"],
        eval_data=spec["data"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        **flags,
    )
    if plain_text(cfg, spec["data"]):
        if flags["packing"] is False:
            raise ConfigError(
                f"--no-packing with the text file {spec['data']}: text is scored in windows of --max_length; "
                f"drop --no-packing (it is for chat and instruction data, one example per row)"
            )
        return None
    check_data_args(cfg)
    tokenizer = hf_tokenizer(spec["tokenizer"])
    prepared = prepare(cfg, tokenizer, with_train=False)
    return build_eval_batches(cfg, tokenizer, SimpleNamespace(dp_size=dp_size, dp_rank=dp_rank), prepared)


def eval_rank(spec: dict, state=None) -> dict:
    """One rank's part (the launch target): load MODEL at tp = world, evaluate, the global result."""
    from npu_parallel.checkpoint.load import load_pretrained, load_sharded
    from npu_parallel.checkpoint.lora_checkpoint import checkpoint_lora, config_from_dict, load_adapter_weights
    from npu_parallel.checkpoint.peft_adapter import apply_lora
    from npu_parallel.tools.jobs import quiet, rank_state
    from npu_parallel.training.eval import evaluate

    quiet()
    state = state or rank_state()
    kw = dict(moe_impl=spec["moe_impl"], trust_remote_code=spec["trust_remote_code"])
    if spec["kind"] == "sharded":
        model = load_sharded(spec["path"], state, **kw)
    else:
        model = load_pretrained(spec["base"], state, progress=False, **kw)
        if spec["kind"] == "lora":
            saved = checkpoint_lora(spec["path"])
            assert saved is not None
            apply_lora(model, state, config_from_dict(saved))
            load_adapter_weights(model, spec["path"])
        elif spec["lora_adapter"]:
            apply_lora(model, state, spec["lora_adapter"])
    evals = _eval_set(spec, model.config, state.dp_size, state.dp_rank)
    return evaluate(model, evals, state).as_dict()


@checkpoint_errors
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate MODEL on --data at --tp ranks; print {loss, perplexity, tokens, examples}."""
    from npu_parallel.parallel.state import single_rank_state
    from npu_parallel.tools.cli_runs import in_torchrun_world
    from npu_parallel.tools.jobs import in_torchrun
    from npu_parallel.tools.launch import launch

    if in_torchrun():
        args.tp = in_torchrun_world([args.tp])[0]
    spec = _spec(args)
    try:
        if in_torchrun():
            result = eval_rank(spec)
        elif args.tp == 1:
            result = eval_rank(spec, single_rank_state())
        else:
            result = launch("npu_parallel.tools.cli_eval:eval_rank", args.tp, spec, progress=progress("eval"))[0]
    except RuntimeError as exc:
        return ranks_failed("eval", exc)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return EXIT_OK
