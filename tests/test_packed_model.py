"""Packed micro-batches through the converted model (issue 21 pt 4): every document of a packed row gives the
logits, the loss and the MTP loss it gives alone, padding counts in neither the load-balancing loss nor the
routed load, at tp 1, tp 2 and ep 2, for DeepSeek-V2, DeepSeek-V3 with its MTP layer and Qwen3-MoE (fp32)."""

import json
from pathlib import Path

import pytest
import torch

from npu_parallel.convert.documents import document_mask
from npu_parallel.moe.token_layout import TokenLayout

from .dist import run_ranks
from .published import build_published

LAYOUTS = [dict(tp=1, ep=1), dict(tp=2, ep=2), dict(tp=1, ep=2)]
FAMILIES = ("deepseek_v2", "deepseek_v3_mtp", "qwen3_moe")


def _with_aux(src: Path, dst: Path) -> str:
    """A copy of a DeepSeek checkpoint with DeepSeek's sequence-wise balance loss on (as published: seq_aux)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.update(aux_loss_alpha=0.01, seq_aux=True)
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.fixture(scope="module")
def paths(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    mtp = build_published(root / "published")["plain"]
    return {
        "deepseek_v2": _with_aux(checkpoints / "deepseek_v2", root / "v2"),
        "deepseek_v3_mtp": _with_aux(mtp, root / "v3"),
        "qwen3_moe": str(checkpoints / "qwen3_moe"),
    }


@pytest.fixture(scope="module")
def results(paths):
    cases = [dict(family=f, mtp=f.endswith("mtp"), **layout) for f in FAMILIES for layout in LAYOUTS]
    return run_ranks(2, "tests.packed_worker:packed_vs_alone", paths, cases)


def _ids():
    return [f"{f}-tp{c['tp']}-ep{c['ep']}" for f in FAMILIES for c in LAYOUTS]


@pytest.mark.parametrize("case", _ids())
def test_each_document_of_a_packed_row_equals_it_alone(results, case):
    r = results[case]
    assert r["logit_diff"] < 2e-5  # cross-document attention or a wrong position id is O(1)
    packed_ce, alone_ce = r["ce"]
    assert packed_ce == pytest.approx(alone_ce, rel=1e-5)
    assert r["targets"][0] == r["targets"][1] == 18  # 21 real tokens, 3 documents: no target crosses one
    assert r["grads_finite"]  # padding rows attend to themselves: no empty softmax, no NaN
    if r["case"]["mtp"]:
        packed_mtp, alone_mtp = r["mtp"]
        assert packed_mtp == pytest.approx([sum(d) for d in zip(*alone_mtp, strict=True)], rel=1e-5)


@pytest.mark.parametrize("case", _ids())
def test_padding_counts_in_neither_the_balance_loss_nor_the_load(results, case):
    r = results[case]
    packed_load, alone_load = r["load"]
    assert packed_load == alone_load  # the routed load (and so DeepSeek-V3's bias update) of the real tokens
    k = 2 if case.startswith("qwen3") else 3
    assert all(sum(layer) == r["real_tokens"] * k for layer in packed_load)
    packed_aux, alone_aux = r["aux"]
    if case.startswith("deepseek"):  # the sequence-wise loss: per document, averaged, as each alone in a row
        assert packed_aux == pytest.approx(sum(alone_aux) / len(alone_aux), rel=1e-5)


def test_switch_loss_equals_transformers_over_the_real_tokens(results, paths):
    from .packed_worker import switch_reference

    want = switch_reference(paths["qwen3_moe"])  # transformers' load_balancing_loss_func, each document alone
    for layout in LAYOUTS:
        assert results[f"qwen3_moe-tp{layout['tp']}-ep{layout['ep']}"]["aux"][0] == pytest.approx(want, rel=1e-5)


def test_document_mask_is_block_diagonal_causal():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = document_mask(docs, "bool", torch.float32)[0, 0]
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, want)
    additive = document_mask(docs, "additive", torch.bfloat16)[0, 0]
    assert torch.equal(additive == 0, want) and additive.dtype == torch.bfloat16
    assert torch.equal(document_mask(docs, "inverted", torch.float32)[0, 0], want.float())


def test_token_layout_numbers_documents_over_the_batch():
    layout = TokenLayout.from_documents(torch.tensor([[0, 0, 1, -1], [0, 0, 0, 0]]), ((2, 1), (4,)))
    assert layout.segment.tolist() == [0, 0, 1, 3, 2, 2, 2, 2]
    assert layout.keep.tolist() == [1, 1, 1, 0, 1, 1, 1, 1] and layout.kept == 7 and layout.sizes == (2, 1, 4)


def test_npu_fused_attention_runs_packed_rows_in_the_tnd_layout(checkpoints):
    """On an NPU (the stand-in with torch_npu's documented semantics) a packed batch runs npu_fusion_attention's
    TND layout, one call per layer, no [L, L] mask, MLA's Dk > Dv unpadded; logits and gradients equal SDPA's."""
    import copy

    import npu_parallel
    from npu_parallel.parallel import kernels
    from npu_parallel.parallel.probe import probe_results, reset_probes
    from npu_parallel.parallel.state import single_rank_state
    from npu_parallel.training.losses import batch_loss
    from npu_parallel.training.packing import make_batch

    from .npu_reference import ReferenceKernels
    from .packed_worker import documents

    class Layouts(ReferenceKernels):
        def __init__(self):
            super().__init__()
            self.layouts: list[str] = []

        def npu_fusion_attention(self, query, key, value, head_num, input_layout, *args, **kwargs):
            self.layouts.append(input_layout)
            return super().npu_fusion_attention(query, key, value, head_num, input_layout, *args, **kwargs)

    state = single_rank_state()  # no process group left behind for the other tests of this process
    model = npu_parallel.load_pretrained(checkpoints / "deepseek_v2", state, dtype=torch.float32, progress=False)
    model.train()
    fused = copy.deepcopy(model)
    batch = make_batch(documents(model.config.vocab_size), pad_id=0)
    want = batch_loss(model, batch, vocab_parallel=False)
    want.ce_sum.backward()
    stand_in = Layouts()
    reset_probes()
    try:
        with kernels.use_kernels(stand_in):
            got = batch_loss(fused, batch, vocab_parallel=False)
            got.ce_sum.backward()
        verdicts = probe_results()
    finally:
        reset_probes()
    layers = model.config.num_hidden_layers
    assert stand_in.layouts.count("TND") == layers + 1, stand_in.layouts  # every layer, and the probe's own call
    assert verdicts.get("npu_fusion_attention TND (Layouts)") == "ok", verdicts
    assert got.ce_sum.item() == pytest.approx(want.ce_sum.item(), rel=1e-5)
    grads = dict(fused.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
