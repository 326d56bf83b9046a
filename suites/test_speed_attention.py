"""Speed of attention over the compressed history vs bf16 attention over the same tokens, per layer.

Two attention geometries: the run's real model (``--tq-model``, else the default; its query heads,
KV heads and head_dim, label ``model=<id>``) and Llama-3-8B (``SHAPE``: 32 query heads, 8 KV heads,
head_dim 128), the default config K4/V2 + 4 sinks + 128-token window. For each (context, batch):

* compressed: a layer store holding ``context`` tokens (history as codes, reserved exactly), and
  one decode query attending over all of it through ``View.attend`` — the query rotated once,
  history scored from its codes by the device's fused kernel where there is one (Triton on CUDA,
  the C kernel on CPU), the full-precision sinks and window, one log-sum-exp merge, the output
  rotated back;
* baseline: the same tokens as K/V preallocated in the speed dtype (bf16 on a GPU, fp32 on torch's
  CPU), read by the backend's scaled-dot-product attention (torch picks its flash kernel on CUDA).

Recorded per case: ``attention_us`` (wall time of one call, synchronized: what a step costs without
graph capture) and on CUDA ``attention_gpu_us`` (device time of the same call replayed as a CUDA
graph), for ``cache=baseline`` and ``cache=<label>``; ``attention_speedup`` (baseline / compressed,
on device time where there is one); ``attention_gb_per_s_held`` (bytes each side holds / its
time); ``bytes_held`` of both; and the memory-bound limit ``attention_speedup_bound`` = baseline
bytes / compressed bytes (how much faster reading fewer bytes could make it).

``test_longest_context_in_budget``: the most tokens of the 8B geometry (32 layers) that fit a fixed
KV memory budget, compressed vs the 16-bit baseline, measured by allocating them.
``test_time_grows_with_context``: the measurements of this module must not contradict themselves.

No test fails because something is slow: speed is recorded, not gated (``suites/gates.py``).
"""

from __future__ import annotations

import pytest

from fixtures import configs as config_registry
from fixtures import models as registry
from harness import timing
from suites import gates

CONFIG = config_registry.DEFAULT  # named in docstrings; tests measure the run's first config (`headline`)
SHAPE = registry.SHAPES[0]  # llama3-8b-shape
# (contexts, batches) per (tier, device kind). A GPU runs the whole grid in every tier: each case
# takes well under a second there.
GRID = {
    ("default", "cpu"): ([1024, 4096], [1]),
    ("nightly", "cpu"): ([1024, 4096, 16384], [1, 4]),
    ("default", "cuda"): ([1024, 4096, 16384, 32768, 65536, 131072], [1, 4, 8, 16]),
    ("nightly", "cuda"): ([1024, 4096, 16384, 32768, 65536, 131072], [1, 4, 8, 16]),
}
BASELINE_BYTES_MAX = 20 << 30  # skip grid cases whose bf16 baseline alone would exceed this
ROUNDS = {"cpu": (9, 2), "cuda": (30, 5)}  # (rounds, warm-up rounds)
BUDGET = {"cpu": 512 << 20, "cuda": 40 << 30}  # KV memory budget of test_longest_context_in_budget


def _kind(backend: str) -> str:
    return "cuda" if backend == "torch-cuda" else "cpu"


def pytest_generate_tests(metafunc):
    if "spec" in metafunc.fixturenames:
        # One full-attention layer of the run's real model, then the 8B shape (the README's table).
        real = registry.real_spec(metafunc.config.getoption("--tq-model"))
        metafunc.parametrize("spec", [real, SHAPE], ids=lambda s: f"model={s.name}")
    if "context" in metafunc.fixturenames and "batch" in metafunc.fixturenames:
        tier = metafunc.config.getoption("--tq-tier")
        cases = {}
        for kind in ("cpu", "cuda"):
            contexts, batches = GRID[tier, kind]
            for c in contexts:
                for b in batches:
                    cases[(c, b)] = cases.get((c, b), set()) | {kind}
        metafunc.parametrize("context,batch", [pytest.param(c, b, id=f"context={c}-batch={b}")
                                               for (c, b) in sorted(cases)])


@pytest.fixture(autouse=True)
def _threads(host):
    with host.threads(timing.threads_wanted()):
        yield


class Log:
    """What this module measured, for the consistency check at its end: (backend, model, cache,
    batch) -> {context: seconds}."""

    def __init__(self):
        self.times: dict = {}

    def add(self, backend, model, cache, batch, context, seconds) -> None:
        self.times.setdefault((backend, model, cache, batch), {})[context] = seconds


