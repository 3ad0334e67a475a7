"""Pipeline parallelism in the training loop: pp 2 (world 2) trains as pp 1 (world 1) on the same global batches
(losses, aux and MTP losses, grad norms clipped over every stage, expert load, the V3 bias update, LoRA), saves
what pp 1 saves (rank files and merged folder byte for byte), resumes at the other pp, and refuses what it cannot
run with one line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npu_parallel.checkpoint.offline import merge_checkpoint

from .cli_runs import LITE, run_cases
from .dist import run_ranks
from .models import VARIANTS
from .published import build_published
from .sft_data_helpers import chat, write_jsonl
from .tokenizers_fixture import add_tokenizer

BASE = dict(batch_size=2, max_length=32, steps=3, lr=1e-3, warmup_steps=1, jit_warmup_steps=1, seed=5, grad_clip=1.0)
PP2 = dict(pp_size=2, grad_accum=2)


def _jobs(paths: dict[str, str], root: Path, pp: int) -> dict[str, dict]:
    """The same runs at pp 1 or pp 2: name -> TrainConfig kwargs (grad_accum 2: the 1F1B micro-batches)."""
    layout = dict(PP2) if pp == 2 else dict(grad_accum=2)
    jobs = {
        # Switch loss across stages; saves step-2 and step-3. No clipping: the merged bytes are compared, and a
        # norm summed over stages in another order may differ in its last bit (the others clip, their norms compared)
        "qwen3_moe": dict(
            BASE, model_path=paths["qwen3_moe"], aux_loss_coef=0.05, save_dir=str(root / f"q{pp}"), save_every=2
        )
        | {"grad_clip": 0.0},
        "deepseek_v2": dict(BASE, model_path=paths["deepseek_v2"], aux_loss_coef=0.05, steps=2),
        "lora": dict(BASE, model_path=paths["qwen3_moe"], lora_r=4, steps=2, save_dir=str(root / f"l{pp}")),
    }
    # bf16 compute with fp32 master weights: the stages send bf16 hidden states, FSDP2 casts per stage
    jobs["bf16"] = dict(BASE, model_path=paths["deepseek_v2"], precision="bf16", steps=2)
    if "chat" in paths:  # packed chat data: pp pads every micro-batch to max_length, pp 1 to its longest row
        jobs["chat"] = dict(
            BASE, model_path=paths["chat"], data=paths["chat_data"], max_length=48, steps=2, aux_loss_coef=0.05
        )
    if "deepseek_v3_mtp" in paths:  # MLA + MoE + MTP on the last stage, the routing bias moved after each step
        jobs["deepseek_v3_mtp"] = dict(
            BASE, model_path=paths["deepseek_v3_mtp"], mtp_loss_weight=0.3, aux_loss_coef=0.0, bias_update_rate=0.01
        )
    return {k: {**v, **layout} for k, v in jobs.items()}


@pytest.fixture(scope="module")
def runs(checkpoints, chat_tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_train")
    paths = {n: str(checkpoints / n) for n in ("qwen3_moe", "deepseek_v2") if n in VARIANTS}
    if "deepseek_v2" in VARIANTS:
        shutil.copytree(checkpoints / "deepseek_v2", root / "chat")
        add_tokenizer(root / "chat", "deepseek", chat_tokenizers["deepseek"])
        paths["chat"] = str(root / "chat")
        paths["chat_data"] = str(write_jsonl(root / "chat.jsonl", [chat(i) for i in range(16)]))
    if "deepseek_v3" in VARIANTS:
        paths["deepseek_v3_mtp"] = str(build_published(root / "v3")["plain"])
    one, two = _jobs(paths, root, 1), _jobs(paths, root, 2)
    q1, q2 = Path(one["qwen3_moe"]["save_dir"]), Path(two["qwen3_moe"]["save_dir"])
    # pp 2 x dp 2 (world 4, FSDP2 over dp inside each stage) against pp 1: micro-batches of one row each (pp 1:
    # grad_accum 4; pp 2 dp 2: 2 per dp rank), so the aux loss sees the same rows per micro-batch in both
    dp2 = dict(BASE, model_path=paths["deepseek_v2"], aux_loss_coef=0.05, steps=2, batch_size=1, grad_accum=4)
    one["pp2_dp2"] = dp2
    pp1 = dict(zip(one, run_ranks(1, "tests.pipeline_train_worker:run", list(one.values())), strict=True))
    pp2_dp2 = run_ranks(4, "tests.pipeline_train_worker:run", [dict(dp2, tp_size=1, pp_size=2, grad_accum=2)])[0]
    resume_at_2 = {k: v for k, v in two["qwen3_moe"].items() if k not in ("save_dir", "save_every")}
    bad = dict(BASE, model_path=paths["deepseek_v2"], **PP2)
    extra = {
        "resume pp1 -> pp2": dict(resume_at_2, resume=str(q1 / "step-2")),
        "more stages than layers": dict(bad, pp_schedule="interleaved_1f1b", pp_virtual=2, grad_accum=4),
        "pp_layers sum": dict(bad, pp_layers="1,1"),
        # lr 1e9: the first update leaves NaN weights; every later step is skipped on both stages alike
        "non-finite": dict(bad, lr=1e9, steps=6, max_nonfinite_steps=2, save_dir=str(root / "nan")),
    }
    jobs2 = {**two, **extra}
    pp2 = dict(zip(jobs2, run_ranks(2, "tests.pipeline_train_worker:run", list(jobs2.values())), strict=True))
    resume_at_1 = {k: v for k, v in one["qwen3_moe"].items() if k not in ("save_dir", "save_every")}
    pp2["resume pp2 -> pp1"] = run_ranks(
        1, "tests.pipeline_train_worker:run", [dict(resume_at_1, resume=str(q2 / "step-2"))]
    )[0]
    return {"pp1": pp1, "pp2": pp2, "pp2_dp2": pp2_dp2, "root": root, "q1": q1, "q2": q2}


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2", "deepseek_v3_mtp", "lora", "chat", "bf16"])
def test_pp2_trains_as_pp1(runs, name):
    if name not in runs["pp1"]:
        pytest.skip(f"{name}: this transformers has no such model class")
    a, b = runs["pp1"][name], runs["pp2"][name]
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    # with MTP the embedding's two gradient parts (first stage, MTP on the last) are summed in another order,
    # which AdamW's first updates of tiny gradients magnify to ~1e-5
    tol = {"deepseek_v3_mtp": 1e-4, "bf16": 2e-2}.get(name, 1e-5)  # bf16: another rounding per stage boundary
    assert b["losses"][0] == pytest.approx(a["losses"][0], rel=1e-6 if name != "bf16" else tol)
    assert b["losses"] == pytest.approx(a["losses"], rel=tol), (a["losses"], b["losses"])
    assert b["norms"] == pytest.approx(a["norms"], rel=tol), (a["norms"], b["norms"])  # clipped over both stages
    for key in ("aux", "mtp"):
        assert [x is None for x in b[key]] == [x is None for x in a[key]], key
        assert [x or 0 for x in b[key]] == pytest.approx([x or 0 for x in a[key]], rel=tol, abs=1e-6), key
    # every decoder layer's expert load, summed over the stages; train_step counts an MTP layer's load one
    # micro-batch late (at the next forward), the last stage at once: the same slot totals from step 2 on
    assert [[r for r in s if r["layer"] < 3] for s in b["load"]] == [
        [r for r in s if r["layer"] < 3] for s in a["load"]
    ]
    assert [[r["mean"] for r in s if r["layer"] >= 3] for s in b["load"][1:]] == [
        [r["mean"] for r in s if r["layer"] >= 3] for s in a["load"][1:]
    ]
    if name not in ("lora", "chat"):
        assert a["losses"][-1] < a["losses"][0]
    if name in ("qwen3_moe", "deepseek_v2", "chat"):
        assert all(x > 0.01 for x in a["aux"])
    if name == "deepseek_v3_mtp":
        assert all(x > 0 for x in a["mtp"])


def test_pp2_dp2_trains_as_pp1(runs):
    """FSDP2 over dp inside each stage: the same losses, aux losses and grad norms (clipped over the stages and the
    dp shards) as the unsplit model on the same global batch (pytorch #164756, torchtitan #1558: PP with FSDP)."""
    a, b = runs["pp1"]["pp2_dp2"], runs["pp2_dp2"]
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5), (a["losses"], b["losses"])
    assert b["norms"] == pytest.approx(a["norms"], rel=1e-5), (a["norms"], b["norms"])
    assert b["aux"] == pytest.approx(a["aux"], rel=1e-5), (a["aux"], b["aux"])
    assert a["losses"][-1] < a["losses"][0] and all(x > 0.01 for x in a["aux"])


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def test_checkpoint_is_layout_free(runs, tmp_path):
    """pp 2's step folder holds pp 1's rank files byte for byte (the manifest records pp), and merges to the same
    Hugging Face folder; a LoRA run's adapters likewise."""
    for step in ("step-2", "step-3"):
        one, two = runs["q1"] / step, runs["q2"] / step
        assert _files(two, "rank-*.safetensors") == _files(one, "rank-*.safetensors"), step
    manifest = json.loads((runs["q2"] / "step-3" / "manifest.json").read_text())
    assert manifest["training"]["pp_size"] == 2 and manifest["training"]["world_size"] == 2
    assert len(list((runs["q2"] / "step-3").glob("train-rank-*"))) == 2  # each rank's optimizer state
    merged = [merge_checkpoint(runs[q] / "step-3", tmp_path / q, progress=False) for q in ("q1", "q2")]
    assert _files(merged[1], "*.safetensors") == _files(merged[0], "*.safetensors")
    assert (merged[1] / "config.json").read_bytes() == (merged[0] / "config.json").read_bytes()
    lora = [Path(runs[p]["lora"]["checkpoint"]) for p in ("pp1", "pp2")]  # the adapters of both stages
    one, two = (load_file(str(p / "rank-00000-of-00001.safetensors")) for p in lora)
    assert sorted(two) == sorted(one) and all("lora" in k for k in one)
    assert all(torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-7) for k in one)
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one if "lora_B" in k)  # they trained


