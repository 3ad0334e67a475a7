"""Per-rank loading, sharded save/resume with resharding, crash safety."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.manifest import MANIFEST
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.save import save_sharded
from npu_parallel.convert.conversion import conversion_info

from .dist import run_ranks

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "llama", "qwen2")  # loadable by transformers' Auto classes


@pytest.fixture(scope="module")
def load_results(checkpoints, layouts):
    paths = [str(checkpoints / n) for n in ("deepseek_v2", "deepseek_v2_lite", "deepseek_v3", *FAMILIES)]
    paths += [str(p) for p in layouts.values()]
    return {tp: run_ranks(tp, "tests.checkpoint_worker:load_matches_convert", paths, tp) for tp in (1, 2, 4)}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(
    "name",
    ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3", "v2_sharded_index", "v2_fused_keys", "v2_tied", *FAMILIES],
)
def test_load_pretrained_is_bit_identical_to_convert(load_results, name, tp):
    r = load_results[tp][name]
    assert r["diff"] == [] and r["same_logits"]


@pytest.mark.parametrize("tp", [2, 4])
def test_other_ranks_experts_are_never_read(load_results, tp):
    for name in ("deepseek_v2", "deepseek_v3", "v2_sharded_index", "mixtral", "qwen2_moe"):
        ranks = load_results[tp][name]["ranks"]
        for r in ranks:
            lo, hi = r["own"]
            assert r["experts_read"] == list(range(lo, hi)), (name, r)
        full = load_results[1][name]["ranks"][0]["bytes"]
        assert max(r["bytes"] for r in ranks) < full * (0.7 if tp == 2 else 0.5)


def test_load_pretrained_bf16_matches_convert(checkpoints):
    r = run_ranks(2, "tests.checkpoint_worker:load_matches_convert", [str(checkpoints / "deepseek_v3")], 2, "bfloat16")
    assert r["deepseek_v3"]["diff"] == [] and r["deepseek_v3"]["dtype"] == "torch.bfloat16"


@pytest.fixture(scope="module")
def saved(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    src = str(checkpoints / "deepseek_v3")
    run_ranks(4, "tests.checkpoint_worker:save", src, str(root / "tp4"), 4, False)
    run_ranks(4, "tests.checkpoint_worker:save", src, str(root / "tp2dp2"), 2, False)  # world 4 = tp 2 x dp 2
    trained = run_ranks(2, "tests.checkpoint_worker:save", src, str(root / "train_tp2"), 2, True, True)
    return src, root, trained


def test_manifest_describes_every_tensor(saved):
    src, root, _ = saved
    m = json.loads((root / "tp4" / MANIFEST).read_text())
    assert m["format"] == "npu_parallel.sharded" and m["format_version"] == 2 and m["tp_size"] == 4
    assert m["source_path"] == str(Path(src).resolve())  # the folder load_pretrained read: merge takes its tokenizer
    assert m["architecture"] == "DeepseekV3ForCausalLM" and m["config"]["n_routed_experts"] == 8
    experts = m["tensors"]["model.layers.1.mlp.experts.gate_up_proj"]
    assert experts["shape"] == [8, 64, 64] and experts["split"] == {
        "dim": 0,
        "ranges": [[0, 2], [2, 4], [4, 6], [6, 8]],
    }
    emb = m["tensors"]["model.embed_tokens.weight"]
    assert emb["split"]["ranges"][-1] == [189, 250]  # vocab 250 over 4 ranks: padded internally, saved unpadded
    assert m["tensors"]["model.layers.0.self_attn.q_a_proj.weight"]["split"] is None
    assert sorted(m["files"]) == [f"rank-{r:05d}-of-00004.safetensors" for r in range(4)]
    for name, info in m["files"].items():
        assert hashlib.sha256((root / "tp4" / name).read_bytes()).hexdigest() == info["sha256"]
    dp = json.loads((root / "tp2dp2" / MANIFEST).read_text())
    assert sorted(dp["files"]) == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]


def test_every_file_of_a_training_checkpoint_is_checksummed(saved):
    """Weights and each rank's training state: safetensors files, all in the manifest with their sha256; no pickle."""
    _, root, _ = saved
    folder = root / "train_tp2"
    m = json.loads((folder / MANIFEST).read_text())
    on_disk = sorted(p.name for p in folder.iterdir())
    assert on_disk == sorted([*m["files"], MANIFEST])
    assert sorted(m["files"]) == [
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
        "train-rank-00000-of-00002.safetensors",
        "train-rank-00001-of-00002.safetensors",
    ]
    for name, info in m["files"].items():
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    assert m["training"]["state_format"] == "safetensors+json/1" and m["training"]["has_optimizer"]


