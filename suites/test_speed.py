"""Speed: codec throughput, and tokens/s with the compressed cache vs the baseline cache of the same run.

Speed is measured and recorded, never asserted: no test here fails because something is slow.
The only gates (``suites.gates``, speed section) are non-timing: a measurement produced a
positive, finite rate, and the cache that was timed really held encoded history.

Every test uses pytest-benchmark's ``benchmark`` fixture, so ``pytest suites/ --benchmark-only``
runs exactly this file, and a plain ``pytest suites/`` runs it too (small rounds in the default
tier). Under ``--benchmark-disable`` each timed function runs once as a smoke test and nothing is
recorded (one unwarmed call is not a measurement).

How the clock is read:
* ``benchmark.pedantic(target, setup=..., rounds=R, warmup_rounds=W, iterations=1)``; the target
  ends with ``host.sync(...)`` (a device synchronize on torch, ``mx.eval`` of its outputs on mlx),
  so queued device work is inside the measurement. Reported values are medians over rounds.
* Memory is touched before timing: once per backend at the largest codec shape of the tier, by
  the warm-up rounds of each test, and for the real model by one untimed prefill of the full
  prompt (+ two decode steps) on each cache (the default tier has no full warm-up round there:
  one round of it costs ~15 s on a 2-core CPU).
* Compressed vs baseline is interleaved, not sequential: each round's ``setup`` (outside
  pytest-benchmark's clock) runs and times one baseline round by hand, with the same
  synchronization, and prepares the compressed round that pytest-benchmark times (for the real
  model the two prefills alternate which goes first). Neighbours on a shared box then load both
  sides alike, and the ratio is a ratio of medians of the same run. With the default tier's
  single model round, expect run-to-run spread of the ratio of +-50 % on a loaded 2-core box.
* torch CPU threads: ``TQ_SPEED_THREADS`` (default 1; 0 = torch's own default) for the duration of
  this module, recorded as the label ``threads``. On a shared 2-core box torch's default 2-thread
  pool spends most of its time in barriers (measured 5-15x slower than one thread under load), so
  1 is the reproducible choice; set 0 on a dedicated machine. The 1-minute load average is
  recorded beside every test (``host_load_1m``) so noisy runs can be recognized.

Measurements (``record``):
* ``test_codec_throughput``: ``vectors_per_s`` and ``gb_per_s`` per (backend, d, bits, op) with
  labels ``dtype``, ``vectors``. GB/s is input bytes / time: the float vectors for encode, the
  packed codes + fp16 norms for decode (``out_gb_per_s`` gives decode's float output rate).
  Input dtype: fp16 on torch-cuda and mlx, fp32 on torch-cpu.
* ``test_model_tokens_per_s``: the real model (``load_model``: ``--tq-model``, else the default), a
  prompt of the corpus's first 256 tokens (nightly 512) prefilled in one call, then ``NEW_TOKENS``
  (32) greedy tokens one at a time. mlx on CPU runs it only in nightly (time budget). ``prefill_tokens_per_s``
  and ``decode_tokens_per_s`` with ``cache=baseline`` and ``cache=<config label>``, and
  ``speed_ratio`` (compressed / baseline tokens/s, label ``phase``). pytest-benchmark's own stats
  time the compressed decode loop.
* ``test_cache_decode_tokens_per_s``: the llama3-8b geometry (8 KV heads x d128, 32 query heads)
  at the cache level, no weights: ``context`` tokens of random K/V are written into every layer,
  then one decode step = for each layer, ``cache.update`` of one token + scaled-dot-product
  attention of 32 query heads (the compressed cache through ``View.attend``, the baseline through
  sdpa over its preallocated K/V). ``decode_tokens_per_s`` for both caches and ``speed_ratio``: the
  decode overhead of the cache itself. Every tier runs a 2-layer slice at 1k (label ``layers``;
  per-token time scales with layers) and, on torch-cuda, all 32 layers at 32k with batch 1 and 8
  (label ``batch`` when > 1); nightly adds all 32 layers at 1k/4k. No CUDA graphs on either side:
  eager steps, so a cache's host time counts where the device does not hide it.
"""

