"""The fine-tuning loop: TP inside a node, DDP across dp groups, AdamW with warmup+cosine, gradient
accumulation and clipping by the true global norm, JIT warmup, sharded checkpoints and exact resume."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.save import load_training_state, save_sharded
from npu_parallel.moe.dispatchers import choices as moe_impl_choices
from npu_parallel.parallel import device as _device
from npu_parallel.parallel.state import init_distributed
from npu_parallel.training.data import build_data
from npu_parallel.training.losses import causal_lm_loss, set_vocab_parallel_logits
from npu_parallel.training.metrics import MetricsLog, peak_memory_mb
from npu_parallel.training.optim import build_optimizer, clip_grad_norm_, warmup_cosine

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model_path: str | None = None
    tp_size: int | None = None
    batch_size: int = 1
    max_length: int = 256
    steps: int = 20
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    data: str | None = None
    text_field: str = "text"
    save_dir: str | None = None
    save_every: int = 0
    resume: str | None = None
    stop_after: int | None = None
    log_dir: str | None = None
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    vocab_parallel_loss: bool = False
    moe_impl: str = "auto"
    jit_warmup_steps: int = 2
    timeout_s: float | None = None


HELP = {
    "model_path": "Hugging Face checkpoint folder (config.json + *.safetensors)",
    "tp_size": "tensor-parallel size (default: all ranks); world = tp x dp",
    "batch_size": "sequences per micro-batch per dp rank",
    "max_length": "tokens per packed sequence",
    "steps": "optimizer steps (the LR schedule spans them)",
    "lr": "peak learning rate",
    "min_lr_ratio": "cosine decays to this fraction of --lr",
    "warmup_steps": "linear LR warmup steps",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "grad_accum": "micro-batches per optimizer step",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "data": "a .txt or .jsonl file; default: the .py files of Python's standard library",
    "text_field": "JSONL field holding the text",
    "save_dir": "where checkpoints go (step-N folders)",
    "save_every": "save every N steps (0: only at the end)",
    "resume": "a step-N checkpoint folder to continue from exactly",
    "stop_after": "stop after this step, as if interrupted (schedule still spans --steps)",
    "log_dir": "metrics.jsonl and loss.png go here",
    "seed": "data order seed",
    "precision": "auto (bf16 where the device supports it, else fp32), bf16 or fp32",
    "gradient_checkpointing": "recompute activations in backward",
    "vocab_parallel_loss": "cross-entropy on vocab-sharded logits, never gathering them",
    "moe_impl": f"MoE implementation: {', '.join(moe_impl_choices())}",
    "jit_warmup_steps": "forward+backward passes on a small batch before the first real step (compiles kernels)",
    "timeout_s": "process-group timeout in seconds",
}


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Register every TrainConfig field as ``--name`` (the seed scripts' spelling), with overridable defaults."""
    base = TrainConfig(**defaults)
    for f in fields(TrainConfig):
        value = getattr(base, f.name)
        flag = f"--{f.name}"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=HELP[f.name])
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=value, help=f"{HELP[f.name]} (default: {value})")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def resolve_precision(precision: str, kind: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if _device.supports_bf16(kind) else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if precision not in table:
        raise ValueError(f"--precision {precision!r} must be auto, bf16 or fp32")
    return table[precision]


def jit_warmup(model, state, vocab_parallel: bool, steps: int, vocab: int) -> float:
    """Forward and backward on a tiny batch so kernels compile before the first timed step (HCCL timeouts)."""
    if steps <= 0:
        return 0.0
    npu = _device.torch_npu_module()
    if npu is not None and hasattr(npu.npu, "set_compile_mode"):
        npu.npu.set_compile_mode(jit_compile=False)
    t0 = time.perf_counter()
    ids = torch.arange(16, device=state.device).remainder(vocab).unsqueeze(0)
    with torch.random.fork_rng(devices=[] if state.device.type == "cpu" else [state.device]):
        for _ in range(steps):
            loss, _ = causal_lm_loss(model, ids, ids, vocab_parallel=vocab_parallel)
            loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


def _dp_mean(values: list, state) -> list:
    """Mean over the data-parallel group of scalars (None stays None)."""
    t = torch.tensor([v if v is not None else 0.0 for v in values], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=state.dp_group)
    return [None if v is None else x / state.dp_size for v, x in zip(values, t.tolist(), strict=True)]


def train(cfg: TrainConfig) -> dict:
    """Fine-tune ``cfg.model_path``; returns the per-step losses and where checkpoints and logs went."""
    if not cfg.model_path:
        raise ValueError("--model_path is required: a Hugging Face checkpoint folder")
    state = init_distributed(cfg.tp_size, timeout_s=cfg.timeout_s)
    main = state.rank == 0
    dtype = resolve_precision(cfg.precision, state.device.type)
    torch.manual_seed(cfg.seed)

    if cfg.resume:
        model = load_sharded(cfg.resume, state, moe_impl=cfg.moe_impl, dtype=dtype)
    else:
        model = load_pretrained(cfg.model_path, state, dtype=dtype, moe_impl=cfg.moe_impl, progress=main)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.vocab_parallel_loss:
        set_vocab_parallel_logits(model, True)
    model.train()
    net = DistributedDataParallel(model, process_group=state.dp_group) if state.dp_size > 1 else model

    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    data = build_data(
        cfg.model_path,
        cfg.data,
        vocab_size=model.config.vocab_size,
        eos_token_id=getattr(model.config, "eos_token_id", None),
        seq_len=cfg.max_length,
        batch_size=cfg.batch_size,
        micro_batches=cfg.steps * cfg.grad_accum,
        dp_size=state.dp_size,
        dp_rank=state.dp_rank,
        seed=cfg.seed,
    )
    start = 0
    if cfg.resume:
        extra = load_training_state(cfg.resume, state, optimizer=opt, scheduler=sched)
        start, data.position = extra["step"], extra["data_position"]
        if main:
            logger.info("resumed from %s at step %d", cfg.resume, start)

    warm = jit_warmup(net, state, cfg.vocab_parallel_loss, cfg.jit_warmup_steps, model.config.vocab_size)
    if main and warm:
        logger.info("JIT warmup: %d passes in %.1f s", cfg.jit_warmup_steps, warm)

    last = min(cfg.steps, cfg.stop_after or cfg.steps)
    log = MetricsLog(cfg.log_dir, main, cfg.steps, start)
    tokens_per_step = data.tokens_per_batch * cfg.grad_accum * state.dp_size
    saved = None
    for step in range(start, last):
        t0 = time.perf_counter()
        total, aux_total = 0.0, None
        for micro in range(cfg.grad_accum):
            batch = data.next().to(state.device)
            sync: contextlib.AbstractContextManager = contextlib.nullcontext()
            if isinstance(net, DistributedDataParallel) and micro < cfg.grad_accum - 1:
                sync = net.no_sync()  # accumulate locally: DDP reduces on the last micro-batch only
            with sync:
                loss, aux = causal_lm_loss(net, batch, batch, vocab_parallel=cfg.vocab_parallel_loss)
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            if aux is not None:
                aux_total = (aux_total or 0.0) + aux.item() / cfg.grad_accum
        if state.dp_size > 1:  # log the global batch's loss, not this replica's share
            total, aux_total = _dp_mean([total, aux_total], state)
        norm = clip_grad_norm_(model, cfg.grad_clip, state)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        log.step(
            {
                "step": step + 1,
                "loss": total,
                "aux_loss": aux_total,
                "lr": lr,
                "grad_norm": norm.item(),
                "tokens_per_s": tokens_per_step / seconds,
                "step_s": seconds,
                "peak_mem_mb": peak_memory_mb(state.device),
            }
        )
        at_end = step + 1 == last
        if cfg.save_dir and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or at_end):
            saved = save_sharded(
                model,
                Path(cfg.save_dir) / f"step-{step + 1}",
                state,
                optimizer=opt,
                scheduler=sched,
                extra={"step": step + 1, "data_position": data.position, "config": asdict(cfg)},
            )
    plot = log.close()
    return {
        "losses": [r["loss"] for r in log.records],
        "steps": [r["step"] for r in log.records],
        "records": log.records,
        "checkpoint": str(saved) if saved else None,
        "metrics": str(log.path) if log.path else None,
        "plot": str(plot) if plot else None,
        "state": {"world": state.world_size, "tp": state.tp_size, "dp": state.dp_size},
    }
