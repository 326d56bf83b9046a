"""Hosts: one object per host library and device, resolved once per backend; suites call these.

Every backend branch of the harness lives in the host files (``torch_host.py``, ``mlx_host.py``,
``llamacpp_host.py``):
loading a model, making caches (compressed or the library's own), running forward passes,
greedy generation, forking a prefilled cache, bytes held, arrays to and from NumPy, clocks.

    host = hosts.get("torch-cpu")        # or "torch-cuda", "mlx", "llama-cpp"
    m = host.load(None)                  # Model: .model, .tokenizer (HF), .native, .geometry
    cache = host.new_cache(m, config)    # config None: the library's own uncompressed cache
    logits = host.forward(m, ids, cache) # (T, vocab) of the fed ids
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("torch-cpu", "torch-cuda", "mlx", "llama-cpp")
# backend -> the host library it runs (a host object's ``lib``; ``tq_core.methods.Method.hosts``)
LIBS = {"torch-cpu": "torch", "torch-cuda": "torch", "mlx": "mlx", "llama-cpp": "llama.cpp"}


class Unsupported(NotImplementedError):
    """An operation this host cannot do (llama.cpp keeps its K/V inside its context); the message
    names the host. The harness skips a test that needs one, with that message (``conftest.py``)."""


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
        elif backend == "llama-cpp":
            from .llamacpp_host import LlamaCppHost

            _HOSTS[backend] = LlamaCppHost()
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


def peer_method(config, simulate: bool = False):
    """The method of ``config`` when it is a peer (its host library builds the cache:
    ``Method.make_cache``), else None. A peer has no simulated mode (it has no codec of tq_core's)."""
    from tq_core import methods

    method = methods.get(config.method)
    if not method.peer:
        return None
    if simulate:
        raise ValueError(f"{config.label}: simulated mode quantizes with tq_core's codecs; a peer cache has none")
    return method


def check_shape_only(config) -> None:
    """Refuse a shape-only cache (no model behind it) for a peer, whose library builds its cache for a
    model: ``Unsupported`` (the harness skips with the reason)."""
    if config is not None and peer_method(config) is not None:
        from tq_core.methods import Unsupported

        raise Unsupported(f"{config.label}: a peer cache is built for a model by its library; a shape-only "
                          "cache has no model to build it for")


def check_sliding(config, sliding_layers: int, model_name: str) -> None:
    """Refuse ``sw=codes`` for a model without sliding-window layers, where it is the same cache as
    the config without it: ``Unsupported`` (the harness skips with the reason, so the run does not
    measure one cache twice under two labels)."""
    if config is not None and config.sliding == "codes" and not sliding_layers:
        raise Unsupported(f"{config.label}: {model_name} has no sliding-window layers, so sw=codes is the same cache "
                          f"as {config.replace(sliding='keep').label}")


# Leaf names (attribute or dict key) that hold a quantizer's scales or zero points, wherever they sit:
# optimum-quanto's QTensor ``_scale``/``_shift``, HQQ's meta ``scale``/``zero``, mlx's ``scales``/``biases``.
LEAF_PARTS = {"_scale": "scales", "scale": "scales", "scales": "scales",
              "_shift": "zeros", "zero": "zeros", "biases": "zeros"}


def _walk(obj, name: str = ""):
    """(leaf name, array) for every torch tensor or mlx array reachable from ``obj``: plain arrays,
    lists/tuples (leaves keep the container's name), dicts (leaves take their key), and torch tensor
    subclasses through ``__tensor_flatten__`` (their inner tensors, e.g. a QTensor's ``_data``,
    ``_scale``, ``_shift``; the wrapper itself holds no storage). Anything else is not held data."""
    import sys

    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, str(k))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, name)
    elif "torch" in sys.modules and isinstance(obj, sys.modules["torch"].Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None:
            for inner in flatten()[0]:
                yield from _walk(getattr(obj, inner), inner)
        else:
            yield name, obj
    elif "mlx.core" in sys.modules and isinstance(obj, sys.modules["mlx.core"].array):
        yield name, obj


def _storage(x) -> tuple[tuple, int]:
    """(identity of the memory ``x`` lives in, its bytes): a torch tensor's whole storage (a view
    counts what it keeps alive, once), an mlx array itself."""
    if type(x).__module__.startswith("mlx"):
        return ("mlx", id(x)), int(x.nbytes)
    st = x.untyped_storage()
    key = (str(x.device), st.data_ptr()) if st.data_ptr() else ("empty", id(x))
    return key, int(st.nbytes())


def tensor_bytes(groups: dict, seen: set | None = None) -> dict[str, int]:
    """Bytes held by the arrays reachable from each of ``groups`` ({part: object}), each storage
    counted once across the groups and across calls that share ``seen``. A leaf named like a scale
    or zero point (``LEAF_PARTS``) counts under "scales" / "zeros" instead of its group, so a
    quantized tensor given as "codes" splits into codes, scales and zeros. Returns {part: bytes} for
    every group given and every part found."""
    seen = set() if seen is None else seen
    out = dict.fromkeys(groups, 0)
    for group, obj in groups.items():
        for leaf, x in _walk(obj, group):
            key, n = _storage(x)
            if key in seen:
                continue
            seen.add(key)
            part = LEAF_PARTS.get(leaf, group)
            out[part] = out.get(part, 0) + n
    return out


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
