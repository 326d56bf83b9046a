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
  ends with ``fixtures.targets.synchronize(backend)`` (torch) or ``mx.eval`` of its outputs (mlx),
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
* ``test_model_tokens_per_s``: the real model (``load_model``), a prompt of the corpus's first
  256 tokens (nightly 512) prefilled in one call, then ``NEW_TOKENS`` (32) greedy tokens one at a
  time. mlx on CPU runs it only in nightly (time budget). ``prefill_tokens_per_s``
  and ``decode_tokens_per_s`` with ``cache=baseline`` and ``cache=<config label>``, and
  ``speed_ratio`` (compressed / baseline tokens/s, label ``phase``). pytest-benchmark's own stats
  time the compressed decode loop.
* ``test_cache_decode_tokens_per_s``: the llama3-8b geometry (8 KV heads x d128, 32 query heads)
  at the cache level, no weights: ``context`` tokens of random K/V are written into every layer,
  then one decode step = for each layer, ``cache.update`` of one token + scaled-dot-product
  attention of 32 query heads over what the cache returns. ``decode_tokens_per_s`` for both caches
  and ``speed_ratio``: the decode overhead of the cache itself. The default tier runs a 2-layer
  slice at 1k (label ``layers``; per-token time scales with layers); nightly all 32 layers at 1k/4k.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time

import numpy as np
import pytest

from fixtures import models as registry
from fixtures import targets
from suites import gates
from tq_core import CacheConfig, TurboQuantizer, blas

CONFIG = CacheConfig()  # the headline K4/V2 default (4 sinks, 128-token window)

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
SHAPE_CASES = [  # (context, layers, marks)
    (1024, 2, ()),
    (1024, SHAPE.layers, (pytest.mark.nightly,)),
    (4096, SHAPE.layers, (pytest.mark.nightly,)),
]


def pytest_generate_tests(metafunc):
    if "d" in metafunc.fixturenames:
        metafunc.parametrize("d", DIMS, ids=lambda v: f"d={v}")
    if "bits" in metafunc.fixturenames:
        metafunc.parametrize("bits", BITS, ids=lambda v: f"bits={v}")
    if "layers" in metafunc.fixturenames:
        metafunc.parametrize("context,layers", [pytest.param(c, n, marks=m, id=f"context={c}-layers={n}")
                                                for c, n, m in SHAPE_CASES])


@pytest.fixture
def tier(request) -> dict:
    return TIERS[request.config.getoption("--tq-tier")]


# ---- measurement conditions ---------------------------------------------------------------------
def _threads_wanted() -> int:
    raw = os.environ.get("TQ_SPEED_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise pytest.UsageError(f"TQ_SPEED_THREADS must be a non-negative int, got {raw!r}") from None
    if n < 0:
        raise pytest.UsageError(f"TQ_SPEED_THREADS must be a non-negative int, got {raw!r}")
    return n


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    """Pin torch's CPU thread pool for this module (restored afterwards); see the module docstring."""
    with targets.torch_threads(_threads_wanted()):
        yield


def _conditions(backend: str) -> dict:
    """Labels that describe how a measurement was taken."""
    if targets.lib(backend) == "torch":
        import torch

        return {"threads": torch.get_num_threads()}
    return {}


# ---- one interface over torch and mlx -----------------------------------------------------------
class Lib:
    """The few array operations the timed functions need, for one backend."""

    def __init__(self, backend: str):
        self.backend = backend
        self.mlx = targets.lib(backend) == "mlx"
        if self.mlx:
            import mlx.core as mx

            self.mx = mx
            self.dtype = mx.float16
        else:
            import torch

            self.torch = torch
            self.device = targets.torch_device(backend)
            self.dtype = torch.float16 if self.device == "cuda" else torch.float32

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).rsplit(".", 1)[-1]

    @property
    def itemsize(self) -> int:
        return 2 if "16" in self.dtype_name else 4

    def randn(self, *shape):
        if self.mlx:
            x = self.mx.random.normal(shape).astype(self.dtype)
            self.mx.eval(x)
            return x
        return self.torch.randn(*shape, device=self.device).to(self.dtype)

    def done(self, *arrays) -> None:
        """Block until ``arrays`` (and everything queued before them) are computed."""
        if self.mlx:
            self.mx.eval(*[a for a in arrays if a is not None])
        else:
            targets.synchronize(self.backend)


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