@pytest.fixture(scope="module")
def log():
    return Log()


def _held_bytes(host, store) -> int:
    return sum(store.nbytes().values())


@pytest.mark.codec  # a peer's cache (no codec, no layer stores) skips: see conftest
def test_decode_attention_per_layer(backend, host, spec, context, batch, tier, benchmark, record, log, headline):
    CONFIG = headline  # noqa: N806  (the run's first config)
    kind = _kind(backend)
    contexts, batches = GRID[tier, kind]
    if context not in contexts or batch not in batches:
        pytest.skip(f"{tier} tier on {kind}: contexts {contexts}, batches {batches}")
    dtype = timing.speed_dtype(host)
    h, d, hq = spec.kv_heads, spec.head_dim, spec.heads
    if batch * h * context * d * 2 * timing.itemsize(dtype) > BASELINE_BYTES_MAX:
        pytest.skip(f"the baseline K/V of batch {batch} x {context} tokens exceeds {BASELINE_BYTES_MAX >> 30} GiB")
    scale = d ** -0.5
    cache = host.shape_cache(1, CONFIG, reserve=context)
    base = timing.StaticKV(host, 1, batch, h, d, context, dtype)
    step = 16384 // batch or 1  # fill in slices: bounded temporaries
    for s in range(0, context, step):
        n = min(step, context - s)
        k, v = host.randn((batch, h, n, d), dtype), host.randn((batch, h, n, d), dtype)
        host.update(cache, 0, k, v)
        base.k[0][:, :, s:s + n], base.v[0][:, :, s:s + n] = k, v
        host.sync(host.cache_state(cache))
    base.n[0] = context
    store = host.stores(cache)[0]
    gates.check_history_encoded(store.encoded_tokens, context, CONFIG)
    view = store.snapshot()  # all `context` tokens as held; timed calls store nothing
    q = host.randn((batch, hq, 1, d), dtype)

    def compressed():
        out = view.attend(q, scale)
        host.sync(out)
        return out

    def baseline():
        out = base.attend(0, q, scale)
        host.sync(out)
        return out

    rounds, warm = ROUNDS[kind]
    hand = timing.HandTimer(warm)

    def setup():
        with hand.round():  # the baseline call, interleaved with the timed one
            baseline()
        return (), {}

    benchmark.group = f"decode attention {backend} batch={batch}"
    out = benchmark.pedantic(compressed, setup=setup, rounds=rounds, warmup_rounds=warm, iterations=1)
    # Not a timing check: the compressed call attends like the decoded reference path.
    ref = host.sdpa(q, *view.dense(dtype, dtype), scale)
    err = float(abs(host.to_numpy(out) - host.to_numpy(ref)).max() / max(abs(host.to_numpy(ref)).max(), 1e-30))
    assert err < (2e-2 if timing.itemsize(dtype) == 2 else 1e-4), f"fast path differs from the reference by {err:.3g}"
    med = timing.median(benchmark)
    if med is None:
        return
    bytes_tq, bytes_base = _held_bytes(host, store), base.nbytes
    # Device time of the baseline: the fastest of the host's attention backends at this fixed length
    # (on CUDA torch's flash and its default choice, cuDNN on an H200), named in the records.
    by_backend = {b: host.gpu_time(lambda b=b: base.attend(0, q, scale, backend=b)) for b in host.sdpa_backends()}
    sdpa = min(by_backend, key=lambda b: by_backend[b] if by_backend[b] is not None else float("inf"))
    gpu = {"baseline": by_backend[sdpa], CONFIG.label: host.gpu_time(lambda: view.attend(q, scale))}
    wall = {"baseline": hand.median, CONFIG.label: med}
    labels = dict(model=spec.name, context=context, batch=batch, dtype=timing.dtype_name(dtype),
                  **timing.conditions(host))
    for name, held in (("baseline", bytes_base), (CONFIG.label, bytes_tq)):
        record("attention_us", wall[name] * 1e6, "us", cache=name, **labels)
        record("bytes_held", held, "B", cache=name, **labels)
        t = gpu[name] if gpu[name] is not None else wall[name]
        if gpu[name] is not None:
            record("attention_gpu_us", gpu[name] * 1e6, "us", cache=name, **labels,
                   **({"sdpa": sdpa} if name == "baseline" else {}))
        record("attention_gb_per_s_held", held / t / 1e9, "GB/s", cache=name, **labels)
        log.add(backend, spec.name, name, batch, context, t)
    on = "gpu" if gpu[CONFIG.label] is not None else "wall"
    t_base = gpu["baseline"] if on == "gpu" else wall["baseline"]
    t_tq = gpu[CONFIG.label] if on == "gpu" else wall[CONFIG.label]
    speedup = t_base / t_tq
    gates.check_speed_rate("attention_speedup", speedup)
    record("attention_speedup", speedup, "x", config=CONFIG.label, clock=on, **labels,
           **({"sdpa": sdpa} if on == "gpu" else {}))
    record("attention_speedup_bound", bytes_base / bytes_tq, "x", config=CONFIG.label, **labels)
    benchmark.extra_info.update(labels, speedup=speedup, clock=on, bytes_held=bytes_tq, bytes_baseline=bytes_base)
    timing.note_load(benchmark, record, host)


