"""References for the eval tests: the unconverted transformers model, one example at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from npu_parallel.training.data import ByteTokenizer, file_documents, pack


def windows(data: str, vocab: int, eos: int | None, length: int) -> torch.Tensor:
    """The eval set as the tiny checkpoints (no tokenizer: bytes) make it: every window of ``length`` once."""
    return pack(file_documents(data), ByteTokenizer(vocab, eos), length, 10**9)


def per_example_reference(path: str, data: str, length: int, adapter: str | None = None) -> dict:
    """Summed cross-entropy over each example alone, on the unconverted model (with PEFT's adapter if given)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    eos = model.config.eos_token_id
    rows = windows(data, model.config.vocab_size, eos[0] if isinstance(eos, list) else eos, length)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = row.unsqueeze(0)
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    return {"loss": total / tokens, "tokens": tokens, "examples": len(rows)}


def make_adapter(path: str, out: str) -> str:
    """A PEFT adapter with non-zero B (so it changes the loss), saved for --lora_adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False))
    peft.save_pretrained(out)
    return out
