"""Runtime contracts: init_distributed, group layout, HCCL defaults, bad input raised before any collective."""

import copy
import json
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import npu_parallel
from npu_parallel.convert.plans.deepseek import PLAN as DEEPSEEK
from npu_parallel.parallel import device
from npu_parallel.parallel.state import Group, ParallelState, destroy_distributed, group_layout, init_distributed

from .dist import run_ranks
from .models import load_reference


def fake_state(tp_size: int, world_size: int | None = None) -> ParallelState:
    """A state with no process group: conversion must reject bad sizes before touching one."""
    world_size = world_size or tp_size
    return ParallelState(
        torch.device("cpu"), "gloo", 0, world_size, tp=Group(0, tp_size), dp=Group(0, world_size // tp_size)
    )


def test_group_layout_tp_contiguous():
    tp, dp = group_layout(8, 4)
    assert tp == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dp == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_tp_must_divide_world_size():
    with pytest.raises(ValueError, match=r"tp_size=3 must be a positive divisor of the world size 1.*\[1\]"):
        init_distributed(3)


def test_single_process_state():
    state = init_distributed()
    assert (state.world_size, state.tp_size, state.dp_size, state.rank) == (1, 1, 1, 0)
    assert state.device.type == "cpu" and state.backend == "gloo"


def _worker_state(tp):
    s = init_distributed(tp, timeout_s=60)
    out = {"tp_ranks": s.tp_ranks, "dp_ranks": s.dp_ranks, "tp_rank": s.tp_rank, "dp_rank": s.dp_rank}
    groups = [weakref.ref(g.group) for g in (s.tp, s.dp)] + [weakref.ref(dist.group.WORLD)]
    del s
    destroy_distributed()
    out["groups_alive"] = sum(ref() is not None for ref in groups)
    return out


def test_torchrun_env_four_ranks_tp2():
    r = run_ranks(4, "tests.test_runtime:_worker_state", 2)
    # destroy_distributed drops every group (the watchdog's too): one still held at exit can abort the rank
    assert r == {"tp_ranks": (0, 1), "dp_ranks": (0, 2), "tp_rank": 0, "dp_rank": 0, "groups_alive": 0}


def test_hccl_defaults_never_override_user(monkeypatch):
    env = {"HCCL_CONNECT_TIMEOUT": "600"}
    applied = device.apply_hccl_defaults(env)
    assert env["HCCL_CONNECT_TIMEOUT"] == "600" and "HCCL_CONNECT_TIMEOUT" not in applied
    assert env["HCCL_EXEC_TIMEOUT"] == "7200" and applied["HCCL_EXEC_TIMEOUT"] == "7200"


def test_tp_must_divide_heads_and_experts(checkpoints):
    model = load_reference("deepseek_v2", checkpoints / "deepseek_v2")
    with pytest.raises(
        ValueError,
        match=r"tp_size=3 must divide the attention heads \(num_attention_heads\) = 8 .*work with world size 3: \[1\]",
    ):
        npu_parallel.convert_model(model, fake_state(3))
    config = copy.deepcopy(model.config)
    config.n_routed_experts = 6
    with pytest.raises(
        ValueError, match=r"tp_size=4 must divide the routed experts \(n_routed_experts\) = 6 .*: \[1, 2\]"
    ):
        DEEPSEEK.check_tp(config, 4, 4)


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(
        ValueError,
        match=r"no parallel plan for model_type='gpt2'.*supported: deepseek, deepseek_v2, deepseek_v3, llama, "
        r"mixtral, qwen2, qwen2_moe, qwen3_moe.*Adding a model family",
    ):
        npu_parallel.convert_model(model, fake_state(1))


def test_unknown_moe_impl(checkpoints):
    model = load_reference("deepseek_v2", checkpoints / "deepseek_v2")
    with pytest.raises(
        ValueError,
        match=r"moe_impl='fast' is not an implementation; use one of \['auto', 'grouped', 'static', 'masked', 'npu'",
    ):
        npu_parallel.convert_model(model, fake_state(1), moe_impl="fast")


def test_cli_env_reports_sizes_and_hccl():
    out = subprocess.run(
        [sys.executable, "-m", "npu_parallel.tools.cli", "env", "--json"], capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout)
    assert report["device"] == "cpu" and report["backend"] == "gloo"
    assert (report["world_size"], report["tp_size"], report["dp_size"]) == (1, 1, 1)
    assert "HCCL_CONNECT_TIMEOUT" in report["hccl_env"]
    text = subprocess.run(
        [sys.executable, "-m", "npu_parallel.tools.cli", "env"], capture_output=True, text=True, check=True
    ).stdout
    assert "world/tp/dp  1 / 1 / 1" in text and "HCCL_EXEC_TIMEOUT" in text


def test_cli_env_bad_tp_is_one_line_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "npu_parallel.tools.cli", "env", "--tp", "3"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "tp_size=3" in out.stderr and "Traceback" not in out.stderr


def test_converted_model_deepcopies_with_its_shards(checkpoints):
    """A deep copy (EMA, reference copies) shares the process group and keeps every parameter's shard spec."""
    from npu_parallel.parallel.shard_spec import spec_of

    model = npu_parallel.convert_model(load_reference("deepseek_v2", checkpoints / "deepseek_v2"), init_distributed())
    twin = copy.deepcopy(model)
    specs = [spec_of(p) for p in model.parameters()]
    assert [spec_of(p) for p in twin.parameters()] == specs and any(s is not None for s in specs)
    assert twin.model.layers[1].mlp.tp.group is model.model.layers[1].mlp.tp.group
    ids = torch.randint(0, 250, (1, 8))
    assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_npu_impl_needs_torch_npu(checkpoints):
    model = load_reference("deepseek_v2", checkpoints / "deepseek_v2")
    with pytest.raises(ValueError, match=r"moe_impl='npu' needs torch_npu \(pip install -e .\[npu\]"):
        npu_parallel.convert_model(model, fake_state(1), moe_impl="npu")
