"""A training run's arguments: the TrainConfig fields and flags, and every check made before the model loads.

``check_args`` looks at the values alone (sizes, rates, ranges); ``check_inputs`` at what they name (the
model's config.json, the resumed checkpoint, the data, --save_dir and --log_dir of an earlier run) and
builds the data. Both raise :class:`ConfigError` (one line: the value, the rule, the fix).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from npu_parallel.checkpoint.hf_source import load_config
from npu_parallel.checkpoint.manifest import MANIFEST, owned_files
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.checkpoint.train_layout import same_stage_layout, saved_layout
from npu_parallel.moe.dispatchers import choices as moe_impl_choices
from npu_parallel.parallel.state import ParallelState
from npu_parallel.training.data import PackedData, first_eos
from npu_parallel.training.data_inputs import build_run_data, check_data_args
from npu_parallel.training.dataset import DataStream, EvalSet
from npu_parallel.training.errors import ConfigError
from npu_parallel.training.eval import check_eval_args
from npu_parallel.training.formats import FORMATS
from npu_parallel.training.lora import DEFAULT_TARGETS, check_lora_args
from npu_parallel.training.metrics import METRICS_FILE, read_metrics
from npu_parallel.training.moe_options import check_moe_args
from npu_parallel.training.pipeline_checks import check_pp_args, check_pp_model
from npu_parallel.training.recompute import RECOMPUTE
from npu_parallel.training.templates import builtin_templates

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "bf16-pure", "fp32", "bfloat16", "float32")
MAX_STEP = 1e30  # --lr and --lr x --weight_decay: AdamW's first step (10 x lr) must stay inside float32
STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainConfig:
    model_path: str | None = None
    tp_size: int | None = None
    ep_size: int | None = None
    batch_size: int = 1
    max_length: int = 256
    steps: int = 20
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 3
    data: str | list[str] | None = None
    text_field: str = "text"
    # sft-data: chat / instruction data (issue 21): formats, chat template, labels, packing, eval data
    format: str = "auto"
    field_map: str | None = None
    template: str | None = None
    train_on_prompt: bool = False
    last_turn_only: bool = False
    packing: bool | None = None
    truncation: str = "truncate"
    eval_data: str | None = None
    eval_split: float = 0.0
    save_dir: str | None = None
    save_every: int = 0
    resume: str | None = None
    overwrite: bool = False
    stop_after: int | None = None
    log_dir: str | None = None
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    recompute: str = "none"
    vocab_parallel_loss: bool = False
    mtp_loss_weight: float = 0.0
    moe_impl: str = "auto"
    jit_warmup_steps: int = 2
    timeout_s: float | None = None
    lora_r: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_TARGETS
    lora_adapter: str | None = None
    aux_loss_coef: float | None = None
    router_noise: str | None = None
    router_noise_eps: float = 0.01
    router_z_loss: float = 0.0
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int | None = None
    bias_update_rate: float = 0.0
    warn_idle_steps: int = 20
    warn_load_ratio: float = 4.0
    trust_remote_code: bool = False
    # evaluation during training (issue 21 pt 7); the eval data itself: eval_data / eval_split above
    eval_every: int = 0
    # ppwire: pipeline parallelism in training (issue 22): stages outermost, world = pp x dp x tp
    pp_size: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    pp_layers: str | None = None


HELP = {
    "model_path": "Hugging Face checkpoint folder (config.json + *.safetensors)",
    "tp_size": "tensor-parallel size (default: all ranks); world = tp x dp",
    "ep_size": "expert-parallel size: ranks splitting the routed experts, a multiple of --tp_size dividing the world "
    "(default: --tp_size); above it tokens travel between tp groups by all-to-all",
    "batch_size": "sequences per micro-batch per dp rank",
    "max_length": "tokens per packed sequence (2 to the model's max_position_embeddings)",
    "steps": "optimizer steps (the LR schedule spans them)",
    "lr": "peak learning rate",
    "min_lr_ratio": "cosine decays to this fraction of --lr (0 to 1)",
    "warmup_steps": "linear LR warmup steps (0 to --steps)",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "grad_accum": "micro-batches per optimizer step",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "max_nonfinite_steps": "a step with a non-finite loss or gradient norm is skipped; stop (exit 3) after this "
    "many in a row",
    "data": "PATH[:WEIGHT] ... (repeatable): .jsonl, .json, .parquet, .txt or a datasets save_to_disk folder; "
    "WEIGHT repeats (2) or subsamples (0.5) a source per epoch; default: the .py files of Python's standard library",
    "text_field": "JSONL field holding the text",
    "format": "data format: auto (detected from the first record), " + ", ".join(FORMATS),
    "field_map": "rename fields, OURS=THEIRS,... (e.g. messages=conversation,role=speaker,content=text)",
    "template": "chat template: the tokenizer's own by default, a built-in ("
    + ", ".join(builtin_templates())
    + ") or a .jinja file",
    "train_on_prompt": "train on every token of a conversation, not only the assistant's",
    "last_turn_only": "train on the last assistant turn only",
    "packing": "pack examples best-fit into --max_length rows, attention kept inside each (default for chat and "
    "instruction data; --no-packing pads each micro-batch to its longest example)",
    "truncation": "an example longer than --max_length: truncate (keep its start) or drop",
    "eval_data": "an eval file (any --data format): eval loss over every example once",
    "eval_split": "hold out this fraction of --data for eval (deterministic from --seed; 0: none)",
    "save_dir": "where checkpoints go (step-N folders)",
    "save_every": "save every N steps (0: only at the end)",
    "resume": "a step-N checkpoint folder to continue from exactly (metrics.jsonl continues from its step)",
    "overwrite": "replace an earlier run's step-N checkpoints in --save_dir and its metrics in --log_dir",
    "stop_after": "stop after this step, as if interrupted (schedule still spans --steps)",
    "log_dir": "metrics.jsonl and loss.png go here",
    "seed": "data order seed",
    "precision": "auto (bf16 mixed where the device computes in bf16, else fp32); bf16: bf16 compute, fp32 master "
    "weights and AdamW moments, gradients reduced in fp32; bf16-pure: everything bf16 (warns: small updates are "
    "rounded away); fp32",
    "gradient_checkpointing": "recompute every decoder layer's activations in backward (= --recompute full)",
    "recompute": "recompute activations in backward: none, experts (the routed experts' MLPs), attention (each "
    "layer's self-attention) or full (every decoder layer)",
    "vocab_parallel_loss": "cross-entropy on vocab-sharded logits, never gathering them",
    "mtp_loss_weight": "weight of DeepSeek-V3's multi-token-prediction loss (0: MTP layers kept but frozen)",
    "moe_impl": f"MoE implementation: {', '.join(moe_impl_choices())}",
    "jit_warmup_steps": "forward+backward passes on a small batch before the first real step (compiles kernels)",
    "timeout_s": "process-group timeout in seconds",
    "lora_r": "LoRA rank: train adapters only, the base frozen (0: full fine-tuning)",
    "lora_alpha": "LoRA alpha (scaling = alpha / r)",
    "lora_dropout": "dropout on the LoRA input of target modules (0 with expert targets, as PEFT)",
    "lora_targets": "comma-separated module names and expert parameters (mlp.experts.gate_up_proj) to adapt",
    "lora_adapter": "a PEFT adapter folder to continue training (its config sets rank and targets)",
    "aux_loss_coef": "coefficient of the model family's load-balancing loss, replacing the config's "
    "(aux_loss_alpha, router_aux_loss_coef); 0: off",
    "router_noise": "router noise in training (never in eval or generate): mixtral (the MoE block's input times "
    "U(1-eps, 1+eps)), jitter (DeepSpeed: the router's input only) or rsample (DeepSpeed: Gumbel noise on the "
    "selection only); default: none (a Mixtral config's router_jitter_noise still applies)",
    "router_noise_eps": "the jitter's half-width eps (mixtral, jitter)",
    "router_z_loss": "coefficient of ST-MoE's router z-loss, mean(logsumexp(router logits)^2) per MoE layer, "
    "added to the loss (0: off; ST-MoE uses 0.001)",
    "capacity_factor": "token slots per expert in training, as a multiple of the even share (tokens x top_k / "
    "experts); slots past it are dropped (they pass through the residual; counted per layer in metrics.jsonl). "
    "Needs --moe_impl static or alltoall_static (default: dropless)",
    "eval_capacity_factor": "the same in eval mode (the --eval_every evaluations; default: --capacity_factor)",
    "min_capacity": "at least this many slots per expert under a capacity factor (DeepSpeed's min_capacity)",
    "bias_update_rate": "DeepSeek-V3 auxiliary-loss-free balancing: after each step every router's "
    "e_score_correction_bias moves by this against its experts' load (0: off)",
    "warn_idle_steps": "warn when an expert gets no token for this many steps in a row (0: off)",
    "warn_load_ratio": "warn when a layer's busiest expert gets more than this times the mean load (0: off)",
    "trust_remote_code": "build the model from the checkpoint's own code (auto_map); needed where transformers "
    "lacks the model type (DeepSeek-MoE 16B)",
    "eval_every": "eval loss and perplexity over the whole eval set every N steps and at the end (0: at the end "
    "only, when there is eval data)",
    "pp_size": "pipeline-parallel stages, outermost (world = pp x dp x tp; 1: no pipeline); a step's --grad_accum "
    "micro-batches are the schedule's micro-batches",
    "pp_schedule": "pipeline schedule: 1f1b (needs --grad_accum >= --pp_size), gpipe, interleaved_1f1b (with "
    "--pp_virtual), looped_bfs, interleaved_zero_bubble, zbv, dualpipev (where the installed torch has them)",
    "pp_virtual": "stages per rank of the interleaved schedules (interleaved_1f1b, looped_bfs, "
    "interleaved_zero_bubble)",
    "pp_layers": "decoder layers per stage by hand, a,b,... summing to the model's layer count (default: the "
    "cost-balanced split; the first stage also holds the embedding, the last the head and MTP)",
}


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Register every TrainConfig field as ``--name`` (the seed scripts' spelling), with overridable defaults."""
    base = TrainConfig(**defaults)
    for f in fields(TrainConfig):
        value = getattr(base, f.name)
        flag = f"--{f.name}"
        if f.name == "data":  # PATH[:WEIGHT], several after one --data or with --data repeated
            parser.add_argument(
                flag, nargs="+", action="extend", default=None, metavar="PATH[:WEIGHT]", help=HELP[f.name]
            )
            continue
        if f.type in ("bool", bool, "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=HELP[f.name])
            continue
        if f.name == "warmup_steps":  # a default above a short run's --steps is lowered to it, an explicit one is not
            parser.add_argument(flag, type=int, default=None, help=f"{HELP[f.name]} (default: {value} or --steps)")
            parser.set_defaults(default_warmup_steps=value)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=value, help=f"{HELP[f.name]} (default: {value})")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if values["warmup_steps"] is None:
        values["warmup_steps"] = min(getattr(args, "default_warmup_steps", TrainConfig.warmup_steps), args.steps)
    return TrainConfig(**values)


