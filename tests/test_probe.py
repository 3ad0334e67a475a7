"""The capability probe: one run per process and name, a cached verdict, one warning naming the kernel."""

from __future__ import annotations

import warnings

import pytest

from npu_parallel.parallel import probe as probe_mod
from npu_parallel.parallel.probe import probe, probe_results


@pytest.fixture(autouse=True)
def _fresh():
    probe_mod.reset_probes()
    yield
    probe_mod.reset_probes()


def test_runs_once_and_caches():
    calls = []
    assert probe("k_ok", lambda: calls.append(1), device_type="cpu")
    assert probe("k_ok", lambda: calls.append(1), device_type="cpu")
    assert calls == [1]
    assert probe_results() == {"k_ok": "ok"}


def test_failure_warns_once_with_kernel_reason_and_version():
    def broken():
        raise RuntimeError("group_type currently only support -1 and 0\nmore detail")

    with pytest.warns(RuntimeWarning, match=r"k_bad failed its capability probe on cpu with torch_npu .*group_type"):
        assert not probe("k_bad", broken, device_type="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not probe("k_bad", broken, device_type="cpu")  # cached: no second warning, no second run
    assert probe_results() == {"k_bad": "failed: RuntimeError: group_type currently only support -1 and 0"}
