"""Parallel layers and collectives against plain torch, values and gradients, on 2 and 4 CPU ranks."""

import pytest

from .dist import run_ranks

TOL = 1e-5


@pytest.fixture(scope="module", params=[(2, 250), (4, 250)], ids=["tp2", "tp4-vocab-padded"])
def layers(request):
    tp, vocab = request.param
    return tp, vocab, run_ranks(tp, "tests.layers_worker:check_layers", tp, vocab)


def test_column_row_pair_matches_linear(layers):
    _, _, r = layers
    for key in ("mlp_out", "mlp_dx", "mlp_dw1", "mlp_db1", "mlp_dw2", "mlp_db2"):
        assert r[key] <= TOL, (key, r[key])


def test_vocab_parallel_embedding_and_gathered_head(layers):
    tp, vocab, r = layers
    assert r["logits_shape"] == (3, 7, vocab)  # user's vocab, never the padded one
    assert r["logits"] <= TOL and r["emb_grad"] <= TOL and r["head_grad"] <= TOL
    assert r["padded_rows"] == (-vocab) % tp


def test_vocab_parallel_cross_entropy_equals_gathered(layers):
    _, _, r = layers
    assert r["vp_ce"] <= TOL and r["vp_ce_dh"] <= TOL


def test_scatter_gather_are_conjugate(layers):
    assert layers[2]["scatter_gather_grad"] == 0.0


@pytest.mark.parametrize("k,m", [(4, 6), (16, 32), (128, 64)], ids=["unaligned-loop", "aligned", "aligned-big"])
def test_grouped_mm_matches_per_group_matmul(k, m):
    """Forward and our own backward, native kernel or loop, with an empty group."""
    import torch

    from npu_parallel.moe.grouped_gemm import grouped_mm

    counts = [3, 0, 5, 2]
    x = torch.randn(10, k, requires_grad=True)
    w = torch.randn(4, m, k).transpose(1, 2).requires_grad_()  # the experts' [E, out, in] layout, transposed
    y = grouped_mm(x, w, counts)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.cat([x2[0:3] @ w2[0], x2[3:8] @ w2[2], x2[8:10] @ w2[3]])
    (ref * g).sum().backward()
    assert torch.allclose(y, ref, atol=1e-5) and torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(w.grad, w2.grad, atol=1e-5) and w.grad[1].abs().max() == 0
