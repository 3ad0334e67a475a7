"""A model that exists only as its checkpoint's own code: save_sharded -> load_sharded -> merge -> from_pretrained.

The code is our own (tests/remote_fixture.py, model_type ``deepseek``, which transformers has no class for):
the sharded checkpoint keeps the ``auto_map`` files (checksummed in the manifest), load_sharded runs them only
with ``trust_remote_code=True``, and the merged folder loads with ``from_pretrained(..., trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch

from npu_parallel.checkpoint.load import load_pretrained, load_sharded
from npu_parallel.checkpoint.offline import convert_checkpoint, merge_checkpoint
from npu_parallel.checkpoint.remote_code import ENV, RemoteCodeError
from npu_parallel.checkpoint.safetensors_io import CheckpointError
from npu_parallel.checkpoint.save import save_sharded
from npu_parallel.hf_compat import dtype_kwargs
from npu_parallel.parallel.state import single_rank_state

from . import remote_fixture
from .dist import run_ranks

IDS = torch.arange(24).view(2, 12) % remote_fixture.CONFIG["vocab_size"]


@pytest.fixture(autouse=True)
def no_env_opt_in(monkeypatch):
    monkeypatch.setenv(ENV, "0")


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **dtype_kwargs(torch.float32)).eval()


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_remote_code_round_trip(tmp_path):
    src = remote_fixture.build(tmp_path / "src")
    reference = _reference(src)
    expected = _logits(reference)
    state = single_rank_state()

    with pytest.raises(RemoteCodeError, match="--trust_remote_code"):
        load_pretrained(src, state)
    model = load_pretrained(src, state, dtype=torch.float32, progress=False, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)

    ckpt = save_sharded(model, tmp_path / "sharded", state)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["remote_code"]["files"] == sorted(remote_fixture.FILES)  # moe_blocks.py: imported, not named
    assert manifest["remote_code"]["auto_map"] == remote_fixture.CONFIG["auto_map"]
    for name in remote_fixture.FILES:
        assert (ckpt / name).read_bytes() == (src / name).read_bytes()
        assert name in manifest["files"]
    shutil.rmtree(src)  # from here on the code comes from the checkpoint itself

    with pytest.raises(RemoteCodeError, match="--trust_remote_code") as refused:
        load_sharded(ckpt, state)
    assert len(str(refused.value).splitlines()) == 1
    loaded = load_sharded(ckpt, state, trust_remote_code=True)
    _same_weights(loaded, model)
    assert torch.allclose(_logits(loaded), _logits(model), rtol=0, atol=1e-5)  # equal under 5.x; see TEST_GUIDE §7

    merged = merge_checkpoint(ckpt, tmp_path / "merged", progress=False)
    for name in remote_fixture.FILES:
        assert (merged / name).is_file()
    assert json.loads((merged / "config.json").read_text())["auto_map"] == remote_fixture.CONFIG["auto_map"]
    again = _reference(merged)
    _same_weights(again, reference)
    assert torch.allclose(_logits(again), expected, rtol=0, atol=1e-5)

    # a merge over the earlier one: the code files are ours, so --overwrite may replace them
    merge_checkpoint(ckpt, tmp_path / "merged", progress=False, overwrite=True)


def test_convert_keeps_the_code_and_a_tampered_file_is_refused(tmp_path, monkeypatch):
    src = remote_fixture.build(tmp_path / "src")
    reference = _reference(src)
    monkeypatch.setenv(ENV, "1")  # what `npu-parallel convert --trust_remote_code` sets
    out = convert_checkpoint(src, 2, tmp_path / "tp2", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["remote_code"]["files"] == sorted(remote_fixture.FILES)
    merged = merge_checkpoint(out, tmp_path / "merged", progress=False)
    _same_weights(_reference(merged), reference)

    with open(out / "moe_blocks.py", "a") as f:
        f.write("\n# changed\n")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_sharded(out, single_rank_state(), trust_remote_code=True)


def test_trained_remote_code_model_saved_and_resumed_at_tp2(tmp_path):
    """tp 2: a trained step saved with its optimizer, refused without the flag, restored bit-exact with it,
    and merged into a folder from_pretrained(trust_remote_code=True) loads with the trained weights."""
    src = remote_fixture.build(tmp_path / "src")
    out = tmp_path / "step-1"
    got = run_ranks(2, "tests.remote_fixture:sharded_round_trip", str(src), str(out), 2)
    assert got["refused"] and "--trust_remote_code" in got["refused"] and "deepseek" in got["refused"]
    assert got["differ"] == [] and got["same_logits"] and got["extra"] == {"step": 1, "data_position": 32}
    # --resume reads the saved config by the same rule (before any rank loads anything)
    from npu_parallel.training.config import ConfigError, TrainConfig, _resumed

    state = types.SimpleNamespace(world_size=2, tp_size=2, ep_size=2, pp_size=1)
    with pytest.raises(ConfigError, match=r"^--resume .*--trust_remote_code"):
        _resumed(TrainConfig(resume=str(out)), str(out), state)  # type: ignore[arg-type]
    config, step, position = _resumed(TrainConfig(resume=str(out), trust_remote_code=True), str(out), state)  # type: ignore[arg-type]
    assert type(config).__module__.startswith("transformers_modules") and (step, position) == (1, 32)
    merged = _reference(merge_checkpoint(out, tmp_path / "merged", progress=False))
    assert type(merged).__module__.startswith("transformers_modules")
    with torch.no_grad():  # trained: the weights moved away from the source checkpoint's
        assert not torch.equal(merged.model.embed_tokens.weight, _reference(src).model.embed_tokens.weight)