@pytest.mark.parametrize(
    "saved_as,tp",
    [("tp4", 4), ("tp4", 2), ("tp2dp2", 4), ("tp2dp2", 2)],
    ids=["same-tp4", "reshard-4to2", "reshard-2to4", "same-tp2"],
)
def test_load_sharded_restores_and_reshards(saved, saved_as, tp):
    src, root, _ = saved
    r = run_ranks(tp, "tests.checkpoint_worker:load_and_compare", src, str(root / saved_as), tp)
    assert r["diff_built"] == [] and r["diff_into"] == []


def test_training_state_resumes_exactly(saved):
    src, root, trained = saved
    r = run_ranks(2, "tests.checkpoint_worker:resume", src, str(root / "train_tp2"), 2)
    assert r["extra"] == {"step": 1}
    assert r["losses"] == trained["losses_after_save"]


def _tree_digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", ["rank1_full", "rank0_full"])
def test_disk_full_on_one_rank_fails_every_rank_and_keeps_the_previous_checkpoint(saved, case):
    """A real short write (RLIMIT_FSIZE on one rank: EFBIG): the same one line on every rank, no hang, no
    .partial left, the checkpoint already in the folder untouched."""
    _, _, trained = saved
    r = trained["failures"][case]
    first, second = r["messages"]
    assert first == second and first is not None and "\n" not in first
    assert "disk full writing" in first and "File too large" in first and "--save_dir" in first
    assert f"rank-0000{case[4]}-of-00002.safetensors" in first
    assert r["unchanged"] and not r["partial_left"]


def test_unwritable_save_dir_fails_every_rank(saved):
    _, _, trained = saved
    r = trained["failures"]["unwritable"]
    first, second = r["messages"]
    assert first == second and first.startswith("/proc/npu-parallel-test/ckpt: cannot write")
    assert "choose another --save_dir" in first and "\n" not in first
    assert trained["failures"]["later"] == [
        "manifest.json",
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
        "train-rank-00000-of-00002.safetensors",
        "train-rank-00001-of-00002.safetensors",
    ]


def test_load_sharded_refuses_other_architecture(checkpoints, tmp_path):
    state = npu_parallel.init_distributed()
    v3 = load_pretrained(checkpoints / "deepseek_v3", state, progress=False)
    save_sharded(v3, tmp_path / "v3", state)
    v2 = load_pretrained(checkpoints / "deepseek_v2", state, progress=False)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint is DeepseekV3ForCausalLM \(deepseek_v3\), the model is DeepseekV2ForCausalLM",
    ):
        load_sharded(tmp_path / "v3", state, model=v2)


def test_save_refuses_foreign_directory(checkpoints, tmp_path):
    state = npu_parallel.init_distributed()
    model = load_pretrained(checkpoints / "deepseek_v2", state, progress=False)
    foreign = tmp_path / "hf"
    shutil.copytree(checkpoints / "deepseek_v2", foreign)
    before = _tree_digest(foreign)
    with pytest.raises(CheckpointError, match="was not written by npu-parallel; refusing to replace it"):
        save_sharded(model, foreign, state)
    assert _tree_digest(foreign) == before


def test_loaded_parameters_own_their_memory(checkpoints, tmp_path):
    """No parameter is a view of the checkpoint file: rewriting the file changes nothing, weights are contiguous."""
    state = npu_parallel.init_distributed()
    src = tmp_path / "v2"
    shutil.copytree(checkpoints / "deepseek_v2", src)
    model = load_pretrained(src, state, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.is_contiguous() for p in model.parameters())
    f = src / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(b"\0" * size)  # rewrite in place (a view of an mmap would now read zeros, or crash on truncation)
    f.write_bytes(b"")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert conversion_info(model).load_stats["bytes_read"] == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