from __future__ import annotations


import numpy as np
import pytest

from fixtures import configs as config_registry
from fixtures import models as registry
from harness import blas, timing
from suites import gates
from tq_core import TurboQuantizer

CONFIG = config_registry.DEFAULT  # the headline K4/V2 default (4 sinks, 128-token window)

TIERS = {
    "default": dict(vectors=4096, rounds=3, warmup=1, prompt=256, model_rounds=1, model_warmup=0,
                    shape_rounds=3, shape_warmup=1),
    "nightly": dict(vectors=65536, rounds=10, warmup=2, prompt=512, model_rounds=5, model_warmup=1,
                    shape_rounds=10, shape_warmup=2),
}
NEW_TOKENS = 32
DIMS = [64, 128, pytest.param(256, marks=pytest.mark.nightly)]
BITS = [2, 3, 4]
SHAPE = registry.SHAPES[0]  # llama3-8b-shape: 32 layers, 8 KV heads, d128, 32 query heads
SHAPE_CASES = [  # (context, layers, batch, marks)
    (1024, 2, 1, ()),
    (1024, SHAPE.layers, 1, (pytest.mark.nightly,)),
    (4096, SHAPE.layers, 1, (pytest.mark.nightly,)),
    # GPU only (the fp32 baseline of 32 layers at 32k is 8 GiB per sequence on a CPU):
    (32768, SHAPE.layers, 1, ()),
    (32768, SHAPE.layers, 8, ()),
]
GPU_ONLY_CONTEXT = 4096  # shape cases above this context run on torch-cuda only
# A GPU step takes milliseconds and its eager loop is bound by the host's Python, whose pace drifts:
# four times the tier's rounds there, so the medians hold still between cases.
GPU_ROUND_FACTOR = 4


def pytest_generate_tests(metafunc):
    if "d" in metafunc.fixturenames:
        metafunc.parametrize("d", DIMS, ids=lambda v: f"d={v}")
    if "bits" in metafunc.fixturenames:
        metafunc.parametrize("bits", BITS, ids=lambda v: f"bits={v}")
    if "layers" in metafunc.fixturenames:
        metafunc.parametrize("context,layers,batch", [
            pytest.param(c, n, b, marks=m, id=f"context={c}-layers={n}" + (f"-batch={b}" if b > 1 else ""))
            for c, n, b, m in SHAPE_CASES])


@pytest.fixture
def tier(request) -> dict:
    return TIERS[request.config.getoption("--tq-tier")]


@pytest.fixture(autouse=True)
def _threads(host):
    """Pin the host's CPU thread pool for each test (restored afterwards); see harness/timing.py."""
    with host.threads(timing.threads_wanted()):
        yield


class Conditions(timing.Gemm):
    """What the module measures once per backend: which backends were warmed, mlx's GEMM rate."""

    def __init__(self):
        super().__init__()
        self.warmed: set = set()

    def warm(self, host, tier: dict, d: int) -> None:
        """Touch memory once per backend at the largest codec shape of the tier (d, 4 bits) before timing."""
        if host.backend in self.warmed:
            return
        x = host.randn((tier["vectors"], d), timing.speed_dtype(host))
        codec = _codec(d, max(BITS))
        parts = codec.encode(x)
        host.sync(*parts.values())
        host.sync(codec.decode(parts, x.dtype))
        self.warmed.add(host.backend)

    def gemm_gflops(self, host) -> float | None:
        return self.gflops(host)


@pytest.fixture(scope="module")
def conditions():
    return Conditions()


def _codec(d: int, bits: int):
    """The codec a cache encodes with: the fused kernel of the device where there is one."""
    from tq_core.methods.turboquant import TurboQuantCodec

    return TurboQuantCodec(TurboQuantizer(d, bits))


