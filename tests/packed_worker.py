"""Rank workers for the packed-batch tests: every document of a packed row against that document run alone."""

from __future__ import annotations

import torch

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained
from npu_parallel.convert.documents import document_inputs
from npu_parallel.moe.load import moe_blocks, reset_load, token_layout
from npu_parallel.moe.token_layout import TokenLayout
from npu_parallel.training.batch import Batch
from npu_parallel.training.labels import Encoded
from npu_parallel.training.losses import batch_loss
from npu_parallel.training.packing import make_batch

LENGTHS = ((7, 5), (9,))  # row 0: two documents; row 1: one, then 3 padding tokens
MTP_WEIGHT = 0.3


def documents(vocab: int) -> list[list[Encoded]]:
    """The rows' documents: seeded ids, every token a label (make_batch sets each document's first to -100)."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for row in LENGTHS:
        docs = []
        for n in row:
            ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
            docs.append(Encoded(ids, list(ids)))
        rows.append(docs)
    return rows


def _forward(model, batch: Batch):
    """Logits [B, L, V] and the reported aux loss of one train-mode forward (the expert load accumulates)."""
    layout = None if batch.document_ids is None else TokenLayout.from_documents(batch.document_ids, batch.lengths)
    with token_layout(model, layout):
        out = model(input_ids=batch.input_ids, **document_inputs(model, batch.document_ids, batch.position_ids,
                                                                  batch.lengths))  # fmt: skip
    return out.logits.detach(), getattr(out, "aux_loss", None)


def _loads(model) -> list[torch.Tensor]:
    return [block.expert_load.clone() for _, block in moe_blocks(model) if block.expert_load is not None]


def _case(path: str, tp: int, ep: int, mtp: bool) -> dict:
    state = npu_parallel.init_distributed(tp, ep_size=ep)
    model = load_pretrained(path, state, dtype=torch.float32, progress=False).train()
    rows = documents(model.config.vocab_size)
    packed = make_batch(rows, pad_id=0)
    weight = MTP_WEIGHT if mtp else 0.0

    reset_load(model)
    logits, aux = _forward(model, packed)
    packed_load = _loads(model)
    part = batch_loss(model, packed, vocab_parallel=False, mtp_weight=weight)
    loss = part.ce_sum + (part.aux if part.aux is not None else 0)
    if part.mtp_sums:
        loss = loss + weight * torch.stack(part.mtp_sums).sum()
    loss.backward()
    grads_finite = all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)

    logit_diff, alone_aux, alone = 0.0, [], []
    reset_load(model)
    for r, row in enumerate(rows):
        start = 0
        for doc in row:
            one = make_batch([[doc]], pad_id=0)
            alone.append(one)
            alone_logits, a = _forward(model, one)
            n = len(doc.ids)
            logit_diff = max(logit_diff, (logits[r, start : start + n] - alone_logits[0]).abs().max().item())
            start += n
            alone_aux.append(None if a is None else float(a))
    alone_load = _loads(model)
    alone_ce, alone_mtp = 0.0, []
    with torch.no_grad():
        for one in alone:
            p = batch_loss(model, one, vocab_parallel=False, mtp_weight=weight)
            alone_ce += p.ce_sum.item()
            if p.mtp_sums:
                alone_mtp.append([s.item() for s in p.mtp_sums])
    return {
        "case": dict(tp=tp, ep=ep, mtp=mtp),
        "logit_diff": logit_diff,
        "ce": (part.ce_sum.item(), alone_ce),
        "targets": (part.targets, sum(d.targets for row in rows for d in row)),
        "aux": (None if aux is None else float(aux), alone_aux),
        "mtp": (None if not part.mtp_sums else [s.item() for s in part.mtp_sums], alone_mtp),
        "load": ([t.tolist() for t in packed_load], [t.tolist() for t in alone_load]),
        "real_tokens": sum(sum(row) for row in LENGTHS),
        "grads_finite": grads_finite,
    }


def packed_vs_alone(paths: dict[str, str], cases: list[dict]) -> dict:
    """Per case ``{family, tp, ep, mtp}``: the packed forward's per-document logits, losses, aux loss and expert
    load against each document alone."""
    return {f"{c['family']}-tp{c['tp']}-ep{c['ep']}": _case(paths[c["family"]], c["tp"], c["ep"], c.get("mtp", False))
            for c in cases}  # fmt: skip


def switch_reference(path: str) -> float:
    """transformers' own Switch loss (load_balancing_loss_func) over the documents' router logits, each document
    run alone through the unconverted model: what the packed rows' aux loss must equal."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    runs = [
        ref(input_ids=torch.tensor([doc.ids]), output_router_logits=True).router_logits
        for row in documents(ref.config.vocab_size)
        for doc in row
    ]  # per document: per MoE layer [tokens, E]
    gate = tuple(torch.cat([r[layer].reshape(-1, r[layer].shape[-1]) for r in runs]) for layer in range(len(runs[0])))
    with torch.no_grad():
        return float(load_balancing_loss_func(gate, ref.config.num_experts, ref.config.num_experts_per_tok))