def test_resume_at_another_pp(runs):
    """A pp 1 checkpoint resumed at pp 2, and a pp 2 one at pp 1 (optimizer state put together by name), continue
    with the uninterrupted run's step-3 loss."""
    full = runs["pp1"]["qwen3_moe"]
    for case in ("resume pp1 -> pp2", "resume pp2 -> pp1"):
        got = runs["pp2"][case]
        assert "error" not in got, got.get("error")
        assert got["losses"] == pytest.approx(full["losses"][2:], abs=1e-5), case
        assert got["norms"] == pytest.approx(full["norms"][2:], rel=1e-5), case


def test_nonfinite_steps_are_skipped_on_every_stage(runs):
    error = runs["pp2"]["non-finite"]["error"]
    assert "steps 2-3: loss or gradient norm not finite 2 times in a row" in error, error
    assert not (runs["root"] / "nan").exists() or not list((runs["root"] / "nan").glob("step-*"))


def test_bad_splits_are_one_line(runs):
    assert (
        "4 pipeline stages (pp_size x virtual stages) for 3 decoder layers"
        in runs["pp2"]["more stages than layers"]["error"]
    )
    assert "--pp_layers '1,1' sums to 2" in runs["pp2"]["pp_layers sum"]["error"]


BAD = {
    "pp_size 3 at world 1": (
        ["--pp_size", "3", "--pp_schedule", "gpipe"],
        "pp_size=3 must be a positive divisor of the world size 1",
    ),
    "grad_accum below 1f1b": (["--pp_size", "2"], "--grad_accum 1: the 1f1b schedule at pp 2 needs at least 2"),
    "unknown schedule": (["--pp_size", "2", "--pp_schedule", "zigzag"], "--pp_schedule 'zigzag' is not a schedule"),
    "pp_layers at pp 1": (["--pp_layers", "1,2"], "--pp_layers '1,2' needs --pp_size 2 or more"),
    "eval under pp": (
        ["--pp_size", "2", "--grad_accum", "2", "--eval_data", "eval.jsonl"],
        "--eval_data with --pp_size 2: eval during training does not run through pipeline stages yet",
    ),
    "z-loss under pp": (
        ["--pp_size", "2", "--grad_accum", "2", "--router_z_loss", "0.001"],
        "--router_z_loss 0.001 with --pp_size 2",
    ),
}


def test_bad_layouts_exit_2_with_one_line(checkpoints, tmp_path):
    model = checkpoints / "deepseek_v2"
    base = ["--model_path", str(model), "--steps", "2", "--max_length", "32", "--jit_warmup_steps", "0"]
    cases = [{"script": LITE, "argv": [*base, *argv]} for argv, _ in BAD.values()]
    results = run_cases(cases, tmp_path, timeout=300)
    for (name, (_, message)), got in zip(BAD.items(), results, strict=True):
        assert got["code"] == 2, (name, got["stderr"][-2000:])
        errors = [line for line in got["stderr"].splitlines() if ": error: " in line]
        assert len(errors) == 1 and message in errors[0], (name, got["stderr"][-2000:])