# ---- codec throughput ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["encode", "decode"], ids=lambda v: f"op={v}")
def test_codec_throughput(backend, host, d, bits, op, tier, request, benchmark, record, conditions):
    """Encode and decode as a cache does them (``TurboQuantCodec``: the fused kernel on CUDA)."""
    conditions.warm(host, tier, 256 if request.config.getoption("--tq-tier") == "nightly" else 128)
    n = tier["vectors"]
    codec = _codec(d, bits)
    dtype = timing.speed_dtype(host)
    x = host.randn((n, d), dtype)
    in_fp = n * d * timing.itemsize(dtype)
    if op == "encode":
        def target():
            parts = codec.encode(x)
            host.sync(*parts.values())
            return parts

        nbytes_in = in_fp
    else:
        parts = codec.encode(x)
        host.sync(*parts.values())
        nbytes_in = sum(host.nbytes(a) for a in parts.values())

        def target():
            y = codec.decode(parts, dtype)
            host.sync(y)
            return y

    benchmark.group = f"codec {op} {backend}"
    out = benchmark.pedantic(target, rounds=tier["rounds"], warmup_rounds=tier["warmup"], iterations=1)
    # What was timed produced the right thing (not a timing check).
    if op == "encode":
        assert tuple(out["codes"].shape) == (n, codec.q.code_bytes) and tuple(out["norms"].shape) == (n,)
    else:
        assert tuple(out.shape) == (n, d) and out.dtype == x.dtype
    med = timing.median(benchmark)
    if med is None:
        return
    labels = dict(dtype=timing.dtype_name(dtype), vectors=n, **timing.conditions(host))
    rates = {"vectors_per_s": (n / med, "vec/s"), "gb_per_s": (nbytes_in / med / 1e9, "GB/s")}
    if op == "decode":
        rates["out_gb_per_s"] = (in_fp / med / 1e9, "GB/s")
    for metric, (value, unit) in rates.items():
        gates.check_speed_rate(metric, value)
        record(metric, value, unit, **labels)
        benchmark.extra_info[metric] = value
    benchmark.extra_info.update(labels, bytes_in=nbytes_in, seconds_median=med)
    timing.note_load(benchmark, record, host, conditions.gemm_gflops(host))


# ---- the real model: prefill and greedy decode, compressed vs baseline --------------------------
class ModelRunner:
    """Prefill / greedy decode of a loaded model through a given cache, synchronized at the end."""

    def __init__(self, host, m, ids: list[int]):
        self.host, self.m, self.ids = host, m, ids

    def new_cache(self, config):
        return self.host.new_cache(self.m, config)

    def _sync(self, cache):
        self.host.sync(self.host.cache_state(cache))

    def prefill(self, cache) -> int:
        """Feed the prompt in one call; returns the first greedy token."""
        nxt = self.host.argmax(self.host.forward(self.m, self.ids, cache, last_only=True))
        self._sync(cache)
        return nxt

    def decode(self, cache, nxt: int, n: int) -> list:
        """``n`` greedy steps, one token per call; returns the tokens."""
        out = []
        for _ in range(n):
            nxt = self.host.argmax(self.host.forward(self.m, [nxt], cache, last_only=True))
            out.append(nxt)
        self._sync(cache)
        return out

    def warm(self, config) -> None:
        """Touch memory at the full prompt shape on both caches (prefill + two decode steps)."""
        for cfg in (None, config):
            cache = self.new_cache(cfg)
            self.decode(cache, self.prefill(cache), 2)

    def encoded_tokens(self, cache) -> int:
        """Tokens held as codes in the first compressed layer."""
        return self.host.stores(cache)[0].encoded_tokens


# Reference BLAS measured 1-6 GFLOP/s here (load-dependent), OpenBLAS 40-90: 15 separates them.
SLOW_GEMM_GFLOPS = 15.0


