"""Rank worker: LoRA on converted models against PEFT on the unconverted model, at several tp sizes in one launch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import npu_parallel
from npu_parallel.parallel.shard_spec import spec_of
from npu_parallel.tools.audit import OpAudit

from .common import seeded_ids, sgd_step
from .models import load_reference

LR = 0.5
ATTENTION = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj", "o_proj"]
# transformers 5 renames target_modules gate_proj/up_proj/down_proj to the fused experts, so the dense and shared
# MLPs are targeted by their weights (PEFT's ParamWrapper on a 2-D weight: the same LoRA)
PARAMETERS = [
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
    *(f"{m}.{p}_proj.weight" for m in ("mlp", "shared_experts") for p in ("gate", "up", "down")),
]


def lora_config() -> LoraConfig:
    # init_lora_weights=False: PEFT leaves B at nn.Linear's random init, so the adapters change the outputs
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=PARAMETERS, init_lora_weights=False
    )


def _batch(vocab: int) -> torch.Tensor:
    return seeded_ids(vocab, 2, 12, 99)


def _sgd_step(model, ids) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Logits, then one SGD step on the trainable parameters; returns (logits, loss, loss after)."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    sgd_step(model, LR)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    return out.logits.detach(), out.loss.detach(), after


def _barrier(state) -> None:
    if state.world_size > 1:
        dist.barrier()


def _merged_diff(model, merged_ref: dict[str, torch.Tensor]) -> float:
    """Max difference between this rank's merged weights and the matching slices of PEFT's merge_and_unload."""
    worst = 0.0
    for name, p in model.named_parameters():
        ref = merged_ref[name]
        spec = spec_of(p)
        if spec is not None:
            ref = ref.narrow(spec.dim, spec.start, spec.length)
            p = p.narrow(spec.dim, 0, spec.length)
        worst = max(worst, (p.detach() - ref).abs().max().item())
    return worst


def _peft_reference(name: str, path: Path, adapter: Path) -> PeftModel:
    return PeftModel.from_pretrained(load_reference(name, path), str(adapter), is_trainable=True)


def compare_variant(name: str, path: Path, state, work: Path, moe_impl: str = "auto") -> dict:
    """One variant at this tp: load / step / save / merge, each against PEFT."""
    adapter = work / f"{name}-peft"
    ids = _batch(load_reference(name, path).config.vocab_size)
    if state.rank == 0 and not adapter.exists():
        torch.manual_seed(7)
        get_peft_model(load_reference(name, path), lora_config()).save_pretrained(str(adapter))
    _barrier(state)
    ref = _peft_reference(name, path, adapter)
    ref_logits, ref_loss, ref_after = _sgd_step(ref, ids)
    stepped = work / f"{name}-peft-stepped-{state.tp_size}-{moe_impl}"
    if state.rank == 0:
        ref.save_pretrained(str(stepped))
    _barrier(state)

    model = npu_parallel.convert_model(load_reference(name, path), state, moe_impl=moe_impl)
    npu_parallel.apply_lora(model, state, adapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with OpAudit(model=model) as audit:  # the adapters add no banned op and no host sync
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    logits, loss, after = _sgd_step(model, ids)
    ours = work / f"{name}-ours-{state.tp_size}-{moe_impl}"
    npu_parallel.save_lora(model, ours, state)
    reloaded = PeftModel.from_pretrained(load_reference(name, path), str(ours))
    with torch.no_grad():
        reload_logits = reloaded(input_ids=ids).logits
        ours_logits_after = model(input_ids=ids).logits
    saved, peft_saved = (
        load_file(str(ours / "adapter_model.safetensors")),
        load_file(str(stepped / "adapter_model.safetensors")),
    )
    merged_ref = PeftModel.from_pretrained(load_reference(name, path), str(ours)).merge_and_unload().state_dict()
    npu_parallel.merge_lora(model)

    # a new adapter from a LoraConfig: the same seed gives PEFT's own adapters, at any tp
    fresh = npu_parallel.convert_model(load_reference(name, path), state, moe_impl=moe_impl)
    torch.manual_seed(7)
    npu_parallel.apply_lora(fresh, state, lora_config())
    fresh_dir = work / f"{name}-fresh-{state.tp_size}-{moe_impl}"
    npu_parallel.save_lora(fresh, fresh_dir, state)
    fresh_saved, original = (
        load_file(str(fresh_dir / "adapter_model.safetensors")),
        load_file(str(adapter / "adapter_model.safetensors")),
    )
    return {
        "logits": (logits - ref_logits).abs().max().item(),
        "loss": abs(loss.item() - ref_loss.item()),
        "loss_moved": abs(ref_after - ref_loss.item()),
        "after": abs(after - ref_after),
        "reload_logits": (reload_logits - ours_logits_after).abs().max().item(),
        "keys_equal": sorted(saved) == sorted(peft_saved),
        "stepped_adapter": max((saved[k] - peft_saved[k]).abs().max().item() for k in saved),
        "merged": _merged_diff(model, merged_ref),
        "fresh_keys_equal": sorted(fresh_saved) == sorted(original),
        "fresh_adapter": max((fresh_saved[k] - original[k]).abs().max().item() for k in original),
        "trainable_only_lora": all(".lora." in n for n in trainable) and len(trainable) > 0,
        "experts_adapted": any("experts.lora" in n for n in trainable),
        "banned_ops": [(e.op, e.where) for e in audit.banned()],
        "host_syncs_forward": audit.host_syncs(phase="forward"),
        "moe_layers": sum(hasattr(layer.mlp, "experts") for layer in model.model.layers),
    }


def compare(ckpt_root: str, names: list[str], tps: list[int], impls: dict[str, list[str]], work_dir: str) -> dict:
    """{(tp, moe_impl, variant): metrics}; every tp size in this one launch (the groups are rebuilt per size)."""
    results = {}
    work = Path(work_dir)
    for tp in tps:
        state = npu_parallel.init_distributed(tp)
        for impl in impls.get(str(tp), ["auto"]):
            for name in names if impl == "auto" else names[:1]:
                results[f"{tp}/{impl}/{name}"] = compare_variant(name, Path(ckpt_root) / name, state, work, impl)
    return results
