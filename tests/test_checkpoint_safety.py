"""Loading a checkpoint never runs code: no pickle in the training state, every file checksummed, v1 pickles refused."""

from __future__ import annotations

import ast
import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import npu_parallel
from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.manifest import MANIFEST, legacy_train_file, train_file
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.save import load_training_state, save_sharded
from npu_parallel.checkpoint.sharded_source import ShardedSource
from npu_parallel.checkpoint.train_state import decode, encode, read_state, write_state
from npu_parallel.training.loop import TrainConfig, train

PACKAGE = Path(npu_parallel.__file__).resolve().parent


class Payload:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(marker: Path) -> bytes:
    data = pickle.dumps({"optimizer": Payload(marker)})
    pickle.loads(data)  # the payload is live: unpickling it does run the command
    assert marker.exists()
    marker.unlink()
    return data


@pytest.fixture
def trained(checkpoints, tmp_path):
    """A world-1 training checkpoint of the tiny DeepSeek-V2 (weights, AdamW, scheduler, RNG) and what made it."""
    state = npu_parallel.init_distributed()
    model = load_pretrained(checkpoints / "deepseek_v2", state, progress=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ids = torch.arange(12).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    out = tmp_path / "step-1"
    save_sharded(model, out, state, optimizer=opt, scheduler=sched, extra={"step": 1, "data_position": 1})
    return state, model, opt, sched, out


def _as_v1(folder: Path, payload: bytes) -> None:
    """Rewrite a training checkpoint the way npu_parallel 0.1.0 wrote it: pickled train-rank-*.pt, not listed."""
    m = json.loads((folder / MANIFEST).read_text())
    for name in [n for n in m["files"] if n.startswith("train-")]:
        (folder / name).unlink()
        del m["files"][name]
    m["format_version"] = 1
    m["training"].pop("state_format")
    del m["source_path"]
    (folder / MANIFEST).write_text(json.dumps(m))
    (folder / legacy_train_file(0, 1)).write_bytes(payload)


def test_resume_from_a_pickled_v1_checkpoint_is_refused_and_runs_nothing(checkpoints, trained, tmp_path):
    """The issue's reproduction through the real --resume path (train()): refused in one line, nothing runs."""
    *_, folder = trained
    marker = tmp_path / "pwned"
    _as_v1(folder, _malicious(marker))
    data = tmp_path / "data.txt"
    data.write_text("some text to train on\n\n" * 20)
    cfg = TrainConfig(
        model_path=str(checkpoints / "deepseek_v2"),
        resume=str(folder),
        data=str(data),
        steps=3,
        max_length=16,
        jit_warmup_steps=0,
        precision="fp32",
    )
    with pytest.raises(CheckpointError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message and "train-rank-00000-of-00001.pt" in message
    assert "never loaded, because unpickling can run code" in message and "load its weights" in message
    assert not marker.exists()
    model = load_sharded(folder, npu_parallel.init_distributed())  # its weights still load
    assert model.config.model_type == "deepseek_v2"
    assert not marker.exists()


def test_tampered_training_state_is_refused_and_runs_nothing(trained, tmp_path):
    state, _, opt, sched, folder = trained
    name = train_file(0, 1)
    marker = tmp_path / "pwned"
    (folder / name).write_bytes(_malicious(marker))
    with pytest.raises(CheckpointError, match=rf"{name}: checksum mismatch .* the file is corrupted, restore it"):
        load_training_state(folder, state, optimizer=opt, scheduler=sched)
    # the attacker rewrites the manifest's checksum too: still only data is ever parsed
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][name]["sha256"] = __import__("hashlib").sha256((folder / name).read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=rf"{name}: not a readable training-state file"):
        load_training_state(folder, state, optimizer=opt, scheduler=sched)
    del m["files"][name]  # or drops it from the manifest
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=rf"{name}: has no checksum in manifest.json"):
        load_training_state(folder, state, optimizer=opt, scheduler=sched)
    assert not marker.exists()


