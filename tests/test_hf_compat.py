"""The supported transformers range and the calls whose spelling changed across it (npu_parallel.hf_compat)."""

from __future__ import annotations

import pytest
import torch

from npu_parallel import hf_compat
from npu_parallel.hf_compat import dtype_kwargs, unsupported_transformers

from .test_cli_input import run_cli


@pytest.mark.parametrize("version", ["4.51.0", "4.51.3", "4.57.6", "5.0.0rc1", "5.24.0"])
def test_supported_releases(version):
    assert unsupported_transformers(version) is None


@pytest.mark.parametrize("version", ["4.46.3", "4.50.3", "6.0.0"])
def test_releases_outside_the_range_name_the_fix(version):
    why = unsupported_transformers(version)
    assert why and version in why and "pip install 'transformers>=4.51,<6'" in why


def test_dtype_keyword_follows_the_release(monkeypatch):
    monkeypatch.setattr(hf_compat, "TRANSFORMERS", (4, 51))
    assert dtype_kwargs(torch.bfloat16) == {"torch_dtype": torch.bfloat16}
    monkeypatch.setattr(hf_compat, "TRANSFORMERS", (5, 24))
    assert dtype_kwargs(torch.bfloat16) == {"dtype": torch.bfloat16}


def test_cli_refuses_a_release_outside_the_range(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(hf_compat, "unsupported_transformers", lambda: unsupported_transformers("4.46.3"))
    code, _, err = run_cli(capsys, ["inspect", str(tmp_path)])
    assert code == 2
    assert err.strip().splitlines() == [
        "npu-parallel inspect: error: transformers 4.46.3 is outside the supported range (transformers>=4.51,<6): "
        "pip install 'transformers>=4.51,<6'"
    ]
