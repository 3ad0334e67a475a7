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