@pytest.mark.codec  # a peer's cache (no codec, no layer stores) skips: see conftest
def test_longest_context_in_budget(backend, host, benchmark, record, headline):
    CONFIG = headline  # noqa: N806  (the run's first config)
    """The most tokens of the 8B geometry (all 32 layers, batch 1) a KV budget holds, by allocating them."""
    kind = _kind(backend)
    budget = BUDGET[kind]
    dtype = timing.speed_dtype(host) if kind == "cuda" else host.float16
    per_token_16 = SHAPE.layers * SHAPE.kv_heads * SHAPE.head_dim * 2 * 2
    base_tokens = budget // per_token_16
    # Compressed: the first sinks + window tokens at 16 bits, every later one as codes + norms.
    fixed = SHAPE.layers * SHAPE.kv_heads * CONFIG.full_precision * SHAPE.head_dim * 2 * 2
    probe = host.shape_cache(1, CONFIG)
    k = host.randn((1, SHAPE.kv_heads, CONFIG.full_precision + 1, SHAPE.head_dim), dtype)
    host.update(probe, 0, k, k)
    per_token_codes = sum(v for p, v in host.stores(probe)[0].nbytes().items() if p not in ("sinks", "window", "spare"))
    tq_tokens = CONFIG.full_precision + 1 + (budget - fixed - per_token_codes * SHAPE.layers) // (
        per_token_codes * SHAPE.layers)

    def allocate():
        """Both caches at their longest context, allocated for real; bytes each holds."""
        host.reset_peak()
        base = timing.StaticKV(host, SHAPE.layers, 1, SHAPE.kv_heads, SHAPE.head_dim, base_tokens, dtype)
        held_base = base.nbytes
        del base
        host.free()
        cache = host.shape_cache(SHAPE.layers, CONFIG, reserve=tq_tokens)
        first = host.randn((1, SHAPE.kv_heads, CONFIG.full_precision + 1, SHAPE.head_dim), dtype)
        for layer in range(SHAPE.layers):
            host.update(cache, layer, first, first)
        host.sync(host.cache_state(cache))
        held_tq = sum(host.held_bytes(cache)["parts"].values())
        del cache
        host.free()
        return held_base, held_tq

    benchmark.group = f"longest context {backend}"
    held_base, held_tq = benchmark.pedantic(allocate, rounds=1, iterations=1)
    assert held_base <= budget and held_tq <= budget, (held_base, held_tq, budget)
    labels = dict(model=SHAPE.name, budget_bytes=budget, dtype=timing.dtype_name(dtype))
    record("max_context_tokens", base_tokens, "token", cache="baseline", bytes_held=held_base, **labels)
    record("max_context_tokens", tq_tokens, "token", cache=CONFIG.label, bytes_held=held_tq, **labels)
    record("max_context_ratio", tq_tokens / base_tokens, "x", config=CONFIG.label, **labels)
    peak = host.peak()
    if peak is not None:
        record("peak_alloc", peak, "B", **labels)


def test_time_grows_with_context(log):
    """Sanity: for each (backend, model, cache, batch), a longer context never takes much less time than a
    shorter one (tolerance 25 %: noise and fixed per-call overhead at short contexts)."""
    if not log.times:
        pytest.skip("no decode-attention timings in this run (benchmarks disabled or deselected)")
    bad = []
    for key, by_ctx in log.times.items():
        ctx = sorted(by_ctx)
        for a, b in zip(ctx, ctx[1:]):
            if by_ctx[b] < 0.75 * by_ctx[a]:
                bad.append(f"{key}: {by_ctx[a] * 1e6:.1f} us at {a} tokens but {by_ctx[b] * 1e6:.1f} us at {b}")
    assert not bad, "timings contradict themselves: " + "; ".join(bad)