# -- the values alone ------------------------------------------------------------------------------------


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_args(cfg: TrainConfig) -> None:
    """Every rule a value must follow on its own or against another flag; the first broken one is raised."""
    for name in ("batch_size", "steps", "grad_accum", "max_nonfinite_steps"):
        value = getattr(cfg, name)
        _need(value >= 1, f"--{name} {value}: must be at least 1; pass a positive integer")
    _need(cfg.max_length >= 2, f"--max_length {cfg.max_length}: must be at least 2 (a token and its next one)")
    _need(
        cfg.lr is not None and 0 < cfg.lr <= MAX_STEP,
        f"--lr {cfg.lr}: must be above 0 and at most {MAX_STEP:g} (AdamW steps in float32); pass e.g. --lr 1e-5",
    )
    _need(0 <= cfg.min_lr_ratio <= 1, f"--min_lr_ratio {cfg.min_lr_ratio}: must be within [0, 1] (a fraction of --lr)")
    _need(
        0 <= cfg.warmup_steps <= cfg.steps,
        f"--warmup_steps {cfg.warmup_steps}: must be within [0, --steps {cfg.steps}]; lower it or raise --steps",
    )
    for name in ("weight_decay", "grad_clip", "mtp_loss_weight", "bias_update_rate", "warn_load_ratio"):
        value = getattr(cfg, name)
        _need(math.isfinite(value) and value >= 0, f"--{name} {value}: must be a finite number >= 0")
    _need(
        cfg.lr * cfg.weight_decay <= MAX_STEP,
        f"--weight_decay {cfg.weight_decay} x --lr {cfg.lr}: above {MAX_STEP:g} (AdamW decays in float32); "
        f"lower --weight_decay",
    )
    _need(
        cfg.aux_loss_coef is None or (math.isfinite(cfg.aux_loss_coef) and cfg.aux_loss_coef >= 0),
        f"--aux_loss_coef {cfg.aux_loss_coef}: must be a finite number >= 0 (0 turns the load-balancing loss off)",
    )
    for name in ("save_every", "jit_warmup_steps", "warn_idle_steps"):
        value = getattr(cfg, name)
        _need(value >= 0, f"--{name} {value}: must be 0 or more")
    _need(
        cfg.stop_after is None or 1 <= cfg.stop_after <= cfg.steps,
        f"--stop_after {cfg.stop_after}: must be within [1, --steps {cfg.steps}]; lower it or raise --steps",
    )
    _need(cfg.tp_size is None or cfg.tp_size >= 1, f"--tp_size {cfg.tp_size}: must be at least 1")
    _need(cfg.ep_size is None or cfg.ep_size >= 1, f"--ep_size {cfg.ep_size}: must be at least 1")
    _need(
        cfg.timeout_s is None or (math.isfinite(cfg.timeout_s) and cfg.timeout_s > 0),
        f"--timeout_s {cfg.timeout_s}: must be a number of seconds above 0",
    )
    _need(cfg.precision in PRECISIONS, f"--precision {cfg.precision!r}: must be one of {', '.join(PRECISIONS)}")
    _need(cfg.recompute in RECOMPUTE, f"--recompute {cfg.recompute!r}: must be one of {', '.join(RECOMPUTE)}")
    _need(
        not (cfg.gradient_checkpointing and cfg.recompute not in ("none", "full")),
        f"--gradient_checkpointing with --recompute {cfg.recompute}: the first recomputes every layer; pass one",
    )
    _need(
        cfg.moe_impl in moe_impl_choices(),
        f"--moe_impl {cfg.moe_impl!r}: must be one of {', '.join(moe_impl_choices())}",
    )
    _need(bool(cfg.text_field), "--text_field is empty; name the JSONL field that holds the text")
    check_moe_args(cfg)
    check_data_args(cfg)
    _need(
        not (cfg.resume and cfg.overwrite),
        "--resume and --overwrite together: --resume continues the run in --save_dir/--log_dir, --overwrite "
        "replaces it; pass one",
    )
    check_lora_args(cfg)
    check_eval_args(cfg)
    check_pp_args(cfg)


