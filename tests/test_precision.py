"""Mixed precision and data parallelism: FSDP2 over dp with fp32 master weights (npu_parallel.data_parallel)."""

import json
import logging

import pytest
import torch
from safetensors import safe_open

from .dist import run_ranks


@pytest.fixture(scope="module")
def world4(checkpoints, tmp_path_factory):
    """One launch of 4 ranks: data-parallel gradients at tp 2 x dp 2 and tp 1 x dp 4, then a checked bf16 run."""
    save_dir = tmp_path_factory.mktemp("bf16_run") / "ckpt"
    result = run_ranks(4, "tests.precision_worker:dp_world4", str(checkpoints / "deepseek_v2"), str(save_dir))
    return result, save_dir


def test_data_parallel_gradient_is_the_mean_loss_gradient_of_the_global_batch(world4):
    """Each dp rank on its quarter/half of the batch: every gradient equals the unconverted model's gradient of the
    mean loss over the whole batch (averaged once, not summed, not twice), also with the experts in units of
    their own (the hook for an expert mesh)."""
    grads = world4[0]["grads"]
    assert [(g["tp"], g["dp"]) for g in grads] == [(2, 2), (1, 4), (2, 2)]
    for g in grads:
        assert g["compared"] == g["params"] and g["dtensor"]
        assert g["max_diff"] <= 1e-6, g  # the largest gradient is ~0.2: a dp-times error would be ~0.1
        assert g["norm"] == pytest.approx(g["ref_norm"], rel=1e-5)  # the global norm clipping uses, over tp and dp
    assert [g["expert_units"] for g in grads] == [0, 0, 2] and grads[2]["expert_modules"] == 2


def test_every_collective_of_a_training_run_is_on_the_device_in_a_device_dtype(world4):
    """A tp 2 x dp 2 bf16 run with accumulation, a checkpoint and a resume, every torch.distributed collective
    wrapped: no float64 (HCCL has none), nothing off the model's device; the checker catches a float64 one."""
    run = world4[0]["run"]
    assert run["caught"] == ["distributed.all_reduce: torch.float64 on cpu"]
    assert run["findings"] == []
    calls = run["calls"]
    assert calls["distributed.reduce_scatter_single"] > 0 and calls["distributed.all_gather_single"] > 0  # FSDP2
    assert calls["distributed.all_reduce"] > 0


def test_bf16_run_keeps_fp32_master_weights_and_resumes_exactly(world4):
    run, save_dir = world4[0]["run"], world4[1]
    assert run["resumed"] == run["full"][2:]  # bit for bit, from the fp32 master weights and fp32 moments
    assert run["load_into_sharded"] == 0.0  # load_sharded(model=...) into a data_parallel model: its own rows
    manifest = json.loads((save_dir / "step-2" / "manifest.json").read_text())
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"F32"}
    assert manifest["training"]["extra"]["precision"] == {
        "mode": "bf16",
        "compute": "bfloat16",
        "master": "float32",
        "reduce": "float32",
    }


def test_merge_writes_the_runs_compute_dtype_or_the_one_asked(world4, tmp_path):
    from transformers import AutoModelForCausalLM

    from npu_parallel.tools import cli

    step = world4[1] / "step-2"
    assert cli.main(["merge", str(step), "--out", str(tmp_path / "bf16"), "-q"]) == 0
    assert cli.main(["merge", str(step), "--out", str(tmp_path / "fp32"), "-q", "--dtype", "fp32"]) == 0

    def dtypes(folder):
        with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}

    bf16, fp32 = dtypes(tmp_path / "bf16"), dtypes(tmp_path / "fp32")
    assert set(fp32.values()) == {"F32"}
    # transformers keeps DeepSeek-V2's router in fp32 (_keep_in_fp32_modules_strict); everything else is bf16
    assert {k for k, d in bf16.items() if d != "BF16"} == {k for k in bf16 if k.endswith("mlp.gate.weight")} != set()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    master = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, master.model.embed_tokens.weight.bfloat16())


def test_bf16_mixed_precision_learns_like_fp32_and_pure_bf16_does_not(checkpoints):
    """The issue's measurement at tp 2, lr 1e-5: with fp32 master weights the loss falls >= 0.9x as far as in
    fp32 (measured 0.99x); pure bf16 rounds most updates away (measured 0.63x)."""
    drops = run_ranks(
        2, "tests.precision_worker:learn", str(checkpoints / "deepseek_v2"), 20, ["fp32", "bf16", "bf16-pure"]
    )
    fp32, mixed, pure = (drops[k]["drop"] for k in ("fp32", "bf16", "bf16-pure"))
    assert fp32 > 0.03
    assert mixed >= 0.9 * fp32, drops
    assert pure < 0.8 * fp32, drops


def test_precision_names_and_the_pure_bf16_warning(caplog):
    from npu_parallel.parallel import data_parallel as dp
    from npu_parallel.parallel.state import single_rank_state

    assert dp.resolve_precision("auto", "cpu").name == "fp32"
    mixed = dp.resolve_precision("bf16", "cpu")
    assert (mixed.compute, mixed.master, mixed.reduce) == (torch.bfloat16, torch.float32, torch.float32)
    assert dp.resolve_precision("bfloat16", "cpu") == mixed and dp.resolve_precision("bf16-pure", "cpu").master == (
        torch.bfloat16
    )
    with pytest.raises(ValueError, match="must be one of auto, fp32, bf16, bf16-pure"):
        dp.resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="call it first"):
        dp.data_parallel(torch.nn.Linear(2, 2), single_rank_state())
    dp._warned.clear()
    with caplog.at_level(logging.WARNING):
        import npu_parallel

        state = npu_parallel.init_distributed()
        for _ in range(2):
            dp.data_parallel(torch.nn.Sequential(torch.nn.Linear(2, 2)), state, precision="bf16-pure")
    warned = [r for r in caplog.records if "bf16-pure" in r.getMessage()]
    assert len(warned) == 1 and "rounded away" in warned[0].getMessage()


def test_bf16_verify_passes_and_catches_a_perturbed_expert(checkpoints, capsys):
    """verify --dtype bfloat16 at the evidence-based tolerances: the honest tp 2 model passes (its bf16 rounding
    flips a near-tie token's experts, which 99 % agreement used to fail), one perturbed expert fails."""
    from npu_parallel.tools import cli

    path = str(checkpoints / "deepseek_v2")
    assert cli.main(["verify", path, "--tp", "2", "--dtype", "bfloat16", "--backward"]) == 0, capsys.readouterr().out
    rc = cli.main(["verify", path, "--tp", "2", "--dtype", "bfloat16", "--_perturb-expert", "1:2"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED: tp=2 layer 2 moe_out" in out, out
