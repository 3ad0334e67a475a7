"""Sampled generate() at tp 1, ep 2 (tokens travel by all-to-all): a different prompt and seed on each rank, each
rank's tokens the unconverted model's on its prompt under rank 0's seed, and no rank left waiting at an EOS."""

from __future__ import annotations

import pytest

from .dist import run_ranks

NAMES = ["deepseek_v3", "qwen3_moe"]


@pytest.fixture(scope="module")
def generated(checkpoints):
    return run_ranks(2, "tests.generate_worker:compare_ep", str(checkpoints), NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_sampled_generate_at_ep2_equals_the_unconverted_model_per_rank(generated, name):
    r = generated[name]
    assert r["sampled"][0] == r["ref"][0] and r["sampled"][1] == r["ref"][1]