def test_training_state_restores_optimizer_scheduler_and_rng(trained):
    state, model, opt, sched, folder = trained
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    expected = torch.rand(4)  # the draw right after the save
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0 / (1 + s))
    assert load_training_state(folder, state, optimizer=fresh, scheduler=fresh_sched) == {
        "step": 1,
        "data_position": 1,
    }
    assert torch.equal(torch.rand(4), expected)
    got = fresh.state_dict()
    assert got["param_groups"] == saved_opt["param_groups"] and got["state"].keys() == saved_opt["state"].keys()
    for k, v in saved_opt["state"].items():
        assert all(torch.equal(v[f], got["state"][k][f]) for f in v)
    assert fresh_sched.state_dict() == saved_sched


def test_weights_only_checkpoint_cannot_resume(trained, tmp_path):
    state, model, opt, _, _ = trained
    save_sharded(model, tmp_path / "weights", state)
    with pytest.raises(CheckpointError, match="saved without optimizer state"):
        load_training_state(tmp_path / "weights", state, optimizer=opt)


def test_train_state_round_trip_keeps_every_type(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3, dtype=torch.bfloat16)}},
        "groups": [{"betas": (0.9, 0.95), "params": [0, 1], "fused": None, "__tensor__": "not a marker"}],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "floats": [math.inf, 1e-300, 0.1],
        "flags": (True, False, "x"),
    }
    write_state(tmp_path / "s.safetensors", state)
    back = read_state(tmp_path / "s.safetensors")
    assert back["state"][0]["step"].item() == 3.0 and torch.equal(
        back["state"][0]["exp_avg"], state["state"][0]["exp_avg"]
    )
    assert back["groups"] == state["groups"] and back["python"] == state["python"]
    assert back["floats"] == state["floats"] and back["flags"] == state["flags"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][2:] == state["numpy"][2:]
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])


def test_decode_builds_data_only():
    with pytest.raises(CheckpointError, match=r"state\.f\[0\] is a builtins\.builtin_function_or_method"):
        encode({"f": [print]}, {})
    for tree in ({"__tensor__": "t9"}, {"__dict__": [[1]]}, {"__tuple__": 3}, {"__ndarray__": [1]}):
        with pytest.raises(CheckpointError):
            decode(tree, {})


def _unsafe_loads(tree: ast.AST) -> list[int]:
    """Lines that deserialize with pickle: torch.load without weights_only=True, pickle/numpy loads allowing it."""
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if func.endswith("torch.load") and kw.get("weights_only") != "True":
            bad.append(node.lineno)
        elif func in ("pickle.load", "pickle.loads", "pickle.Unpickler", "torch.serialization.load"):
            bad.append(node.lineno)
        elif func.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle") not in (None, "False"):
            bad.append(node.lineno)
    return bad


# npu_parallel.tools.launch passes test and tool arguments and results between its own processes through a
# private temporary folder it creates: never a user's file
ALLOWED = {"tools/launch.py"}


def test_the_package_never_unpickles_user_files():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _unsafe_loads(ast.parse(path.read_text(), str(path)))
        rel = path.relative_to(PACKAGE).as_posix()
        if lines and rel not in ALLOWED:
            found[rel] = lines
    assert not found, f"pickle deserialization (torch.load without weights_only=True, pickle.load...): {found}"
    assert "weights_only=False" not in "".join(p.read_text() for p in PACKAGE.rglob("*.py"))


def test_the_unpickling_check_sees_every_form():
    src = (
        "import torch, pickle\nimport numpy as np\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "torch.load(p, map_location='cpu', weights_only=True)\n"
        "pickle.loads(b)\n"
        "np.load(p, allow_pickle=True)\n"
        "np.load(p)\n"
    )
    assert _unsafe_loads(ast.parse(src)) == [3, 4, 6, 7]


def test_damaged_manifest_is_one_error(trained):
    *_, folder = trained
    m = json.loads((folder / MANIFEST).read_text())
    m["tp_size"] = "2"
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="damaged"):
        ShardedSource(folder)
    (folder / MANIFEST).write_text("[]")
    with pytest.raises(CheckpointError, match="not a checkpoint manifest"):
        ShardedSource(folder)
