"""Sampled and greedy generate() at tp 2 with a different seed on each rank: the same tokens on both ranks, and
the unconverted model's under rank 0's seed (the KV cache in use; MLA for DeepSeek-V3)."""

from __future__ import annotations

import pytest

from .dist import run_ranks

NAMES = ["deepseek_v3", "mixtral"]


@pytest.fixture(scope="module")
def generated(checkpoints):
    return run_ranks(2, "tests.generate_worker:compare", str(checkpoints), NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_at_tp2_equals_the_unconverted_model(generated, name):
    r = generated[name]
    assert r["greedy"][0] == r["greedy"][1] == r["ref_greedy"] == r["greedy_nocache"]


@pytest.mark.parametrize("name", NAMES)
def test_sampled_generate_agrees_across_ranks_and_with_rank0_seed(generated, name):
    r = generated[name]
    assert r["raw"][0] != r["raw"][1], "transformers' own generate should diverge across differently seeded ranks"
    assert r["sampled"][0] == r["sampled"][1] == r["ref_sampled"]
    assert r["rng_after_as_ref"]  # rank 0's RNG ends where the unconverted model's generate leaves it
    assert r["again"][0] == r["again"][1]
