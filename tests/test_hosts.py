"""harness.hosts: one host per backend, and xdist workers spread over the GPUs of a machine."""

from __future__ import annotations

import pytest

from harness import hosts


@pytest.mark.parametrize("visible, worker, expect", [
    ("0,1", "gw0", "0"), ("0,1", "gw1", "1"), ("0,1", "gw2", "0"), ("0,1", "gw7", "1"),
    ("3,5,7", "gw4", "5"),  # an existing list is shared out, round-robin
    ("0", "gw3", None),  # one GPU: nothing to spread
    ("0,1", None, None), ("0,1", "master", None),  # not a worker
])
def test_workers_are_pinned_round_robin(monkeypatch, visible, worker, expect):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("TQ_GPU_PIN", raising=False)
    assert hosts.pin_worker_to_gpu(worker) == expect
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == (expect if expect is not None else visible)


def test_pinning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("TQ_GPU_PIN", "0")
    assert hosts.pin_worker_to_gpu("gw1") is None


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(ValueError, match="backend must be one of torch-cpu, torch-cuda, mlx, llama-cpp, got 'tpu'"):
        hosts.get("tpu")


def test_one_host_per_backend():
    assert hosts.get("torch-cpu") is hosts.get("torch-cpu")


def test_sliding_codes_is_refused_where_there_are_no_sliding_layers():
    """``sw=codes`` on a model without sliding-window layers is the default cache under another label:
    refused (the harness skips it with the reason) rather than measured twice."""
    from tq_core import CacheConfig

    codes = CacheConfig(sliding="codes")
    with pytest.raises(hosts.Unsupported, match="no sliding-window layers.*same cache as K4V2\\+s4w128"):
        hosts.check_sliding(codes, 0, "smollm2-135m")
    hosts.check_sliding(codes, 15, "gemma-3-270m")
    hosts.check_sliding(CacheConfig(), 0, "smollm2-135m")
    hosts.check_sliding(None, 0, "smollm2-135m")