@pytest.mark.codec  # a peer's cache (no codec, no layer stores) skips: see conftest
def test_model_tokens_per_s(backend, host, tier, request, corpus, real_spec, load_model, benchmark, record,
                            conditions, headline):
    CONFIG = headline  # noqa: N806  (the run's first config)
    nightly = request.config.getoption("--tq-tier") == "nightly"
    if host.slow_cpu_backend and not nightly:
        # Linux CPU mlx: ~25 s of CPU even with OpenBLAS (minutes with the wheel's reference
        # BLAS, see Conditions.gemm_gflops); the default tier's budget keeps it to the codec and cache tests.
        pytest.skip("mlx on CPU: the real-model tokens/s run with --tq-tier nightly (default-tier time budget)")
    if tier["prompt"] + NEW_TOKENS > real_spec.max_context:
        pytest.skip(f"{real_spec.name} takes at most {real_spec.max_context} positions, the test feeds "
                    f"{tier['prompt'] + NEW_TOKENS}")
    gflops = conditions.gemm_gflops(host)
    if gflops is not None and gflops < SLOW_GEMM_GFLOPS:
        pytest.skip(f"mlx GEMM runs {gflops:.1f} GFLOP/s here (the Linux wheel's reference BLAS): each "
                    f"{tier['prompt']}-token prefill takes minutes; {blas.HINT}")
    m = load_model(backend)
    ids = host.tokenize(m, corpus.text[: tier["prompt"] * 16])[: tier["prompt"]]
    if len(ids) < tier["prompt"]:
        raise ValueError(f"corpus gave {len(ids)} tokens, the speed suite needs {tier['prompt']}")
    runner = ModelRunner(host, m, ids)
    runner.warm(CONFIG)
    warm = tier["model_warmup"]
    base_prefill, base_decode, tq_prefill = timing.HandTimer(warm), timing.HandTimer(warm), timing.HandTimer(warm)
    base_tokens: list = []

    rounds_done = [0]

    def setup():
        def baseline_round():  # interleaved, timed by hand with the same synchronization
            cache = runner.new_cache(None)
            with base_prefill.round():
                nxt = runner.prefill(cache)
            with base_decode.round():
                base_tokens[:] = runner.decode(cache, nxt, NEW_TOKENS)

        # The compressed round: prefill timed by hand, decode by pytest-benchmark (the target).
        # Which prefill runs first alternates between rounds, so order effects cancel.
        first = rounds_done[0] % 2 == 0
        rounds_done[0] += 1
        if first:
            baseline_round()
        cache = runner.new_cache(CONFIG)
        with tq_prefill.round():
            nxt = runner.prefill(cache)
        if not first:
            baseline_round()
        return (cache, nxt), {}

    def target(cache, nxt):
        return cache, runner.decode(cache, nxt, NEW_TOKENS)

    benchmark.group = f"model decode {backend}"
    cache, out = benchmark.pedantic(target, setup=setup, rounds=tier["model_rounds"],
                                    warmup_rounds=warm, iterations=1)
    # What was timed is what we meant to time (not timing checks): the compressed cache held codes
    # for everything outside its sinks and window, and both caches produced NEW_TOKENS tokens.
    total = len(runner.ids) + NEW_TOKENS
    gates.check_history_encoded(runner.encoded_tokens(cache), total, CONFIG)
    assert len(out) == len(base_tokens) == NEW_TOKENS
    med = timing.median(benchmark)
    if med is None:
        return
    labels = dict(model=real_spec.name, prompt=len(runner.ids), new_tokens=NEW_TOKENS,
                  **timing.conditions(host))
    tps = {
        ("prefill", "baseline"): len(runner.ids) / base_prefill.median,
        ("prefill", CONFIG.label): len(runner.ids) / tq_prefill.median,
        ("decode", "baseline"): NEW_TOKENS / base_decode.median,
        ("decode", CONFIG.label): NEW_TOKENS / med,
    }
    for (phase, cache_name), value in tps.items():
        gates.check_speed_rate(f"{phase}_tokens_per_s[{cache_name}]", value)
        record(f"{phase}_tokens_per_s", value, "tok/s", cache=cache_name, **labels)
        benchmark.extra_info[f"{phase}_tokens_per_s[{cache_name}]"] = value
    for phase in ("prefill", "decode"):
        ratio = tps[(phase, CONFIG.label)] / tps[(phase, "baseline")]
        record("speed_ratio", ratio, "x", phase=phase, config=CONFIG.label, **labels)
        benchmark.extra_info[f"{phase}_ratio"] = ratio
    # Greedy agreement of the last round (a fact about the run, not gated here).
    match = float(np.mean([a == b for a, b in zip(out, base_tokens)]))
    record("greedy_token_match", match, "fraction", config=CONFIG.label, **labels)
    benchmark.extra_info.update(labels, greedy_token_match=match)
    timing.note_load(benchmark, record, host, gflops)


