"""Hosts: one object per host library and device, resolved once per backend; suites call these.

Every backend branch of the harness lives in the host files (``torch_host.py``, ``mlx_host.py``):
loading a model, making caches (compressed or the library's own), running forward passes,
greedy generation, forking a prefilled cache, bytes held, arrays to and from NumPy, clocks.

    host = hosts.get("torch-cpu")        # or "torch-cuda", "mlx"
    m = host.load(None)                  # Model: .model, .tokenizer (HF), .native, .geometry
    cache = host.new_cache(m, config)    # config None: the library's own uncompressed cache
    logits = host.forward(m, ids, cache) # (T, vocab) of the fed ids
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("torch-cpu", "torch-cuda", "mlx")


@dataclass
class Model:
    """A loaded model: the host library's model, the HF tokenizer, what the library's own calls
    take as tokenizer (``native``: mlx-lm's ``TokenizerWrapper``), and its KV geometry."""

    model: object
    tokenizer: object
    native: object
    geometry: object
    source: str | None = None


_HOSTS: dict = {}


def get(backend: str):
    """The host of ``backend`` (one object per backend and process)."""
    if backend not in _HOSTS:
        if backend in ("torch-cpu", "torch-cuda"):
            from .torch_host import TorchHost

            _HOSTS[backend] = TorchHost("cuda" if backend == "torch-cuda" else "cpu")
        elif backend == "mlx":
            from .mlx_host import MLXHost

            _HOSTS[backend] = MLXHost()
        else:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return _HOSTS[backend]


def to_numpy(x):
    """Any host's array (or numpy) as numpy: floats as float64, integers as they are."""
    import numpy as np

    mod = type(x).__module__
    if mod.startswith("torch"):
        return get("torch-cpu").to_numpy(x)
    if mod.startswith("mlx"):
        return get("mlx").to_numpy(x)
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x


def loaded() -> list:
    """The hosts made so far in this process."""
    return list(_HOSTS.values())


def pin_worker_to_gpu(worker_id: str | None) -> str | None:
    """Give a pytest-xdist worker (``gw<N>``) one GPU of the machine, round-robin, by setting
    ``CUDA_VISIBLE_DEVICES`` before CUDA starts in that process; returns the GPU it got, or None
    (not a worker, one GPU or none, or ``TQ_GPU_PIN=0``). GPUs are counted with ``nvidia-smi -L``,
    so nothing initializes CUDA here; an existing ``CUDA_VISIBLE_DEVICES`` list is shared out."""
    import os
    import shutil
    import subprocess

    if not worker_id or not worker_id.startswith("gw") or os.environ.get("TQ_GPU_PIN") == "0":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    elif shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]
    else:
        return None
    if len(gpus) < 2:
        return None
    gpu = gpus[int(worker_id[2:]) % len(gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
