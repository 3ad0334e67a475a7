"""Layout invariance (issue 21 pt 5-6): the same global batches give the same step losses and grad norms at
dp1/ga4, dp2/ga2 and tp2/dp2/ga1 as one process, full fine-tuning and LoRA; FSDP2 reduces on the last
micro-batch only."""

import pytest

from .dist import run_ranks

TOL = dict(rel=1e-5, abs=1e-6)  # fp32


@pytest.fixture(scope="module")
def runs(checkpoints):
    path = str(checkpoints / "deepseek_v2")
    one = run_ranks(
        1,
        "tests.layout_worker:run_layouts",
        path,
        [
            dict(tp=1, ga=1, lora=False),  # the one-process reference: the global batch in one micro-batch
            dict(tp=1, ga=1, lora=True),
            dict(tp=1, ga=4, lora=False),
            dict(tp=1, ga=4, lora=True),
            dict(tp=1, ga=4, lora=False, aux=True),
        ],
    )
    two = run_ranks(
        2,
        "tests.layout_worker:run_layouts",
        path,
        [dict(tp=1, ga=2, lora=False), dict(tp=1, ga=2, lora=True), dict(tp=1, ga=2, lora=False, aux=True)],
    )
    four = run_ranks(
        4, "tests.layout_worker:run_layouts", path, [dict(tp=2, ga=1, lora=False), dict(tp=2, ga=1, lora=True)]
    )
    return one, two, four


def _by_layout(runs) -> dict:
    return {tuple(c["layout"].values()): c for r in runs for c in r["cases"]}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_step_losses_and_grad_norms_do_not_depend_on_the_layout(runs, lora):
    cases = _by_layout(runs)
    ref = cases[(1, 1, 1, lora, False)]
    assert len(ref["losses"]) == 2 and ref["losses"][0] != ref["losses"][1]
    for layout in [(1, 1, 4, lora, False), (1, 2, 2, lora, False), (2, 2, 1, lora, False)]:
        got = cases[layout]
        assert got["losses"] == pytest.approx(ref["losses"], **TOL), layout
        assert got["norms"] == pytest.approx(ref["norms"], **TOL), layout


def test_the_loss_is_the_global_token_mean_not_a_mean_of_micro_batch_means(runs):
    one = runs[0]
    ref = one["reference"]  # the unconverted model on step 1's global batch
    cases = _by_layout(runs)
    assert cases[(1, 1, 1, False, False)]["losses"][0] == pytest.approx(ref["loss"], **TOL)
    assert cases[(1, 1, 4, False, False)]["losses"][0] == pytest.approx(ref["loss"], **TOL)
    # the rows hold 14, 2, 9 and 1 supervised targets: averaging ga4's micro-batch means would be far off
    assert abs(ref["per_micro_batch_mean"] - ref["loss"]) > 1e-2


def test_the_load_balancing_loss_is_the_mean_over_micro_batches(runs):
    cases = _by_layout(runs)
    ga4, dp2 = cases[(1, 1, 4, False, True)], cases[(1, 2, 2, False, True)]
    assert all(a is not None and a > 0 for a in ga4["aux"])
    # the same micro-batches (one row each) over one rank or two: the same aux term and the same total loss
    assert dp2["aux"] == pytest.approx(ga4["aux"], **TOL)
    assert dp2["losses"] == pytest.approx(ga4["losses"], **TOL)
    assert dp2["norms"] == pytest.approx(ga4["norms"], **TOL)


def test_fsdp2_reduces_gradients_on_the_last_micro_batch_only(runs):
    cases = _by_layout(runs)
    for lora in (False, True):
        per_step = cases[(1, 2, 2, lora, False)]["reduce_scatters"]
        for first, last in per_step:
            assert first == 0 and last > 0, per_step
