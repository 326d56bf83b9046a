"""Device facts the kernels size their grids by, read once per device."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)  # one entry per CUDA device index
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device, cpu: int) -> int:
    """Multiprocessors of a CUDA ``device``; ``cpu`` for the interpreter on CPU."""
    if device.type != "cuda":
        return cpu
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
