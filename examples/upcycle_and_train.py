#!/usr/bin/env python
"""Upcycle a dense model into an MoE, fine-tune it with the load-balancing loss and router jitter, merge, reload.

    torchrun --nproc_per_node 2 examples/upcycle_and_train.py --out runs/upcycle [--dense PATH] [--tp_size 2]

Without --dense it first saves a tiny random dense Qwen3 (bytes as tokens). Rank 0 upcycles it
(`npu-parallel upcycle`: every expert a copy of the FFN, the output equal to the dense model), every rank
fine-tunes it (tp --tp_size, experts over --ep_size, --aux_loss_coef and --router_noise jitter), rank 0 merges
the last checkpoint into a Hugging Face folder and reloads it with transformers. OUT/summary.json holds the
losses of the dense, upcycled and trained models on a held-out text, and each MoE layer's expert-load
coefficient of variation at the first and the last step (copies start with the router's seeded init).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import npu_parallel
from npu_parallel.checkpoint.offline import merge_checkpoint
from npu_parallel.checkpoint.upcycle import upcycle_checkpoint
from npu_parallel.training.config import TrainConfig
from npu_parallel.training.loop import train
from npu_parallel.training.metrics import METRICS_FILE

HELD_OUT = "def mean(xs):\n    return sum(xs) / len(xs)\n\n" * 8


def tiny_dense(path: Path) -> Path:
    """A random dense Qwen3 with a byte vocabulary (512), 4 layers of hidden 64."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, eos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def held_out_loss(path: Path) -> float:
    """The loss of the Hugging Face folder at ``path`` on HELD_OUT (bytes as tokens), as transformers computes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([list(HELD_OUT.encode())[:128]])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def load_cv(log_dir: Path) -> dict[str, list[float]]:
    """Layer -> [cv at the first step, cv at the last] of the expert load in metrics.jsonl."""
    records = [json.loads(x) for x in (log_dir / METRICS_FILE).read_text().splitlines()]
    loads = [r["expert_load"] for r in records if "expert_load" in r]
    return {str(row["layer"]): [row["cv"], last["cv"]] for row, last in zip(loads[0], loads[-1], strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for every stage's output")
    parser.add_argument("--dense", default=None, help="a dense Llama/Mistral/Qwen2/Qwen3 folder (default: a tiny one)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--top_k", type=int, default=2, help="experts per token")
    parser.add_argument("--tp_size", type=int, default=None, help="tensor-parallel size (default: the world)")
    parser.add_argument("--ep_size", type=int, default=None, help="expert-parallel size (default: --tp_size)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--aux_loss_coef", type=float, default=0.01, help="load-balancing loss coefficient")
    parser.add_argument("--router_noise_eps", type=float, default=0.05, help="router jitter eps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    state = npu_parallel.init_distributed(args.tp_size, ep_size=args.ep_size)
    moe = out / "moe"
    if state.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        dense = Path(args.dense) if args.dense else tiny_dense(out / "dense")
        upcycle_checkpoint(dense, moe, experts=args.experts, top_k=args.top_k, overwrite=True, progress=False)
    if dist.is_initialized():
        dist.barrier()
    cfg = TrainConfig(
        model_path=str(moe), tp_size=state.tp_size, ep_size=args.ep_size, batch_size=2, max_length=64,
        steps=args.steps, lr=args.lr, warmup_steps=1, jit_warmup_steps=0, aux_loss_coef=args.aux_loss_coef,
        router_noise="jitter", router_noise_eps=args.router_noise_eps, save_dir=str(out / "ckpt"),
        log_dir=str(out / "log"), overwrite=True, seed=0,
    )  # fmt: skip
    result = train(cfg, state)
    if state.rank == 0:
        merged = merge_checkpoint(result["checkpoint"], out / "merged", overwrite=True, progress=False)
        summary = {
            "loss": {
                "dense": held_out_loss(Path(args.dense) if args.dense else out / "dense"),
                "upcycled": held_out_loss(moe),
                "trained": held_out_loss(merged),
            },
            "train_losses": result["losses"],
            "expert_load_cv": load_cv(out / "log"),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary["loss"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