# ---- cache-level decode at the llama3-8b geometry -----------------------------------------------
class ShapeCaches:
    """The uncompressed baseline (preallocated, ``timing.StaticKV``) and a compressed cache of
    ``layers`` layers of ``SHAPE``, with one decode step each."""

    def __init__(self, host, layers: int, capacity: int, batch: int = 1, config=CONFIG):
        self.host, self.layers, self.batch = host, layers, batch
        self.dtype = timing.speed_dtype(host)
        self.scale = SHAPE.head_dim ** -0.5
        self.base = timing.StaticKV(host, layers, batch, SHAPE.kv_heads, SHAPE.head_dim, capacity, self.dtype)
        self.tq = host.shape_cache(layers, config, reserve=capacity)

    def fill(self, context: int) -> None:
        """Write the same ``context`` tokens of random K/V into every layer of both caches."""
        h, d = SHAPE.kv_heads, SHAPE.head_dim
        for layer in range(self.layers):
            k = self.host.randn((self.batch, h, context, d), self.dtype)
            v = self.host.randn((self.batch, h, context, d), self.dtype)
            self.base.fill(layer, k, v)
            self.host.update(self.tq, layer, k, v)
            self.host.sync(self.host.cache_state(self.tq))

    def step_inputs(self):
        """Random query (32 heads) and one new K/V token per layer, made before the clock starts."""
        h, d = SHAPE.kv_heads, SHAPE.head_dim
        q = self.host.randn((self.batch, SHAPE.heads, 1, d), self.dtype)
        kv = [(self.host.randn((self.batch, h, 1, d), self.dtype), self.host.randn((self.batch, h, 1, d), self.dtype))
              for _ in range(self.layers)]
        return q, kv

    def base_step(self, q, kv):
        """One decode step of the baseline: per layer, write the token in place and attend (sdpa)."""
        outs = [self.base.step(layer, q, k, v, self.scale) for layer, (k, v) in enumerate(kv)]
        self.host.sync(outs)
        return outs

    def tq_step(self, q, kv):
        """One decode step of the compressed cache: per layer, store the token and attend over the
        codes (``View.attend``: the device's fused kernel where one exists)."""
        stores = self.host.stores(self.tq)
        outs = [stores[layer].update(k, v).attend(q, self.scale) for layer, (k, v) in enumerate(kv)]
        self.host.sync(outs, self.host.cache_state(self.tq))
        return outs

    def encoded_tokens(self) -> int:
        return self.host.stores(self.tq)[0].encoded_tokens

    def lengths(self) -> tuple[int, int]:
        return self.base.n[0], self.host.stores(self.tq)[0].length


class StepLog:
    """Seconds per decode step this module measured, for the consistency check at its end:
    (backend, cache, batch) -> {(context, layers): seconds}."""

    def __init__(self):
        self.times: dict = {}

    def add(self, backend, cache, batch, context, layers, seconds) -> None:
        self.times.setdefault((backend, cache, batch), {})[(context, layers)] = seconds


@pytest.fixture(scope="module")
def step_log():
    return StepLog()


