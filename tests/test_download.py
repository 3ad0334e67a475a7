"""download_deepseek_moe.py against a local Hub stand-in (tests/hub_server.py): no network.

A tiny DeepSeek-V3 saved in index-sharded form is served as ``deepseek-ai/tiny-moe``; the script is run as a user
runs it, with ``HF_ENDPOINT`` naming the local server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .hub_server import HubRepo, HubServer
from .models import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "download_deepseek_moe.py"
REPO = "deepseek-ai/tiny-moe"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The tiny checkpoint as published: config, index, three shards, a README."""
    config_cls, model_cls, extra = VARIANTS["deepseek_v3"]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("published")
    model_cls(config_cls(**extra)).save_pretrained(folder, max_shard_size="400KB")
    (folder / "README.md").write_text("# tiny\n")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and (folder / "model.safetensors.index.json").is_file(), shards
    return folder


@pytest.fixture
def hub(published):
    server = HubServer(HubRepo.from_folder(REPO, published, tags=("v1.0",)))
    yield server
    server.close()


def run(hub: HubServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),  # no cache, token or settings of the machine's user
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "30",
        "HF_HUB_OFFLINE": "0",
        "PYTHONPATH": str(ROOT),
    }
    argv = [sys.executable, str(SCRIPT), "--repo_id", REPO, "--local_dir", str(tmp_path / "model"), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_downloads_checks_and_inspects(hub, published, tmp_path):
    r = run(hub, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = tmp_path / "model"
    for name in ("config.json", "model.safetensors.index.json", "README.md", *shards(published)):
        assert (got / name).read_bytes() == (published / name).read_bytes(), name
    assert f"{len(shards(published))} safetensors file(s)" in r.stdout and "headers and sizes check out" in r.stdout
    assert "deepseek_v3" in r.stdout and "tp" in r.stdout  # npu-parallel inspect's report
    assert all(hub.gets[s] == 1 for s in shards(published)), hub.gets


def test_a_second_run_fetches_only_what_is_missing(hub, published, tmp_path):
    assert run(hub, tmp_path, "--no_inspect").returncode == 0
    lost = shards(published)[1]
    (tmp_path / "model" / lost).unlink()
    hub.gets.clear()
    r = run(hub, tmp_path, "--no_inspect")
    assert r.returncode == 0, r.stderr[-3000:]
    assert dict(hub.gets) == {lost: 1}, hub.gets  # the finished shards were not fetched again


def test_include_patterns_and_a_tag(hub, published, tmp_path):
    r = run(hub, tmp_path, "--revision", "v1.0", "--include", "*.json", "--no_inspect")
    assert r.returncode == 1, r.stdout + r.stderr  # the index names shards that the patterns left out
    json_files = sorted(p.name for p in published.glob("*.json"))
    assert sorted(p.name for p in (tmp_path / "model").glob("*.json")) == json_files
    assert not shards(tmp_path / "model") and not (tmp_path / "model" / "README.md").exists()
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"{len(shards(published))} of {len(shards(published))} shards" in err[0], err
    r = run(hub, tmp_path, "--revision", "v1.0", "--include", "*.json", "*.safetensors", "--no_inspect")
    assert r.returncode == 0, r.stderr[-3000:]  # the same folder completed: widen --include, run again


def test_a_broken_shard_is_named(published, tmp_path):
    files = HubRepo.from_folder(REPO, published).files
    name = shards(published)[0]
    files[name] = files[name][: len(files[name]) // 2]  # published truncated: sizes agree, the header does not
    server = HubServer(HubRepo(REPO, files))
    try:
        r = run(server, tmp_path, "--no_inspect")
    finally:
        server.close()
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and name in err[0] and "run again" in err[0], err


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--revision", "nope"], "--revision nope: no such branch"),
        (["--repo_id", "deepseek-ai/nope"], "--repo_id deepseek-ai/nope: not found"),
        (["--max_workers", "0"], "--max_workers 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(hub, tmp_path, args, fragment):
    r = run(hub, tmp_path, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_local_dir_that_is_a_file(hub, tmp_path):
    (tmp_path / "model").write_text("")
    r = run(hub, tmp_path)
    assert r.returncode == 2 and "--local_dir" in r.stderr and "is a file" in r.stderr, r.stderr