# -- what the values name --------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What ``check_inputs`` found: the model's config, where a resumed run stands, the data, and the earlier
    run's checkpoints that --overwrite replaces."""

    model_path: str
    model_config: Any
    start: int
    data: PackedData | DataStream
    replaced: list[Path] = field(default_factory=list)
    eval: EvalSet | None = None  # this dp rank's eval batches (--eval_data / --eval_split)


def step_dirs(save_dir: Path) -> dict[int, Path]:
    """The ``step-N`` folders in ``save_dir`` by N."""
    if not save_dir.is_dir():
        return {}
    found = {int(m.group(1)): p for p in save_dir.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))}
    return dict(sorted(found.items()))


def is_checkpoint(path: Path) -> bool:
    """A folder npu-parallel wrote and nothing else: its manifest proves every file in it ours."""
    owned, _ = owned_files(path)
    return owned is not None and {p.name for p in path.iterdir()} <= owned


def _resumed(cfg: TrainConfig, resume: str, state: ParallelState) -> tuple[Any, int, int]:
    """(model config, step, data position) of the --resume checkpoint, checked against this run's layout."""
    try:
        source = ShardedSource(resume, trust_remote_code=cfg.trust_remote_code)
        model_config = source.read_config()
    except CheckpointError as exc:
        raise ConfigError(f"--resume {exc}") from None
    training = source.manifest.get("training") or {}
    extra = training.get("extra") or {}
    _need(
        bool(training.get("has_optimizer")) and "step" in extra and "data_position" in extra,
        f"--resume {cfg.resume}: holds no training state (optimizer, step, data position); resume from a "
        f"step-N folder written by training, or start from it with --model_path",
    )
    saved = saved_layout(training)  # (world, tp, ep, pp): pp may differ, tp, ep and dp (world / pp) may not
    _need(
        same_stage_layout(saved, state),
        f"--resume {cfg.resume}: saved with world={saved[0]}, tp={saved[1]}, ep={saved[2]}, pp={saved[3]}, this run "
        f"has world={state.world_size}, tp={state.tp_size}, ep={state.ep_size}, pp={state.pp_size}; resume with the "
        f"same --tp_size, --ep_size and dp (--nproc_per_node / --pp_size; --pp_size may differ)",
    )
    return model_config, int(extra["step"]), int(extra["data_position"])