def _median(benchmark) -> float | None:
    """Median seconds per round of what pytest-benchmark timed; None when benchmarks are disabled."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.median)


def _note_load(benchmark, record, backend: str) -> None:
    """Record the conditions of a measurement: host load, and for mlx the GEMM rate (which BLAS)."""
    load = os.getloadavg()[0]
    benchmark.extra_info["host_load_1m"] = round(load, 2)
    benchmark.extra_info["cpu_count"] = os.cpu_count()
    record("host_load_1m", load, "procs")
    if targets.lib(backend) == "mlx":
        benchmark.extra_info["mlx_gemm_gflops"] = round(mlx_gemm_gflops(), 1)
        record("mlx_gemm_gflops", mlx_gemm_gflops(), "GFLOP/s")


_WARMED: set = set()


def _warm(lib: Lib, tier: dict, d: int) -> None:
    """Touch memory once per backend at the largest codec shape of the tier (d, 4 bits) before timing."""
    if lib.backend in _WARMED:
        return
    x = lib.randn(tier["vectors"], d)
    q = TurboQuantizer(d, max(BITS))
    enc = q.encode(x)
    lib.done(enc.codes, enc.norms)
    lib.done(q.decode(enc))
    _WARMED.add(lib.backend)


# ---- codec throughput ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["encode", "decode"], ids=lambda v: f"op={v}")
def test_codec_throughput(backend, d, bits, op, tier, request, benchmark, record):
    lib = Lib(backend)
    _warm(lib, tier, 256 if request.config.getoption("--tq-tier") == "nightly" else 128)
    n = tier["vectors"]
    q = TurboQuantizer(d, bits)
    x = lib.randn(n, d)
    in_fp = n * d * lib.itemsize
    if op == "encode":
        def target():
            enc = q.encode(x)
            lib.done(enc.codes, enc.norms)
            return enc

        nbytes_in = in_fp
    else:
        enc = q.encode(x)
        lib.done(enc.codes, enc.norms)
        nbytes_in = enc.nbytes

        def target():
            y = q.decode(enc)
            lib.done(y)
            return y

    benchmark.group = f"codec {op} {backend}"
    out = benchmark.pedantic(target, rounds=tier["rounds"], warmup_rounds=tier["warmup"], iterations=1)
    # What was timed produced the right thing (not a timing check).
    if op == "encode":
        assert tuple(out.codes.shape) == (n, q.code_bytes) and tuple(out.norms.shape) == (n,)
    else:
        assert tuple(out.shape) == (n, d) and out.dtype == x.dtype
    med = _median(benchmark)
    if med is None:
        return
    labels = dict(dtype=lib.dtype_name, vectors=n, **_conditions(backend))
    rates = {"vectors_per_s": (n / med, "vec/s"), "gb_per_s": (nbytes_in / med / 1e9, "GB/s")}
    if op == "decode":
        rates["out_gb_per_s"] = (in_fp / med / 1e9, "GB/s")
    for metric, (value, unit) in rates.items():
        gates.check_speed_rate(metric, value)
        record(metric, value, unit, **labels)
        benchmark.extra_info[metric] = value
    benchmark.extra_info.update(labels, bytes_in=nbytes_in, seconds_median=med)
    _note_load(benchmark, record, backend)


# ---- the real model: prefill and greedy decode, compressed vs baseline --------------------------
class ModelRunner:
    """Prefill / greedy decode of a loaded model through a given cache, synchronized at the end."""

    def __init__(self, backend: str, model, tokenizer, ids: list[int]):
        self.backend, self.model, self.ids = backend, model, ids
        self.mlx = targets.lib(backend) == "mlx"
        if self.mlx:
            import mlx.core as mx

            from tq_core.integrations import mlx_lm

            self.mx, self.integration = mx, mlx_lm
            self.prompt = mx.array([ids])
        else:
            import torch

            from tq_core.integrations import hf

            self.torch, self.integration = torch, hf
            self.kwarg = hf.cache_kwarg(model)
            self.prompt = torch.tensor([ids], device=next(model.parameters()).device)

    def new_cache(self, config):
        m, i = self.model, self.integration
        if self.mlx:
            return i.baseline_cache(m) if config is None else i.make_cache(m, config)
        return i.dynamic_cache(m) if config is None else i.make_cache(m, config)

    def _forward(self, x, cache):
        if self.mlx:
            return self.model(x, cache=cache)
        with self.torch.no_grad():
            return self.model(input_ids=x, use_cache=True, **{self.kwarg: cache}).logits

    def _sync(self, logits, cache):
        if self.mlx:
            self.mx.eval(logits, *[a for c in cache for a in c.state])
        else:
            targets.synchronize(self.backend)

    def prefill(self, cache):
        """Feed the prompt in one call; returns the first greedy token."""
        logits = self._forward(self.prompt, cache)
        nxt = self._argmax(logits)
        self._sync(nxt, cache)
        return nxt

    def decode(self, cache, nxt, n: int) -> list:
        """``n`` greedy steps, one token per call; returns the tokens (still on the device)."""
        out = []
        for _ in range(n):
            logits = self._forward(nxt, cache)
            nxt = self._argmax(logits)
            if self.mlx:
                self.mx.eval(nxt)  # greedy decoding needs each token before the next step
            out.append(nxt)
        self._sync(nxt, cache)
        return out

    def warm(self, config) -> None:
        """Touch memory at the full prompt shape on both caches (prefill + two decode steps)."""
        for cfg in (None, config):
            cache = self.new_cache(cfg)
            self.decode(cache, self.prefill(cache), 2)

    def _argmax(self, logits):
        if self.mlx:
            return self.mx.argmax(logits[:, -1], axis=-1).reshape(1, 1)
        return logits[:, -1].argmax(-1).view(1, 1)

    def tokens(self, out: list) -> list[int]:
        return [int(t.item()) for t in out]

    def encoded_tokens(self, cache) -> int:
        """Tokens held as codes in the first compressed layer."""
        if self.mlx:
            return cache[0].store.encoded_tokens
        return cache.compressed_layers()[0].store.encoded_tokens


def _mlx_on_cpu() -> bool:
    import mlx.core as mx

    return "cpu" in str(mx.default_device()).lower()


_GEMM: dict = {}
# Reference BLAS measured 1-6 GFLOP/s here (load-dependent), OpenBLAS 40-90: 15 separates them.
SLOW_GEMM_GFLOPS = 15.0


def mlx_gemm_gflops() -> float:
    """fp32 GEMM rate of mlx here, best of 3 (measured once per process).

    The Linux ``mlx[cpu]`` wheel ships a reference BLAS (~1 GFLOP/s on a 2-core VM); with a system
    OpenBLAS (``tq_core.blas`` loads it when present) it runs 40-170 GFLOP/s. Metal is faster still.
    """
    if "mlx" not in _GEMM:
        import mlx.core as mx

        a, w = mx.random.normal((256, 576)), mx.random.normal((576, 1536))
        mx.eval(a, w, a @ w)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            mx.eval(a @ w)
            best = min(best, time.perf_counter() - t0)
        _GEMM["mlx"] = 2 * 256 * 576 * 1536 / best / 1e9
    return _GEMM["mlx"]


def _prompt_ids(tokenizer, corpus, n: int) -> list[int]:
    from tq_core.generation import hf_tokenizer  # mlx-lm wraps the HF tokenizer

    ids = hf_tokenizer(tokenizer)(corpus.text[: n * 16])["input_ids"][:n]
    if len(ids) < n:
        raise ValueError(f"corpus gave {len(ids)} tokens, the speed suite needs {n}")
    return list(ids)


def test_model_tokens_per_s(backend, tier, request, corpus, real_spec, load_model, benchmark, record):
    nightly = request.config.getoption("--tq-tier") == "nightly"
    if backend == "mlx" and not nightly and _mlx_on_cpu():
        # Linux CPU mlx: ~25 s of CPU even with OpenBLAS (minutes with the wheel's reference
        # BLAS, see mlx_gemm_gflops); the default tier's budget keeps it to the codec and cache tests.
        pytest.skip("mlx on CPU: the real-model tokens/s run with --tq-tier nightly (default-tier time budget)")
    if backend == "mlx" and (gflops := mlx_gemm_gflops()) < SLOW_GEMM_GFLOPS:
        pytest.skip(f"mlx GEMM runs {gflops:.1f} GFLOP/s here (the Linux wheel's reference BLAS): each "
                    f"{tier['prompt']}-token prefill takes minutes; {blas.HINT}")
    model, tokenizer = load_model(backend)
    runner = ModelRunner(backend, model, tokenizer, _prompt_ids(tokenizer, corpus, tier["prompt"]))
    runner.warm(CONFIG)
    warm = tier["model_warmup"]
    base_prefill, base_decode, tq_prefill = HandTimer(warm), HandTimer(warm), HandTimer(warm)
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
    med = _median(benchmark)
    if med is None:
        return
    labels = dict(model=real_spec.name, prompt=len(runner.ids), new_tokens=NEW_TOKENS,
                  **_conditions(backend))
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
    match = float(np.mean([a == b for a, b in zip(runner.tokens(out), runner.tokens(base_tokens))]))
    record("greedy_token_match", match, "fraction", config=CONFIG.label, **labels)
    benchmark.extra_info.update(labels, greedy_token_match=match)
    _note_load(benchmark, record, backend)


# ---- cache-level decode at the llama3-8b geometry -----------------------------------------------
class ShapeCaches:
    """Baseline and compressed caches of ``layers`` layers of ``SHAPE``, with one decode step."""

    def __init__(self, lib: Lib, layers: int):
        self.lib, self.layers = lib, layers
        self.scale = SHAPE.head_dim ** -0.5
        if lib.mlx:
            from tq_core.integrations import mlx_lm

            self.base = [mlx_lm.KVCache() for _ in range(layers)]
            self.tq = [mlx_lm.TurboQuantMLXCache(CONFIG, i) for i in range(layers)]
        else:
            from tq_core.integrations import hf

            self.base = hf._cu.DynamicCache()
            self.tq = hf.TurboQuantCache(config=CONFIG)

    def _update(self, cache, k, v, layer):
        if self.lib.mlx:
            return cache[layer].update_and_fetch(k, v)
        return cache.update(k, v, layer)

    def _state(self, cache):
        return [a for c in cache for a in c.state] if self.lib.mlx else []

    def fill(self, context: int) -> None:
        """Write the same ``context`` tokens of random K/V into every layer of both caches."""
        h, d = SHAPE.kv_heads, SHAPE.head_dim
        for layer in range(self.layers):
            k, v = self.lib.randn(1, h, context, d), self.lib.randn(1, h, context, d)
            for cache in (self.base, self.tq):
                self._update(cache, k, v, layer)
            self.lib.done(*self._state(self.base), *self._state(self.tq))

    def step_inputs(self):
        """Random query (32 heads) and one new K/V token per layer, made before the clock starts."""
        h, d = SHAPE.kv_heads, SHAPE.head_dim
        q = self.lib.randn(1, SHAPE.heads, 1, d)
        kv = [(self.lib.randn(1, h, 1, d), self.lib.randn(1, h, 1, d)) for _ in range(self.layers)]
        return q, kv

    def step(self, cache, q, kv):
        """One decode step: per layer, store the new token and attend over what the cache returns."""
        outs = []
        for layer, (k, v) in enumerate(kv):
            keys, values = self._update(cache, k, v, layer)
            if self.lib.mlx:
                o = self.lib.mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale)
            else:
                o = self.lib.torch.nn.functional.scaled_dot_product_attention(
                    q, keys, values, scale=self.scale, enable_gqa=True)
            outs.append(o)
        self.lib.done(*outs, *self._state(cache))
        return outs

    def encoded_tokens(self) -> int:
        if self.lib.mlx:
            return self.tq[0].store.encoded_tokens
        return self.tq.compressed_layers()[0].store.encoded_tokens

    def lengths(self) -> tuple[int, int]:
        if self.lib.mlx:
            return self.base[0].offset, self.tq[0].offset
        return self.base.get_seq_length(0), self.tq.get_seq_length(0)


def test_cache_decode_tokens_per_s(backend, context, layers, tier, benchmark, record):
    lib = Lib(backend)
    caches = ShapeCaches(lib, layers)
    caches.fill(context)
    warm = tier["shape_warmup"]
    base = HandTimer(warm)

    def setup():
        q, kv = caches.step_inputs()
        with base.round():  # interleaved baseline step, same inputs, same synchronization
            caches.step(caches.base, q, kv)
        return (caches.tq, q, kv), {}

    benchmark.group = f"cache decode {SHAPE.name} {backend}"
    outs = benchmark.pedantic(caches.step, setup=setup, rounds=tier["shape_rounds"], warmup_rounds=warm,
                              iterations=1)
    steps = 1 if _median(benchmark) is None else tier["shape_rounds"] + warm
    # Not timing checks: both caches hold every token, the compressed one as codes outside its
    # sinks and window, and attention read all of them (32 query heads).
    assert caches.lengths() == (context + steps, context + steps)
    gates.check_history_encoded(caches.encoded_tokens(), context + steps, CONFIG)
    assert len(outs) == layers and tuple(outs[0].shape) == (1, SHAPE.heads, 1, SHAPE.head_dim)
    med = _median(benchmark)
    if med is None:
        return
    labels = dict(model=SHAPE.name, context=context, layers=layers, dtype=lib.dtype_name, **_conditions(backend))
    tps = {"baseline": 1 / base.median, CONFIG.label: 1 / med}
    for cache_name, value in tps.items():
        gates.check_speed_rate(f"decode_tokens_per_s[{cache_name}]", value)
        record("decode_tokens_per_s", value, "tok/s", cache=cache_name, **labels)
        benchmark.extra_info[f"decode_tokens_per_s[{cache_name}]"] = value
    ratio = tps[CONFIG.label] / tps["baseline"]
    record("speed_ratio", ratio, "x", phase="decode", config=CONFIG.label, **labels)
    # Per layer and token: the cache's overhead over the baseline, in ms (scales to any layer count).
    overhead_ms = (med - base.median) / layers * 1e3
    record("decode_overhead_ms_per_layer", overhead_ms, "ms", config=CONFIG.label, **labels)
    benchmark.extra_info.update(labels, decode_ratio=ratio, decode_overhead_ms_per_layer=overhead_ms)
    _note_load(benchmark, record, backend)
