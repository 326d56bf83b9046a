"""How the speed suites read the clock, shared by ``suites/test_speed.py`` and ``suites/test_speed_attention.py``.

* pytest-benchmark times the compressed side (``benchmark.pedantic``, medians over rounds, every
  target ending with ``host.sync``); the baseline of the same measurement is timed by hand in the
  round's setup, interleaved, with the same synchronization (``HandTimer``). A ratio is a ratio of
  medians of one run.
* On a GPU the host's Python work per call can exceed the device time; ``host.gpu_time`` replays a
  CUDA graph of the call and times it with CUDA events (device time), recorded beside the
  end-to-end call time.
* The uncompressed baseline is preallocated the way a serving stack holds it (``StaticKV``), not a
  cache that grows by concatenation every step.
* torch CPU threads: ``TQ_SPEED_THREADS`` (default 1; 0 = torch's own default). On a shared 2-core
  box torch's default pool spends most of its time in barriers, so 1 is the reproducible choice.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import pytest


def threads_wanted() -> int:
    raw = os.environ.get("TQ_SPEED_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise pytest.UsageError(f"TQ_SPEED_THREADS must be a non-negative int, got {raw!r}") from None
    if n < 0:
        raise pytest.UsageError(f"TQ_SPEED_THREADS must be a non-negative int, got {raw!r}")
    return n


def conditions(host) -> dict:
    """Labels that describe how a measurement was taken."""
    n = host.thread_count()
    return {} if n is None else {"threads": n}


def speed_dtype(host):
    """Input dtype of the speed measurements: bf16 on a GPU (what models run in), fp16 on mlx, fp32 on
    torch's CPU (the default model's dtype there)."""
    return {"torch-cpu": host.float32, "torch-cuda": host.bfloat16}.get(host.backend, host.float16)


def dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def itemsize(dtype) -> int:
    return 2 if "16" in dtype_name(dtype) else 4


class HandTimer:
    """Seconds of the rounds timed by hand (the interleaved baseline), warm-up rounds dropped."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.all: list[float] = []

    @contextlib.contextmanager
    def round(self):
        t0 = time.perf_counter()
        yield
        self.all.append(time.perf_counter() - t0)

    @property
    def median(self) -> float | None:
        timed = self.all[self.warmup:]
        return statistics.median(timed) if timed else None

    @property
    def spread(self) -> tuple | None:
        timed = self.all[self.warmup:]
        return (min(timed), statistics.median(timed), max(timed)) if timed else None


def median(benchmark) -> float | None:
    """Median seconds per round of what pytest-benchmark timed; None when benchmarks are disabled."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.median)


def spread(benchmark) -> tuple | None:
    """(min, median, max) seconds per round of what pytest-benchmark timed, or None."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else (float(stats.stats.min), float(stats.stats.median), float(stats.stats.max))


def note_load(benchmark, record, host, gemm=None) -> None:
    """Record the conditions of a measurement: host load, and for mlx the GEMM rate (which BLAS)."""
    load = os.getloadavg()[0]
    benchmark.extra_info["host_load_1m"] = round(load, 2)
    benchmark.extra_info["cpu_count"] = os.cpu_count()
    record("host_load_1m", load, "procs")
    if gemm is not None:
        benchmark.extra_info["mlx_gemm_gflops"] = round(gemm, 1)
        record("mlx_gemm_gflops", gemm, "GFLOP/s")


class Gemm:
    """The host's GEMM rate, measured once per backend (for MLX: which BLAS it runs on)."""

    def __init__(self):
        self.rate: dict = {}

    def gflops(self, host) -> float | None:
        if host.backend not in self.rate:
            self.rate[host.backend] = host.gemm_gflops()
        return self.rate[host.backend]


class StaticKV:
    """The uncompressed baseline as a serving stack holds it: K/V preallocated for ``capacity`` tokens
    per layer, (B, H, capacity, D) in ``dtype``; a step writes one token in place and attends over
    what is held."""

    def __init__(self, host, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype):
        self.host, self.n = host, [0] * layers
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [host.empty(shape, dtype) for _ in range(layers)]
        self.v = [host.empty(shape, dtype) for _ in range(layers)]

    def fill(self, layer: int, k, v) -> None:
        n = k.shape[2]
        self.k[layer][:, :, :n] = k
        self.v[layer][:, :, :n] = v
        self.n[layer] = n

    def step(self, layer: int, q, k, v, scale: float):
        i = self.n[layer]
        self.k[layer][:, :, i:i + 1] = k
        self.v[layer][:, :, i:i + 1] = v
        self.n[layer] = i + 1
        return self.host.sdpa(q, self.k[layer][:, :, :i + 1], self.v[layer][:, :, :i + 1], scale)

    def attend(self, layer: int, q, scale: float, backend: str | None = None):
        """Attention over what is held now, nothing stored (a fixed context for repeated timing);
        ``backend``: one of ``host.sdpa_backends()`` (default: the host's choice for a growing cache)."""
        n = self.n[layer]
        kw = {} if backend is None else {"backend": backend}
        return self.host.sdpa(q, self.k[layer][:, :, :n], self.v[layer][:, :, :n], scale, **kw)

    @property
    def nbytes(self) -> int:
        return sum(self.host.nbytes(a) for a in self.k + self.v)
