"""Rank worker: routing hooks (record_routing, override_routing) against the unconverted model, and the OKR example.

The reference's routing is read by hooking transformers' own router module (``mlp.gate``: its output is
``(logits, weights, ids)``; a remote-code MoEGate's ``(ids, weights, aux)``); a forced routing is put into the
reference by a forward hook on that module that replaces its output with the forced ids and the family's weights
at them, written out here per family.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.distributed as dist

import npu_parallel
from npu_parallel.moe.routing_hooks import RoutingDisagreement

from .equivalence import SGD_LR
from .models import load_reference
from .repo import ROOT

SEQ = 12


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(7))


def _moe_gates(model) -> dict[int, torch.nn.Module]:
    return {i: layer.mlp.gate for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


def _split(out) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(logits or None, ids, weights) of a router's output, transformers 5.x or remote code."""
    if len(out) == 3 and out[0].is_floating_point():
        return out[0], out[2], out[1]
    return None, out[0], out[1]


def reference_routing(name: str, path: Path, ids: torch.Tensor) -> dict[int, tuple]:
    """Layer -> (logits or None, ids, weights) that the unconverted model's own routers return (eval)."""
    ref = load_reference(name, path).eval()
    seen: dict[int, tuple] = {}
    handles = [
        g.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, _split(out)))
        for i, g in _moe_gates(ref).items()
    ]
    with torch.no_grad():
        ref(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def _matched(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.sort(dim=-1)
    return order.values, weights.gather(1, order.indices)


def compare_records(rec, reference: dict[int, tuple]) -> dict:
    """Max differences of one forward's records against the reference's router outputs."""
    out = {"layers": sorted(rec.layers), "ids_equal": True, "logits_diff": 0.0, "weights_diff": 0.0}
    out["scores_rank_ids"] = True
    for i, (logits, ref_ids, ref_w) in reference.items():
        r = rec.layers[i][0]
        a_ids, a_w = _matched(r.ids, r.weights)
        b_ids, b_w = _matched(ref_ids.reshape(a_ids.shape), ref_w.reshape(a_ids.shape))
        out["ids_equal"] &= torch.equal(a_ids, b_ids)
        out["weights_diff"] = max(out["weights_diff"], (a_w - b_w).abs().max().item())
        if logits is not None:
            out["logits_diff"] = max(
                out["logits_diff"], (r.raw_logits - logits.reshape(r.raw_logits.shape)).abs().max().item()
            )
        top = r.scores.topk(r.ids.shape[-1], dim=-1).indices.sort(dim=-1).values
        out["scores_rank_ids"] &= torch.equal(top, a_ids)
    return out


def _same_on_ranks(rec) -> bool:
    """Every rank holds the same records (all_gather of their concatenation)."""
    flat = torch.cat([t.float().reshape(-1) for rs in rec.layers.values() for r in rs for t in vars(r).values()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], t) for t in everyone)


def observe(root: Path, names: list[str], layouts: list[tuple[int, int]]) -> dict:
    """{"name tp=.. ep=..": comparison} in eval, plus train mode and generate at the first layout with tp > 1."""
    results: dict = {}
    for tp, ep in layouts:
        state = npu_parallel.init_distributed(tp, ep_size=ep)
        for name in names:
            path = root / name
            ids = _batch(load_reference(name, path).config.vocab_size)  # the same tokens on every rank
            reference = reference_routing(name, path, ids)
            model = npu_parallel.convert_model(load_reference(name, path), state, aux_loss_coef=0.0).eval()
            with torch.no_grad(), npu_parallel.record_routing(model) as rec:
                model(input_ids=ids)
            row = compare_records(rec, reference)
            row["same_on_ranks"] = _same_on_ranks(rec)
            row["hook_removed"] = all(
                b.mlp.routing_hook is None for b in model.model.layers if hasattr(b.mlp, "experts")
            )
            if tp > 1:
                model.train()
                with npu_parallel.record_routing(model, layers=[sorted(reference)[-1]], fields=("ids",)) as rec:
                    model(input_ids=ids, labels=ids).loss.backward()
                r = rec.layers[sorted(reference)[-1]]
                row["train_records"] = len(r)
                row["train_ids_equal"] = torch.equal(
                    r[0].ids.sort(-1).values,
                    reference[sorted(reference)[-1]][1].reshape(r[0].ids.shape).sort(-1).values,
                )
                row["train_other_fields"] = r[0].raw_logits is None and r[0].weights is None
                model.eval()
                with torch.no_grad(), npu_parallel.record_routing(model, fields=("ids",)) as rec:
                    model.generate(ids[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
                row["generate_tokens_per_record"] = [r.ids.shape[0] for r in rec.layers[sorted(reference)[0]]]
            results[f"{name} tp={tp} ep={ep}"] = row
            del model
    return results


# -- forced routing --------------------------------------------------------------------------------------------


def _lowest(raw: torch.Tensor, k: int) -> torch.Tensor:
    return raw.topk(k, dim=-1, largest=False).indices  # the k experts the router likes least


def family_weights(name: str, gate, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """What each family's router gives experts ``ids``, written out from transformers' router code."""
    logits = logits.float()
    if name.startswith("deepseek_v3"):
        w = logits.sigmoid().gather(1, ids)
        if gate.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * gate.routed_scaling_factor
    w = logits.softmax(dim=-1).gather(1, ids)
    if name.startswith("deepseek_v2"):
        return w * gate.routed_scaling_factor
    if name == "mixtral" or getattr(gate, "norm_topk_prob", False):
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def _force_reference(name: str, ref, weights_fn=None) -> None:
    """The reference's routers return the forced routing (the k lowest logits) with the family's weights."""
    for gate in _moe_gates(ref).values():

        def hook(module, args, out):
            logits, ids, _ = _split(out)
            forced = _lowest(logits, ids.shape[-1])
            w = weights_fn(logits, forced) if weights_fn else family_weights(name, module, logits, forced)
            return logits, w, forced

        gate.register_forward_hook(hook)


def _custom_weights(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.float().gather(1, ids).sigmoid()  # weights of the caller's own (no family's)


def _train_step(model, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, loss, router gradient of the last MoE layer, loss after one SGD step)."""
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    gate = list(_moe_gates(model).values())[-1]
    grad = gate.weight.grad.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= SGD_LR * p.grad
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss
    return out.logits.detach(), out.loss.detach(), grad, after


def override(root: Path, names: list[str], tp: int) -> dict:
    """Forced routing at ``tp``: eval logits, train loss, router gradient, loss after a step vs the reference's."""
    state = npu_parallel.init_distributed(tp)
    results = {}
    for name, own_weights in [(n, False) for n in names] + [(names[-1], True)]:
        path = root / name
        ref = load_reference(name, path)
        if hasattr(ref, "router_aux_loss_coef"):
            ref.router_aux_loss_coef = 0.0  # the converted model's loss is off too (aux_loss_coef=0)
        ids = _batch(ref.config.vocab_size)
        _force_reference(name, ref, _custom_weights if own_weights else None)
        ref.eval()
        with torch.no_grad():
            ref_eval = ref(input_ids=ids).logits
        ref_logits, ref_loss, ref_grad, ref_after = _train_step(ref, ids)
        plain = load_reference(name, path).eval()
        with torch.no_grad():
            plain_logits = plain(input_ids=ids).logits

        k = _top_k(ref)[0]

        def fn(layer, x, raw, scores, k=k, own=own_weights):
            forced = _lowest(raw, k)
            return (forced, _custom_weights(raw, forced)) if own else forced

        model = npu_parallel.convert_model(load_reference(name, path), state, aux_loss_coef=0.0)
        model.eval()
        with torch.no_grad(), npu_parallel.override_routing(model, fn):
            logits = model(input_ids=ids).logits
        with npu_parallel.override_routing(model, fn):
            t_logits, loss, grad, after = _train_step(model, ids)
        results[f"{name}{' own weights' if own_weights else ''} tp={tp}"] = {
            "eval_logits_diff": (logits - ref_eval).abs().max().item(),
            "forced_changes_logits": (ref_eval - plain_logits).abs().max().item(),
            "train_logits_diff": (t_logits - ref_logits).abs().max().item(),
            "loss": loss.item(),
            "ref_loss": ref_loss.item(),
            "router_grad_diff": (grad - ref_grad).abs().max().item(),
            "router_grad_norm": ref_grad.norm().item(),
            "loss_after_step": after.item(),
            "ref_loss_after_step": ref_after.item(),
        }
        del model
    return results


def _top_k(model) -> list[int]:
    return [int(g.top_k) for g in _moe_gates(model).values()]


def disagreement(root: Path, name: str, tp: int) -> dict:
    """A fn that draws different experts on each rank: broadcast makes the ranks agree; check raises on all."""
    state = npu_parallel.init_distributed(tp)
    model = npu_parallel.convert_model(load_reference(name, root / name), state).eval()
    ids = _batch(model.config.vocab_size)
    g = torch.Generator().manual_seed(100 + state.rank)  # each rank its own draw

    def fn(layer, x, raw, scores):
        k = next(iter(_top_k(model)))
        return torch.rand(raw.shape, generator=g).topk(k, dim=-1).indices

    with torch.no_grad(), npu_parallel.override_routing(model, fn):
        logits = model(input_ids=ids).logits
    everyone = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, logits)
    try:
        with torch.no_grad(), npu_parallel.override_routing(model, fn, agree="check"):
            model(input_ids=ids)
        raised = None
    except RoutingDisagreement as exc:
        raised = str(exc)
    return {"broadcast_same_logits": all(torch.equal(everyone[0], t) for t in everyone), "check_raised": raised}


# -- the OKR example -------------------------------------------------------------------------------------------


def _example():
    spec = importlib.util.spec_from_file_location("okr_watermark", ROOT / "examples" / "okr_watermark.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def watermark(model_dir: str, out_root: str, args: list[str]) -> dict:
    """The example at tp 1 and tp 2 (same launch): both results.json (rank 0 writes them)."""
    example = _example()
    found = {}
    for tp in (1, 2):
        out = Path(out_root) / f"tp{tp}"
        example.main(["--model", model_dir, "--out", str(out), "--tp", str(tp), "--trust_remote_code", *args])
        dist.barrier()
        found[tp] = json.loads((out / "results.json").read_text())
    return found


def run_all(ckpt_root: str, observe_names: list[str], override_names: list[str], okr: list) -> dict:
    """Everything this test module checks, in one launch of 2 ranks."""
    root = Path(ckpt_root)
    return {
        "observe": observe(root, observe_names, [(1, 1), (2, 2), (1, 2)]),
        "override": override(root, override_names, 2),
        "disagreement": disagreement(root, override_names[0], 2),
        "watermark": watermark(*okr),
    }


def build_tiny_deepseek_moe(path: Path, seed: int = 0) -> Path:
    """A tiny DeepSeek-MoE (v1, remote code: tests/remote_fixture.py) with 8 routed experts, top-2, 3 MoE layers,
    routers and experts drawn wider than the rest so that routing changes the next token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import remote_fixture

    config = dict(
        remote_fixture.CONFIG, n_routed_experts=8, num_hidden_layers=4, vocab_size=128, max_position_embeddings=128
    )
    remote_fixture.write_code(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(str(path), trust_remote_code=True), trust_remote_code=True
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * (0.3 if ".mlp." in name else 0.05)
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(str(path))
    remote_fixture.write_code(path)  # ours, whatever save_pretrained copied
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