def _checkpoints_to_replace(cfg: TrainConfig, start: int, main: bool) -> list[Path]:
    """An earlier run's step-N folders: refused without --resume/--overwrite; with --overwrite, replaced."""
    if not cfg.save_dir:
        return []
    save_dir = Path(cfg.save_dir)
    _need(
        not save_dir.exists() or save_dir.is_dir(),
        f"--save_dir {save_dir}: exists and is not a directory; choose another --save_dir",
    )
    existing = step_dirs(save_dir)
    if not existing:
        return []
    names = ", ".join(p.name for p in existing.values())
    if cfg.resume:
        later = [p.name for n, p in existing.items() if n > start]
        if later and main:
            logger.warning(
                "--save_dir %s: %s (after the resumed step %d) will be replaced when this run saves those steps",
                save_dir,
                ", ".join(later),
                start,
            )
        return []
    _need(
        cfg.overwrite,
        f"--save_dir {save_dir}: holds checkpoints of an earlier run ({names}); pass --resume "
        f"{existing[max(existing)]} to continue it, --overwrite to replace them, or choose another --save_dir",
    )
    for path in existing.values():
        _need(
            is_checkpoint(path),
            f"--save_dir {save_dir}: {path.name} is not an npu-parallel checkpoint (no valid {MANIFEST}); "
            f"--overwrite replaces only checkpoints: move it away or choose another --save_dir",
        )
    return list(existing.values())


