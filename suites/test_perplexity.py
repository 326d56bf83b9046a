"""Perplexity and KL divergence of the next-token distributions, measured THROUGH the compressed cache.

A single forward pass over a text never reads the cache, so the text is fed through it
(``harness.scoring``, on the backend's host): ``chunk`` tokens at a time, each chunk attending to
the history as the cache holds it. ``chunk=1`` is decode semantics, as in generation: every
scored token attends to the compressed history and to itself. Every compressed scoring is compared, position by
position, with the uncompressed cache of the same backend, tokens and protocol in the same run
(``baseline`` below, computed once per (backend, protocol) and shared by the module's tests).

Text: the first N tokens of ``corpus.text`` under the model's own HF tokenizer (``host.tokenize``;
for mlx-lm the tokenizer its ``TokenizerWrapper`` wraps), no special tokens added.

Recorded per scoring (``scoring.compare``; suite "perplexity"): ppl and ppl_base (± SE, token
NLLs treated as independent), dppl_pct (± paired SE), kld_mean (± SE), kld_median, kld_p99,
kld_p999, kld_max, same_top1_pct (± binomial SE), rms_dp_pct, and what the cache holds at the
end of the text, measured from its arrays (``scoring.held_bytes``): bytes_held,
bits_per_channel (codes + norms + sinks + window over every K and V channel of every token held)
and bits_per_channel_codes (codes + norms over the encoded tokens only, per channel of the layers
the cache encodes). Sinks and window are held in 16 bits (bfloat16 for SmolLM2, a float32 model):
at 511 tokens they are 132 of them and weigh on bits_per_channel (the baseline cache holds 32 bits
per channel). A model whose cache keeps some layers as the host library does (sliding window,
linear attention) counts them in bytes_held (part ``uncompressed``), and is scored from the first
token (no fork from the baseline: a sliding layer no longer holds the tokens a fork would copy).
Labels: config (the config's label), mode, chunk, tokens, sinks, window, model (its id),
baseline="uncompressed cache, same run", extra=<name> for protocol extras. Every quality gate
records ``gate_calibrated`` (1: checked against the band of the model's calibration table for this
config, protocol and backend; 0: only the model-independent check ran) and ``calibration`` (the
table, or ``none``). Protocols longer than the model's context are skipped.

Tiers. Costs on the 2-core CPU box (torch on one thread: every scoring runs inside
``host.threads(1)``; MLX with the system OpenBLAS that ``harness.blas`` loads for it): one
decode step of SmolLM2-135M is ~62 ms in torch (it streams 540 MB of float32 weights); a
compressed step ~25-40 ms more (encode the token leaving the window, decode the whole history);
mlx steps 0.1-0.25 s. (An ``LD_PRELOAD`` of OpenBLAS would take over torch's sgemv too and make
its steps ~1.4x slower; ``harness.blas`` avoids that.) A compressed decode takes its first
sinks + window = 132 positions from the baseline exactly (``scoring.logprobs(fork_from=...)``).
Under the usual load of other jobs everything takes 1.5-3x longer.

* default (budget 120 s; measured 78 s on a fresh clone, the K4V2 decode scoring 48 s of it):
  - torch-cpu: decode semantics at 384 tokens: baseline + the headline K4V2 (4 sinks + 128
    window; 251 positions read codes). Chunk 64 at 512 tokens (8 forwards each, cheap): K4V2,
    plain K4V2 (no sinks, no window; two-sided: far above the noise floor), plain K4V2 in
    simulated mode. Noise floor: baseline decode vs one pass.
  - mlx, 512 tokens: K4V2 at chunk 64 (the same gates as torch: the two agree to 4 digits),
    and the cross-backend floor: one pass vs torch-cpu (gate: baseline PPL within 0.5 %).
  - torch-cuda (decode steps are cheap on a GPU): every config of the tier at decode semantics
    and chunk 64, plain and simulated both ways.
  - llama-cpp: its two floors, decode vs one pass and one pass vs torch-cpu (bands of its own:
    ``gates.LIB_FLOORS``); llama.cpp's cache types (``fixtures.configs.LLAMACPP_PEERS``) run nightly,
    each against llama.cpp's f16 cache, and everything of TurboQuant skips there.
  Other configs and protocols are skipped in the default tier, each with its reason. (512-token
  decode, the README's table, costs ~20 s more than 384: nightly, ``test_headline``.)
* nightly (~26 min torch-cpu, ~33 min mlx under load): 1024 tokens, every backend, every config
  (``fixtures.configs`` nightly tier) at decode semantics and at chunk 64; the extras: plain K4V2
  at decode semantics (the headline comparison the issue quotes), simulated mode (plain and
  default K4V2, decode and chunk 64), the decode-vs-one-pass floor on every backend, the
  cross-backend floor at 1024 tokens; and ``test_headline``: K4V2 at 512 tokens, decode
  semantics, gated on the README's numbers.

Gates (``suites/gates.py``, perplexity section; bands per model in ``suites/calibration/``) are
two-sided where a result can be too good:
a compressed cache whose KLD sits at the noise floor is not being read. The goal (K4V2 default,
decode semantics: ΔPPL <= +2 % and mean KLD <= 0.015) is recorded as ``goal_met`` (1/0), beside
bits_per_channel; it is a target, not a gate.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fixtures import configs as registry
from fixtures import targets
from harness import hosts, scoring
from tq_core import methods
from harness.scoring import Protocol
from suites import gates

BASELINE_LABEL = "uncompressed cache, same run"
CHUNK = 64  # the chunked protocol extra
THREADS = 1  # torch CPU threads while scoring (see the module docstring; no-op on other hosts)

# Tokens scored, per tier: decode semantics (chunk=1), the chunk-64 extras, and the one-pass
# cross-backend floor. Every backend scores the same tokens, so results compare across backends.
TOKENS = {"default": 512, "nightly": 1024}
# Decode semantics (chunk=1) in the default tier scores 384 tokens, which keeps the whole default
# tier near 3.5 min on 2 cores with room for slower CI machines. The 512-token headline (the
# README's table) runs nightly (test_headline).
DECODE_TOKENS = {"default": 384, "nightly": 1024}
HEADLINE_TOKENS = 512


def tokens_for(tier: str, chunk: int) -> int:
    return DECODE_TOKENS[tier] if chunk == 1 else TOKENS[tier]


# What the default tier runs on each backend, configs by label; everything else of this module is
# nightly only. torch-cpu: the headline decode scoring + the cheap chunk-64 extras. mlx on CPU: a
# decode step costs 0.1-0.25 s there, so decode semantics is nightly; the default tier checks its
# compressed scoring at chunk 64 against the same gates as torch, plus the one-pass floor. A GPU
# makes decode steps cheap: torch-cuda runs the whole default-tier protocol set.
_TIER_CONFIGS = tuple(registry.TIERS["default"])
DEFAULT_RUNS = {
    "torch-cpu": {"decode": (registry.DEFAULT.label,), "chunked": (registry.DEFAULT.label,), "plain": (CHUNK,),
                  "simulated": ((CHUNK, "plain"),), "decode_floor": True},
    "mlx": {"decode": (), "chunked": (registry.DEFAULT.label,), "plain": (), "simulated": (), "decode_floor": False},
    "torch-cuda": {"decode": _TIER_CONFIGS, "chunked": _TIER_CONFIGS, "plain": (1, CHUNK),
                   "simulated": ((1, "plain"), (1, "default"), (CHUNK, "plain"), (CHUNK, "default")),
                   "decode_floor": True},
    # llama.cpp's cache types are nightly peers; the default tier checks its floors (~10 s).
    "llama-cpp": {"decode": (), "chunked": (), "plain": (), "simulated": (), "decode_floor": True},
}
WHY_NIGHTLY = {
    "decode": "decode semantics costs 30-45 s per config on 2 CPU cores (torch), more on mlx",
    "chunked": "time budget of the default tier",
    "plain": "plain K4V2 at decode semantics costs ~45 s on 2 CPU cores",
    "simulated": "time budget of the default tier",
    "decode_floor": "needs an mlx decode-semantics baseline (nightly)",
}


def default_tier_runs(tier: str, backend: str, kind: str, item=True) -> None:
    """Skip (with the reason) what the default tier does not run on ``backend``."""
    if tier != "default":
        return
    runs = DEFAULT_RUNS.get(backend, {}).get(kind, ())
    if not (runs if isinstance(runs, bool) else item in runs):
        pytest.skip(f"default tier, {backend}: {kind} {item if item is not True else ''} runs nightly only "
                    f"({WHY_NIGHTLY[kind]}); --tq-tier nightly runs it")


GOAL_DPPL_PCT = 2.0  # the project goal for K4/V2 default at decode semantics (not a gate)
GOAL_KLD = 0.015
BASELINE_BYTES = 3 << 30  # baseline log-probs kept for reuse within a module (at least the newest one)
REFERENCE = "torch-cpu"  # cross-backend noise floor: every other backend against this one
REUSED = (registry.DEFAULT.label, registry.PLAIN.label)  # cache-mode results kept for test_simulated


# ---- scoring, kept per module -------------------------------------------------------------------
class Scorer:
    """Token ids and baselines, computed once per (backend, protocol) for the whole module."""

    def __init__(self, load_model, corpus, spec, model: dict | None = None):
        self.load_model, self.corpus, self.spec = load_model, corpus, spec
        self.model = model if model is not None else {"id": spec.name}  # what the gates look up
        self._ids: dict = {}
        self._base: dict = {}
        self._comp: dict = {}

    def ids(self, backend: str, n: int) -> list[int]:
        if n > self.spec.max_context:
            pytest.skip(f"{self.spec.name} takes at most {self.spec.max_context} positions, the protocol scores {n}")
        host = hosts.get(backend)
        key = (host.lib, n)
        if key not in self._ids:
            m = self.load_model(backend)
            text = self.corpus.text
            for chars in (n * 8, n * 32, None):  # ~3.5 chars per token here; no need to tokenize 465 kB
                ids = host.tokenize(m, text if chars is None else text[:chars])
                if len(ids) > n or chars is None or chars >= len(text):
                    break
            if len(ids) < n:
                pytest.skip(f"the corpus has {len(ids)} tokens, the protocol needs {n}")
            self._ids[key] = [int(i) for i in ids[:n]]
        return self._ids[key]

    def score(self, backend: str, config, protocol: Protocol, **kw):
        """(log-probs, cache, seconds) of one scoring, on ``THREADS`` torch CPU threads."""
        host = hosts.get(backend)
        m = self.load_model(backend)
        ids = self.ids(backend, protocol.tokens)
        with host.threads(THREADS):
            t0, c0 = time.perf_counter(), time.process_time()
            lp, cache = scoring.logprobs(host, m, ids, config, protocol, return_cache=True, **kw)
            host.sync()
            secs = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
        return lp, cache, secs

    def baseline(self, backend: str, protocol: Protocol):
        """(log-probs, cache, seconds) of the uncompressed cache, once per (backend, protocol) while
        the kept ones fit ``BASELINE_BYTES`` (the least recently used go first: a 262k-token
        vocabulary makes each 1 GiB at 1024 tokens)."""
        key = (backend, protocol)
        if key in self._base:
            self._base[key] = self._base.pop(key)  # most recently used last
            return self._base[key]
        out = self.score(backend, None, protocol)
        while self._base and sum(v[0].nbytes for v in self._base.values()) + out[0].nbytes > BASELINE_BYTES:
            self._base.pop(next(iter(self._base)))
        self._base[key] = out
        return out

    def compressed(self, backend: str, config, protocol: Protocol):
        """(comparison with the baseline of the same run and protocol, log-probs, cache, seconds).

        Results of the configs in ``REUSED`` are kept (the simulated-mode test compares with them).
        """
        key = (backend, config.label, protocol)
        if key in self._comp:
            return self._comp[key]
        base_lp, base_cache, _ = self.baseline(backend, protocol)
        # A model with layers the cache keeps as the host library does (sliding window, ...) is
        # scored from the start: a sliding layer no longer holds the tokens a fork would copy.
        fork = None if self.spec.mixed else (base_lp, base_cache)
        lp, cache, secs = self.score(backend, config, protocol, fork_from=fork)
        ids = self.ids(backend, protocol.tokens)
        out = scoring.compare(base_lp, lp, ids), lp, cache, secs
        if config.label in REUSED:
            self._comp[key] = out
        return out

    def clear(self) -> None:
        self._base.clear()
        self._comp.clear()


@pytest.fixture(scope="module")
def scorer(load_model, corpus, real_spec, model_info):
    s = Scorer(load_model, corpus, real_spec, model_info)
    yield s
    s.clear()


# ---- recording ----------------------------------------------------------------------------------
def protocol_labels(config, protocol: Protocol, spec, **extra) -> dict:
    return dict(config=config.label if config is not None else "baseline", mode=protocol.mode,
                chunk=protocol.chunk, tokens=protocol.tokens,
                sinks=None if config is None else config.sinks, window=None if config is None else config.window,
                baseline=BASELINE_LABEL, model=spec.name, **extra)


def record_comparison(record, cmp: dict, labels: dict) -> None:
    record("ppl", cmp["ppl"], error=cmp["ppl_se"], **labels)
    record("ppl_base", cmp["ppl_base"], error=cmp["ppl_base_se"], **labels)
    record("dppl_pct", cmp["dppl_pct"], "%", error=cmp["dppl_pct_se"], **labels)
    record("kld_mean", cmp["kld_mean"], "nats", error=cmp["kld_se"], **labels)
    for m in ("kld_median", "kld_p99", "kld_p999", "kld_max"):
        record(m, cmp[m], "nats", **labels)
    record("same_top1_pct", cmp["same_top1_pct"], "%", error=cmp["same_top1_pct_se"], **labels)
    record("rms_dp_pct", cmp["rms_dp_pct"], "%", **labels)
    record("positions_scored", cmp["tokens"], "token", **labels)


def record_held(record, host, cache, config, labels: dict, base_cache=None, spec=None) -> dict:
    """What the cache holds at the end, by part, from its arrays: layers it keeps uncompressed (a
    model's sliding-window or linear-attention layers) count in bytes held (part ``uncompressed``).
    ``spec``: the model, whose full-attention layers every host's cache must encode."""
    held = scoring.held_bytes(host, cache)
    try:
        stores = host.stores(cache)
    except hosts.Unsupported:
        stores = None  # the host library holds the cache itself (llama.cpp): its types cover every layer
    peer = methods.get(config.method).peer  # another project's cache: its host library built it
    if spec is not None and stores is not None and not peer:
        assert len(stores) >= len(spec.full_layers), (
            f"the cache encodes {len(stores)} layers; {spec.name} has {len(spec.full_layers)} full-attention layers")
    fp = min(held["tokens"], config.sinks + config.window)
    # A peer's residual window is not a fixed size (transformers flushes it whole): its host counts
    # the tokens it holds quantized from its tensors.
    enc = held["encoded"] if peer and "encoded" in held else held["tokens"] - fp
    record("bytes_held", held["total"], "B", **labels)
    record("bits_per_channel", held["bits_per_channel"], "bit", **labels)
    if enc and stores:
        # What the method stores per encoded token (TurboQuant: codes + norms), from its codecs'
        # fields, per channel of the layers it encodes.
        fields = {f for s in stores for c in (s.codec_k, s.codec_v) for f in c.fields()}
        channels = sum(s.kv_heads * (s.codec_k.dim + s.codec_v.dim) for s in stores)
        codes_bits = sum(held.get(f, 0) for f in fields) * 8 / (enc * channels)
        record("bits_per_channel_codes", codes_bits, "bit", **labels)
    elif enc and peer and "encoded" in held and not held.get("uncompressed"):
        # a peer's quantized tokens: codes + scales + zero points, per channel of every layer
        codes_bits = sum(held.get(p, 0) for p in ("codes", "scales", "zeros")) * 8 / (enc * held["channels"])
        record("bits_per_channel_codes", codes_bits, "bit", **labels)
    for part in ("codes", "norms", "scales", "zeros", "residual", "sinks", "window", "centers", "other", "spare",
                 "uncompressed"):
        if part in held:
            record(f"bytes_{part}", held[part], "B", **labels)
    if base_cache is not None:
        base = scoring.held_bytes(host, base_cache)
        record("bytes_baseline_cache", base["total"], "B", **labels)
        record("bits_per_channel_baseline", base["bits_per_channel"], "bit", **labels)
    record("tokens_held", held["tokens"], "token", **labels)
    record("tokens_encoded", enc, "token", **labels)
    return held


def record_seconds(record, secs: dict, labels: dict) -> None:
    record("scoring_seconds", secs["wall"], "s", **labels)
    record("scoring_cpu_seconds", secs["cpu"], "s", **labels)


def check(record, label: str, cmp: dict, labels: dict, *, chunk: int, backend: str, model: dict,
          mode: str = "cache") -> None:
    """The perplexity gate of one scoring (bands from ``model``'s calibration table), and whether a
    measured band was there to check it."""
    status = gates.check_perplexity(label, cmp, chunk=chunk, backend=backend, mode=mode, model=model)
    if status == gates.MEASURED:
        return  # a peer's cache: measured and reported, never gated (no band, no gate record)
    record("gate_calibrated", 1.0 if status == "calibrated" else 0.0, "bool", gate="perplexity",
           calibration=gates.calibration(model), **labels)


def measure(scorer, backend, config, protocol, record, *, extra=None):
    """Score, compare with the baseline, record everything, return (comparison, held bytes, labels)."""
    cmp, _, cache, secs = scorer.compressed(backend, config, protocol)
    labels = protocol_labels(config, protocol, scorer.spec, **({"extra": extra} if extra else {}))
    record_comparison(record, cmp, labels)
    base_cache = scorer.baseline(backend, protocol)[1]
    held = record_held(record, hosts.get(backend), cache, config, labels, base_cache, scorer.spec)
    record_seconds(record, secs, labels)
    assert held["tokens"] == protocol.tokens - 1, f"cache holds {held['tokens']} tokens, fed {protocol.tokens - 1}"
    return cmp, held, labels


# ---- decode semantics: every config of the tier -------------------------------------------------
def record_goal(record, cmp: dict, held: dict, labels: dict) -> None:
    """The project goal for K4/V2 default under decode semantics (a target, not a gate)."""
    met = cmp["dppl_pct"] <= GOAL_DPPL_PCT and cmp["kld_mean"] <= GOAL_KLD
    record("goal_met", float(met), "bool", goal=f"dppl_pct <= {GOAL_DPPL_PCT} and kld_mean <= {GOAL_KLD}",
           bits_per_channel=round(held["bits_per_channel"], 4), **labels)


def test_perplexity(backend, cache_config, tier, scorer, record):
    default_tier_runs(tier, backend, "decode", cache_config.label)
    protocol = Protocol(tokens_for(tier, 1), 1)
    cmp, held, labels = measure(scorer, backend, cache_config, protocol, record)
    if cache_config.label == registry.DEFAULT.label:
        record_goal(record, cmp, held, labels)
    check(record, cache_config.label, cmp, labels, chunk=1, backend=backend, model=scorer.model)


@pytest.mark.nightly
def test_headline(backend, scorer, record):
    """K4V2 default at 512 tokens, decode semantics: the README's numbers, gated as measured."""
    config = registry.DEFAULT
    protocol = Protocol(HEADLINE_TOKENS, 1)
    cmp, held, labels = measure(scorer, backend, config, protocol, record, extra="headline")
    record_goal(record, cmp, held, labels)
    check(record, config.label, cmp, labels, chunk=1, backend=backend, model=scorer.model)


# ---- protocol extras ----------------------------------------------------------------------------
def test_perplexity_chunked(backend, cache_config, tier, scorer, record):
    """Chunks of 64 tokens (each attends to itself in full precision): cheap, so the whole tier."""
    default_tier_runs(tier, backend, "chunked", cache_config.label)
    protocol = Protocol(tokens_for(tier, CHUNK), CHUNK)
    cmp, _, labels = measure(scorer, backend, cache_config, protocol, record, extra=f"chunk{CHUNK}")
    check(record, cache_config.label, cmp, labels, chunk=CHUNK, backend=backend, model=scorer.model)


@pytest.mark.parametrize("chunk", [1, CHUNK], ids=lambda v: f"chunk={v}")
def test_plain(backend, chunk, tier, scorer, record):
    """K4V2 with no sinks and no window: what the codes alone cost (the headline comparison).

    Two-sided: its KLD must sit well above the noise floor (every position but the first reads
    codes) and near the measured value.
    """
    default_tier_runs(tier, backend, "plain", chunk)
    config = registry.PLAIN
    protocol = Protocol(tokens_for(tier, chunk), chunk)
    cmp, held, labels = measure(scorer, backend, config, protocol, record, extra="plain")
    assert held["sinks"] == held["window"] == 0
    check(record, config.label, cmp, labels, chunk=chunk, backend=backend, model=scorer.model)


@pytest.mark.parametrize("variant", ["plain", "default"], ids=lambda v: f"variant={v}")
@pytest.mark.parametrize("chunk", [1, CHUNK], ids=lambda v: f"chunk={v}")
def test_simulated(backend, chunk, variant, tier, scorer, record):
    """Simulated mode: every K/V is quantized before attention, the step's own tokens included.

    Checked first: the mode took effect (the scoring differs from cache mode on the same
    protocol); only then is it recorded against the baseline. Plain K4V2 shows it clearly: in
    cache mode a chunk attends to itself in full precision, here to its own codes. With the
    default sinks and window a new token is stored in the full-precision window, so simulated and
    cache mode differ only by the token leaving the window one step earlier.
    """
    default_tier_runs(tier, backend, "simulated", (chunk, variant))
    config = registry.PLAIN if variant == "plain" else registry.DEFAULT
    n = tokens_for(tier, chunk)
    cache_cmp, cache_lp, _, _ = scorer.compressed(backend, config, Protocol(n, chunk))
    protocol = Protocol(n, chunk, "simulated")
    base_lp = scorer.baseline(backend, Protocol(n, chunk))[0]
    lp, cache, secs = scorer.score(backend, config, protocol)
    ids = scorer.ids(backend, n)
    diff = float(np.abs(lp - cache_lp).max())
    assert diff > 1e-4, (f"simulated mode gave the cache-mode log-probs (max |diff| {diff:.2g}): "
                         "the simulate flag does not reach the layer stores")
    cmp = scoring.compare(base_lp, lp, ids)  # the baseline does not depend on the mode
    labels = protocol_labels(config, protocol, scorer.spec, extra="simulated")
    record_comparison(record, cmp, labels)
    record("kld_vs_cache_mode", scoring.compare(cache_lp, lp, ids)["kld_mean"], "nats", **labels)
    record("max_abs_dlogprob_vs_cache_mode", diff, "nats", **labels)
    record_held(record, hosts.get(backend), cache, config, labels, spec=scorer.spec)
    record_seconds(record, secs, labels)
    # Quantizing a chunk's own K/V too can only add error on top of cache mode (plain: clearly).
    if variant == "plain":
        assert cmp["kld_mean"] > cache_cmp["kld_mean"], (
            f"simulated KLD {cmp['kld_mean']:.4g} <= cache-mode KLD {cache_cmp['kld_mean']:.4g}")
    check(record, config.label, cmp, labels, chunk=chunk, backend=backend, model=scorer.model, mode="simulated")


# ---- noise floors -------------------------------------------------------------------------------
def test_noise_floor_decode_vs_one_pass(backend, tier, scorer, record):
    """The uncompressed cache fed one token at a time vs one forward pass: float rounding only."""
    default_tier_runs(tier, backend, "decode_floor")
    n = tokens_for(tier, 1)
    decode = Protocol(n, 1)
    one = Protocol(n, n)
    dec_lp = scorer.baseline(backend, decode)[0]
    one_lp = scorer.baseline(backend, one)[0]
    cmp = scoring.compare(one_lp, dec_lp, scorer.ids(backend, n))
    labels = dict(config="baseline", tokens=n, chunk=1, reference="one pass, same backend", model=scorer.spec.name,
                  baseline="uncompressed cache, one forward pass, same run")
    record("noise_kld_mean", cmp["kld_mean"], "nats", error=cmp["kld_se"], **labels)
    record("noise_kld_max", cmp["kld_max"], "nats", **labels)
    record("noise_dppl_pct", cmp["dppl_pct"], "%", error=cmp["dppl_pct_se"], **labels)
    record("noise_same_top1_pct", cmp["same_top1_pct"], "%", **labels)
    record("noise_max_abs_dlogprob", float(np.abs(dec_lp - one_lp).max()), "nats", **labels)
    gates.check_decode_noise_floor(cmp, hosts.get(backend).lib)


def test_noise_floor_cross_backend(backend, tier, scorer, record):
    """One forward pass of the uncompressed model on this backend vs on torch-cpu (same token ids)."""
    if backend == REFERENCE:
        pytest.skip(f"{REFERENCE} is the reference the other backends are compared with")
    missing = targets.missing_reason(REFERENCE)
    if missing:
        pytest.skip(f"cross-backend noise floor needs the reference: {missing}")
    n = TOKENS[tier]
    one = Protocol(n, n)
    ids = scorer.ids(backend, n)
    assert scorer.ids(REFERENCE, n) == ids, "the two backends' tokenizers give different ids"
    ref_lp = scorer.baseline(REFERENCE, one)[0]
    lp = scorer.baseline(backend, one)[0]
    cmp = scoring.compare(ref_lp, lp, ids)
    labels = dict(config="baseline", tokens=n, chunk=n, reference=REFERENCE, model=scorer.spec.name,
                  baseline=f"uncompressed cache on {REFERENCE}, one forward pass, same run")
    record("cross_ppl", cmp["ppl"], error=cmp["ppl_se"], **labels)
    record("cross_ppl_reference", cmp["ppl_base"], error=cmp["ppl_base_se"], **labels)
    record("cross_dppl_pct", cmp["dppl_pct"], "%", error=cmp["dppl_pct_se"], **labels)
    record("cross_kld_mean", cmp["kld_mean"], "nats", error=cmp["kld_se"], **labels)
    record("cross_kld_max", cmp["kld_max"], "nats", **labels)
    record("cross_same_top1_pct", cmp["same_top1_pct"], "%", **labels)
    record("cross_max_abs_dlogprob", float(np.abs(lp - ref_lp).max()), "nats", **labels)
    gates.check_cross_backend(cmp["ppl_base"], cmp["ppl"], hosts.get(backend).lib)
    gates.check_cross_backend_kld(cmp["kld_mean"], hosts.get(backend).lib)
