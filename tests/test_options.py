"""ConversionOptions (issue 26, "a frozen options object carries the conversion choices end to end"): the object
converts exactly as the keywords do (parameters bit for bit, the same loss), a keyword contradicting a field raises,
it is frozen and checked when made, load_sharded honours capacity_factor, and the trainer builds one from its flags.
In process, at tp 1 without a process group (single_rank_state)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import npu_parallel
from npu_parallel import ConversionOptions, GateOptions
from npu_parallel.convert.conversion import conversion_info
from npu_parallel.moe.dispatchers.static import StaticDispatcher
from npu_parallel.moe.load import moe_blocks
from npu_parallel.parallel.state import single_rank_state

from .common import seeded_ids
from .models import load_reference

NAME = "qwen3_moe"  # softmax router with a Switch-style aux loss: aux_loss_coef and the gate options both act
CHOICES = dict(moe_impl="static", capacity_factor=1.0, aux_loss_coef=0.05, gate_options=GateOptions(z_loss_coef=1e-3))


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    model.train()
    return model(input_ids=ids, labels=ids).loss


def _same_parameters(a, b) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        assert torch.equal(p, pb[name]), name


def test_options_convert_as_the_keywords_do(checkpoints):
    """convert_model and load_pretrained: options == keywords, parameters bit for bit and the training loss."""
    state, path = single_rank_state(), checkpoints / NAME
    by_keywords = npu_parallel.convert_model(load_reference(NAME, path), state, **CHOICES)
    by_options = npu_parallel.convert_model(load_reference(NAME, path), state, options=ConversionOptions(**CHOICES))
    loaded = npu_parallel.load_pretrained(path, state, progress=False, options=ConversionOptions(**CHOICES))
    ids = seeded_ids(by_keywords.config.vocab_size, 2, 16, 1)
    want = _loss(by_keywords, ids)
    for model in (by_options, loaded):
        _same_parameters(by_keywords, model)
        assert torch.equal(_loss(model, ids), want)
        assert conversion_info(model).options == ConversionOptions(**CHOICES)
        assert all(isinstance(b.dispatcher, StaticDispatcher) for _, b in moe_blocks(model))
    plain = npu_parallel.convert_model(load_reference(NAME, path), state)
    assert not torch.equal(_loss(plain, ids), want)  # the choices act (aux coefficient, z-loss, capacity)


def test_load_sharded_honours_capacity_factor(checkpoints, tmp_path):
    """load_sharded takes capacity_factor (it lacked it): the static dispatcher drops what the factor says."""
    state = single_rank_state()
    model = npu_parallel.load_pretrained(checkpoints / NAME, state, progress=False)
    npu_parallel.save_sharded(model, tmp_path / "sh", state)
    ids = seeded_ids(model.config.vocab_size, 2, 16, 2)
    dropped = {}
    for factor in (None, 0.25):
        loaded = npu_parallel.load_sharded(tmp_path / "sh", state, moe_impl="static", capacity_factor=factor)
        blocks = [b for _, b in moe_blocks(loaded)]
        assert all(b.dispatcher.capacity_factor == factor for b in blocks)
        with torch.no_grad():
            loaded(input_ids=ids)
        dropped[factor] = sum(int(b.dispatcher.stats["dropped"]) for b in blocks)
    assert dropped[None] == 0 and dropped[0.25] > 0
    same = npu_parallel.load_sharded(tmp_path / "sh", state, options=ConversionOptions("static", capacity_factor=0.25))
    assert [b.dispatcher.capacity_factor for _, b in moe_blocks(same)] == [0.25] * len(blocks)


def test_keywords_fold_into_options(checkpoints):
    """A keyword fills a field the options leave at its default; one contradicting a set field is a ValueError."""
    state, path = single_rank_state(), checkpoints / NAME
    model = npu_parallel.convert_model(
        load_reference(NAME, path), state, capacity_factor=1.0, options=ConversionOptions(moe_impl="static")
    )
    assert conversion_info(model).options == ConversionOptions("static", capacity_factor=1.0)
    with pytest.raises(ValueError, match=r"moe_impl='grouped' contradicts options.moe_impl='static'.*once"):
        npu_parallel.convert_model(
            load_reference(NAME, path), state, moe_impl="grouped", options=ConversionOptions("static")
        )
    with pytest.raises(ValueError, match=r"aux_loss_coef=0.0 contradicts options.aux_loss_coef=0.1"):
        npu_parallel.load_pretrained(path, state, aux_loss_coef=0.0, options=ConversionOptions(aux_loss_coef=0.1))
    with pytest.raises(ValueError, match=r"options=\{.*must be a npu_parallel.ConversionOptions"):
        npu_parallel.load_pretrained(path, state, options={"moe_impl": "static"})  # type: ignore[arg-type]
    # into an existing model: its own choices stand, others are refused
    with pytest.raises(ValueError, match=r"load_sharded\(model=\.\.\.\).*leave out"):
        npu_parallel.load_sharded(path, state, model=model, aux_loss_coef=0.5)


def test_options_are_frozen_and_checked():
    opts = ConversionOptions("static", capacity_factor=1.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.moe_impl = "grouped"  # type: ignore[misc]
    assert dataclasses.replace(opts, capacity_factor=2.0).capacity_factor == 2.0
    assert opts == ConversionOptions("static", capacity_factor=1.25) and hash(opts) == hash(
        ConversionOptions("static", capacity_factor=1.25)
    )
    bad = [
        (dict(moe_impl="fast"), r"moe_impl='fast' is not an implementation; use one of \['auto', "),
        (dict(moe_impl=3), r"moe_impl=3: must be one of \['auto', .* or a Dispatcher"),
        (dict(capacity_factor=1.25), r"capacity_factor=1.25 needs moe_impl='static'"),  # "auto" never drops
        (dict(moe_impl="grouped", capacity_factor=1.25), r"capacity_factor=1.25 needs moe_impl='static'"),
        (dict(moe_impl="static", capacity_factor=-1.0), r"capacity_factor=-1.0 needs .* a value > 0"),
        (dict(moe_impl="static", min_capacity=4), r"min_capacity=4: .*pass capacity_factor"),
        (dict(moe_impl=StaticDispatcher(), capacity_factor=1.0), r"Dispatcher already; give \['capacity_factor'\]"),
        (dict(aux_loss_coef=-0.1), r"aux_loss_coef=-0.1: the load-balancing coefficient must be a number >= 0"),
        (dict(gate_options={"noise": "jitter"}), r"gate_options=.*must be a npu_parallel.GateOptions"),
        (dict(gate_options=GateOptions(noise="loud")), r"router noise 'loud': unknown; choose one of"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            ConversionOptions(**kwargs)  # type: ignore[arg-type]
    ConversionOptions("npu")  # a name alone is checked against the registry only: torch_npu is the device's matter


def test_trainer_builds_one_options_object():
    """The training flags become one ConversionOptions (what load_run_model passes on)."""
    from npu_parallel.training.config import TrainConfig
    from npu_parallel.training.moe_options import conversion_options

    cfg = TrainConfig(
        model_path="m", moe_impl="static", capacity_factor=1.5, min_capacity=2, aux_loss_coef=0.0,
        router_z_loss=1e-3, seed=7,
    )  # fmt: skip
    assert conversion_options(cfg) == ConversionOptions(
        "static", capacity_factor=1.5, min_capacity=2, aux_loss_coef=0.0, gate_options=GateOptions(None, 1e-2, 1e-3, 7)
    )
    assert conversion_options(TrainConfig(model_path="m")) == ConversionOptions()