def _check_log_dir(cfg: TrainConfig) -> None:
    """A log_dir whose metrics.jsonl holds an earlier run: continued with --resume, replaced with --overwrite."""
    if not cfg.log_dir:
        return
    log_dir = Path(cfg.log_dir)
    _need(
        not log_dir.exists() or log_dir.is_dir(),
        f"--log_dir {log_dir}: exists and is not a directory; choose another --log_dir",
    )
    metrics = log_dir / METRICS_FILE
    if cfg.resume or cfg.overwrite or not metrics.is_file() or not metrics.stat().st_size:
        return
    steps = [s for r in read_metrics(metrics) if isinstance(s := r.get("step"), int)]
    span = f" (steps {steps[0]}-{steps[-1]})" if steps else ""
    raise ConfigError(
        f"--log_dir {log_dir}: {METRICS_FILE} holds an earlier run{span}; pass --resume to continue it, "
        f"--overwrite to replace it, or choose another --log_dir"
    )


def check_inputs(cfg: TrainConfig, state: ParallelState) -> RunInputs:
    """Check what the flags name and build the data (no collective: the caller agrees the outcome)."""
    model_path = cfg.model_path
    if not model_path:
        raise ConfigError("--model_path is required: a Hugging Face checkpoint folder (config.json)")
    try:
        model_config = load_config(model_path, cfg.trust_remote_code)
    except CheckpointError as exc:
        raise ConfigError(f"--model_path {exc}") from None
    start = position = 0
    if cfg.resume:
        model_config, start, position = _resumed(cfg, cfg.resume, state)
        last = cfg.stop_after or cfg.steps
        _need(
            start < last,
            f"--resume {cfg.resume}: is at step {start}, this run would stop at step {last}; nothing to train, "
            f"raise --steps (or --stop_after) above {start}",
        )
    max_pos = getattr(model_config, "max_position_embeddings", None)
    _need(
        max_pos is None or cfg.max_length <= max_pos,
        f"--max_length {cfg.max_length}: above the model's max_position_embeddings {max_pos}; pass at most {max_pos}",
    )
    check_pp_model(cfg, model_config, state)
    replaced = _checkpoints_to_replace(cfg, start, state.rank == 0)
    _check_log_dir(cfg)
    eos = first_eos(getattr(model_config, "eos_token_id", None))
    data, evals = build_run_data(cfg, state, model_path, model_config.vocab_size, eos)
    data.position = position
    return RunInputs(model_path, model_config, start, data, replaced, evals)
