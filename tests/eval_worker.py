"""What the eval tests share: references on the unconverted transformers model (one example at a time), the
check of an eval result against one, and the config of a short run that evaluates while it trains."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from npu_parallel.training.batch import IGNORE_INDEX
from npu_parallel.training.data import ByteTokenizer, file_documents, pack

TOL = dict(rel=1e-5)


def windows(data: str, vocab: int, eos: int | None, length: int) -> torch.Tensor:
    """The eval set as the tiny checkpoints (no tokenizer: bytes) make it: every window of ``length`` once."""
    return pack(file_documents(data), ByteTokenizer(vocab, eos), length, 10**9)


def summed_reference(model: torch.nn.Module, examples: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Cross-entropy summed over each ``(ids [1, S], labels [S - 1])`` example run alone (IGNORE_INDEX left out),
    divided by the tokens counted: the eval result's loss, tokens and examples."""
    total, tokens, examples_seen = 0.0, 0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
            examples_seen += 1
    return {"loss": total / tokens, "tokens": tokens, "examples": examples_seen}


def per_example_reference(path: str, data: str, length: int, adapter: str | None = None) -> dict:
    """Summed cross-entropy over each window alone, on the unconverted model (with PEFT's adapter if given)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    eos = model.config.eos_token_id
    rows = windows(data, model.config.vocab_size, eos[0] if isinstance(eos, list) else eos, length)
    return summed_reference(model, ((row.unsqueeze(0), row[1:]) for row in rows))


def check_eval(got: dict, ref: dict) -> None:
    """An eval result (``npu-parallel eval``'s JSON line) equals the reference: loss, perplexity, the counts."""
    assert set(got) == {"loss", "perplexity", "tokens", "examples"}
    assert got["tokens"] == ref["tokens"] and got["examples"] == ref["examples"]
    assert got["loss"] == pytest.approx(ref["loss"], **TOL)
    assert got["perplexity"] == pytest.approx(math.exp(ref["loss"]), **TOL)


def eval_run(model: str, eval_data: str, run: Path, max_length: int, **over) -> dict:
    """TrainConfig kwargs of a short dp run (tp 1, no warmup) evaluating ``eval_data`` every step, saving to
    ``run/ckpt`` and logging to ``run/log``; ``over`` replaces or adds any of them."""
    base = dict(
        model_path=model,
        tp_size=1,
        batch_size=1,
        max_length=max_length,
        steps=3,
        lr=1e-3,
        warmup_steps=0,
        jit_warmup_steps=0,
        eval_every=1,
        eval_data=eval_data,
        save_dir=str(run / "ckpt"),
        log_dir=str(run / "log"),
    )
    return {**base, **over}


def make_adapter(path: str, out: str) -> str:
    """A PEFT adapter with non-zero B (so it changes the loss), saved for --lora_adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False))
    peft.save_pretrained(out)
    return out