@pytest.mark.codec  # a peer's cache (no codec, no layer stores) skips: see conftest
def test_cache_decode_tokens_per_s(backend, host, context, layers, batch, tier, benchmark, record, conditions,
                                  headline, step_log):
    if context > GPU_ONLY_CONTEXT and backend != "torch-cuda":
        pytest.skip(f"context {context} on {layers} layers runs on torch-cuda only (memory and time)")
    CONFIG = headline  # noqa: N806  (the run's first config)
    factor = GPU_ROUND_FACTOR if backend == "torch-cuda" else 1
    rounds, warm = tier["shape_rounds"] * factor, tier["shape_warmup"] * factor
    caches = ShapeCaches(host, layers, context + rounds + warm + 1, batch=batch, config=CONFIG)
    caches.fill(context)
    base = timing.HandTimer(warm)

    def setup():
        q, kv = caches.step_inputs()
        with base.round():  # interleaved baseline step, same inputs, same synchronization
            caches.base_step(q, kv)
        return (q, kv), {}

    benchmark.group = f"cache decode {SHAPE.name} {backend}"
    outs = benchmark.pedantic(caches.tq_step, setup=setup, rounds=rounds, warmup_rounds=warm, iterations=1)
    steps = 1 if timing.median(benchmark) is None else rounds + warm
    # Not timing checks: both caches hold every token, the compressed one as codes outside its
    # sinks and window, and attention read all of them (32 query heads).
    assert caches.lengths() == (context + steps, context + steps)
    gates.check_history_encoded(caches.encoded_tokens(), context + steps, CONFIG)
    assert len(outs) == layers and tuple(outs[0].shape) == (batch, SHAPE.heads, 1, SHAPE.head_dim)
    med = timing.median(benchmark)
    if med is None:
        return
    labels = dict(model=SHAPE.name, context=context, layers=layers, **({"batch": batch} if batch > 1 else {}),
                  dtype=timing.dtype_name(caches.dtype),
                  **timing.conditions(host))
    tps = {"baseline": 1 / base.median, CONFIG.label: 1 / med}
    for cache_name, value in tps.items():
        gates.check_speed_rate(f"decode_tokens_per_s[{cache_name}]", value)
        record("decode_tokens_per_s", value, "tok/s", cache=cache_name, **labels)
        benchmark.extra_info[f"decode_tokens_per_s[{cache_name}]"] = value
    for cache_name, value in tps.items():
        step_log.add(backend, "baseline" if cache_name == "baseline" else "compressed", batch, context, layers, 1 / value)
    ratio = tps[CONFIG.label] / tps["baseline"]
    record("speed_ratio", ratio, "x", phase="decode", config=CONFIG.label, **labels)
    # Per layer and token: the cache's overhead over the baseline, in ms (scales to any layer count).
    overhead_ms = (med - base.median) / layers * 1e3
    record("decode_overhead_ms_per_layer", overhead_ms, "ms", config=CONFIG.label, **labels)
    benchmark.extra_info.update(labels, decode_ratio=ratio, decode_overhead_ms_per_layer=overhead_ms)
    timing.note_load(benchmark, record, host, conditions.gemm_gflops(host))


# A step over L2 > L1 layers reads L2 / L1 times the K/V: it must take at least LAYER_FLOOR of that
# ratio in time (fixed per-step costs are small beside one layer's); a longer context must not take
# much less time than a shorter one (CONTEXT_FLOOR: noise).
LAYER_FLOOR = 0.25
CONTEXT_FLOOR = 0.75


def step_contradictions(times: dict) -> list[str]:
    """What in {(context, layers): seconds per step} of one (backend, cache, batch) cannot all be true."""
    bad = []
    for (c1, l1), t1 in times.items():
        for (c2, l2), t2 in times.items():
            if c1 == c2 and l2 > l1 and t2 < LAYER_FLOOR * (l2 / l1) * t1:
                bad.append(f"{l2} layers took {t2 * 1e3:.2f} ms per step but {l1} layers {t1 * 1e3:.2f} ms "
                           f"(context {c1})")
            if l1 == l2 and c2 > c1 and t2 < CONTEXT_FLOOR * t1:
                bad.append(f"context {c2} took {t2 * 1e3:.2f} ms per step but context {c1} {t1 * 1e3:.2f} ms "
                           f"({l1} layers)")
    return bad


def test_decode_steps_are_consistent(step_log):
    """Sanity of this module's decode-step timings, per (backend, cache, batch): time per step grows with
    layers (at least LAYER_FLOOR of linear) and does not shrink with context (CONTEXT_FLOOR). A run
    whose timings contradict themselves (e.g. a baseline slower on 2 layers than on 32) fails here
    instead of landing in the report as a speed-up."""
    if not step_log.times:
        pytest.skip("no cache decode timings in this run (benchmarks disabled or deselected)")
    bad = [f"{key}: {msg}" for key, times in step_log.times.items() for msg in step_contradictions(times)]
    assert not bad, "decode-step timings contradict themselves: " + "; ".join(bad)

