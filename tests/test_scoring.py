"""harness.scoring: the comparison statistics on synthetic log-probs, and scoring through a cache.

The statistics tests build log-prob arrays by hand, so every expected number is known in closed
form. The cache tests use a tiny random Llama (2 layers, head_dim 32), not the real model, so they
take about a second: transformers' through the torch-cpu host, mlx-lm's through the mlx host
(``harness.hosts``), each wrapped in a ``hosts.Model``.

A compressed cache holds sinks and window in 16 bits (``tq_core.kvstore``): a 16-bit model's exactly
as computed, a float32 model's rounded to bfloat16. So the checks that a compressed cache which
never encodes anything (or a fork from the baseline) computes exactly what the baseline does use the
tiny models in bfloat16 (``tiny16``, ``tiny_mlx16``); float32 models do not fork.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import hosts, scoring
from harness.scoring import Protocol
from tq_core import CacheConfig


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture
def synthetic():
    """(log-probs (n, vocab), ids (n + 1,)) of a random text, float32 like a real scoring."""
    rng = np.random.default_rng(0)
    n, vocab = 400, 50
    lp = _log_softmax(rng.normal(scale=2.0, size=(n, vocab))).astype(np.float32)
    ids = rng.integers(0, vocab, size=n + 1)
    return lp, ids


# ---- perplexity ---------------------------------------------------------------------------------
def test_perplexity_of_uniform_is_vocab():
    vocab, n = 37, 20
    lp = np.full((n, vocab), -math.log(vocab), dtype=np.float32)
    ids = np.arange(n + 1) % vocab
    p = scoring.perplexity(lp, ids)
    assert p["ppl"] == pytest.approx(vocab, rel=1e-6)
    assert p["ppl_se"] == pytest.approx(0.0, abs=1e-4)
    assert p["tokens"] == n
    assert p["nll"] == pytest.approx(math.log(vocab), rel=1e-6)


def test_perplexity_reads_the_next_token(synthetic):
    lp, ids = synthetic
    nll = -np.array([lp[i, ids[i + 1]] for i in range(len(lp))], dtype=np.float64)
    p = scoring.perplexity(lp, ids)
    assert p["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-9)
    assert p["ppl_se"] == pytest.approx(math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(len(nll)), rel=1e-9)


# ---- compare ------------------------------------------------------------------------------------
def test_compare_identical_is_exact(synthetic):
    lp, ids = synthetic
    c = scoring.compare(lp, lp.copy(), ids)
    assert c["tokens"] == len(lp)
    assert c["kld_mean"] == pytest.approx(0.0, abs=1e-12)
    assert c["kld_max"] == pytest.approx(0.0, abs=1e-12)
    assert c["kld_se"] == pytest.approx(0.0, abs=1e-12)
    assert c["ppl_ratio"] == 1.0
    assert c["dppl_pct"] == 0.0
    assert c["ppl_ratio_se"] == 0.0
    assert c["same_top1_pct"] == 100.0
    assert c["same_top1_pct_se"] == 0.0
    assert c["rms_dp_pct"] == 0.0
    assert c["ppl"] == c["ppl_base"]


def test_compare_known_kld_of_a_mixture():
    """test = (1 - eps) base + eps uniform: KLD, PPL ratio and top-1 are known in closed form."""
    vocab, n, eps = 8, 6, 0.2
    rng = np.random.default_rng(1)
    base_p = rng.dirichlet(np.ones(vocab), size=n)
    test_p = (1 - eps) * base_p + eps / vocab
    base, test = np.log(base_p), np.log(test_p)
    ids = rng.integers(0, vocab, size=n + 1)
    c = scoring.compare(base, test, ids)
    kld = (base_p * (base - test)).sum(-1)
    assert c["kld_mean"] == pytest.approx(kld.mean(), rel=1e-12)
    assert c["kld_max"] == pytest.approx(kld.max(), rel=1e-12)
    assert c["kld_median"] == pytest.approx(np.median(kld), rel=1e-12)
    t = ids[1:]
    diff = np.log(base_p[np.arange(n), t]) - np.log(test_p[np.arange(n), t])
    assert c["ppl_ratio"] == pytest.approx(math.exp(diff.mean()), rel=1e-12)
    # Mixing with uniform keeps the argmax: top-1 agrees everywhere.
    assert c["same_top1_pct"] == 100.0


def test_compare_shifted_logits_known_kld():
    """Two-token distributions with logits shifted by d: KLD = p log(p/q) + (1-p) log((1-p)/(1-q))."""
    n, d = 10, 1.5
    base = _log_softmax(np.tile([0.0, 1.0], (n, 1)))
    test = _log_softmax(np.tile([0.0, 1.0 - d], (n, 1)))  # flips the argmax
    ids = np.ones(n + 1, dtype=int)
    p, q = np.exp(base[0, 1]), np.exp(test[0, 1])
    expect = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    c = scoring.compare(base, test, ids)
    assert c["kld_mean"] == pytest.approx(expect, rel=1e-12)
    assert c["kld_p99"] == pytest.approx(expect, rel=1e-12)
    assert c["same_top1_pct"] == 0.0
    # Every token is the same: the ratio is exact and the paired SE is zero.
    assert c["ppl_ratio"] == pytest.approx(p / q, rel=1e-12)
    assert c["dppl_pct"] == pytest.approx((p / q - 1) * 100, rel=1e-10)
    assert c["ppl_ratio_se"] == pytest.approx(0.0, abs=1e-12)
    assert c["rms_dp_pct"] == pytest.approx(abs(q - p) * 100, rel=1e-10)


def test_compare_half_top1_binomial_se():
    n = 100
    base = _log_softmax(np.tile([0.0, 1.0], (n, 1)))
    test = base.copy()
    test[: n // 2] = _log_softmax(np.tile([1.0, 0.0], (n // 2, 1)))
    c = scoring.compare(base, test, np.zeros(n + 1, dtype=int))
    assert c["same_top1_pct"] == 50.0
    assert c["same_top1_pct_se"] == pytest.approx(math.sqrt(0.25 / n) * 100)


def test_compare_rejects_shape_mismatch(synthetic):
    lp, ids = synthetic
    with pytest.raises(ValueError, match="same shape"):
        scoring.compare(lp, lp[:-1], ids)


def test_protocol_validates():
    with pytest.raises(ValueError, match="tokens"):
        Protocol(tokens=0)
    with pytest.raises(ValueError, match="chunk"):
        Protocol(chunk=True)
    with pytest.raises(ValueError, match="mode"):
        Protocol(mode="fast")
    assert "decode semantics" in Protocol(16, 1).describe()


# ---- scoring through a cache (tiny random Llama) ------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch on one CPU thread (``harness.scoring`` leaves threads to its caller): many tiny ops per
    step, and a shared 2-core box makes the default pool wait in barriers."""
    from fixtures import targets

    if targets.missing_reason("torch-cpu"):
        yield
        return
    with hosts.get("torch-cpu").threads(1):
        yield


@pytest.fixture(scope="module")
def tiny():
    """(torch-cpu host, hosts.Model of a tiny random transformers Llama, token ids)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from harness.identity import geometry

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    return hosts.get("torch-cpu"), hosts.Model(model, None, None, geometry(cfg)), ids


@pytest.fixture(scope="module")
def tiny16(tiny):
    """``tiny`` in bfloat16 (a copy; same weights rounded, same ids): a compressed cache holds its
    sinks and window exactly as computed."""
    import copy

    import torch

    host, m, ids = tiny
    model = copy.deepcopy(m.model).to(torch.bfloat16)
    m16 = hosts.Model(model, None, None, m.geometry)
    assert host.holds_window_exactly(m16) and not host.holds_window_exactly(m)
    return host, m16, ids


def _count_forks(monkeypatch, host) -> list:
    """Wrap ``host.fork`` (this test only): the list receives the ``upto`` of every fork."""
    calls, original = [], host.fork

    def fork(m, base_cache, config, upto=None, reserve=0):
        calls.append(upto)
        return original(m, base_cache, config, upto=upto, reserve=reserve)

    monkeypatch.setattr(host, "fork", fork)
    return calls


def test_baseline_chunked_equals_single_pass(tiny):
    host, m, ids = tiny
    single = scoring.logprobs(host, m, ids, None, Protocol(len(ids), len(ids)))
    for chunk in (1, 5):
        lp = scoring.logprobs(host, m, ids, None, Protocol(len(ids), chunk))
        assert lp.shape == single.shape == (len(ids) - 1, m.model.config.vocab_size)
        np.testing.assert_allclose(lp, single, atol=2e-5)
        assert scoring.compare(single, lp, ids)["kld_mean"] < 1e-6  # float32 rounding only


def test_decode_through_compressed_cache_differs_from_single_pass(tiny):
    host, m, ids = tiny
    single = scoring.logprobs(host, m, ids, None, Protocol(len(ids), len(ids)))
    config = CacheConfig(bits_k=4, bits_v=2, sinks=0, window=0)
    lp = scoring.logprobs(host, m, ids, config, Protocol(len(ids), 1))
    c = scoring.compare(single, lp, ids)
    # The first position reads no history, so it matches; later ones read the codes.
    np.testing.assert_allclose(lp[0], single[0], atol=2e-5)
    assert c["kld_mean"] > 1e-5
    assert np.abs(lp[1:] - single[1:]).max() > 1e-3


def test_one_chunk_never_reads_the_cache(tiny):
    """A single chunk attends to itself in full precision: compressed == baseline exactly."""
    host, m, ids = tiny
    single = scoring.logprobs(host, m, ids, None, Protocol(len(ids), len(ids)))
    lp = scoring.logprobs(host, m, ids, CacheConfig(sinks=0, window=0), Protocol(len(ids), len(ids)))
    np.testing.assert_allclose(lp, single, atol=2e-5)


def test_window_covers_history_matches_baseline(tiny16):
    """Sinks + window longer than the text: nothing is ever encoded, decode equals the baseline
    (a 16-bit model: the window holds its K/V exactly as computed)."""
    host, m, ids = tiny16
    base = scoring.logprobs(host, m, ids, None, Protocol(len(ids), 1))
    lp = scoring.logprobs(host, m, ids, CacheConfig(sinks=4, window=len(ids)), Protocol(len(ids), 1))
    np.testing.assert_allclose(lp, base, atol=2e-5)


def test_window_covers_history_float32_model_differs_by_rounding_only(tiny):
    """A float32 model's window is held in bfloat16: nothing is encoded, and the scoring differs
    from the baseline by that rounding only (measured KLD 2e-8, max |d logprob| 8e-4)."""
    host, m, ids = tiny
    base = scoring.logprobs(host, m, ids, None, Protocol(len(ids), 1))
    lp = scoring.logprobs(host, m, ids, CacheConfig(sinks=4, window=len(ids)), Protocol(len(ids), 1))
    np.testing.assert_allclose(lp[0], base[0], atol=2e-5)  # the first token reads only itself
    assert np.abs(lp - base).max() > 0  # the window really is rounded
    assert scoring.compare(base, lp, ids)["kld_mean"] < 1e-6


def test_return_cache_reports_held_bytes(tiny):
    host, m, ids = tiny
    n = len(ids)
    config = CacheConfig(bits_k=4, bits_v=2, sinks=2, window=8)
    lp, cache = scoring.logprobs(host, m, ids, config, Protocol(n, 1), return_cache=True)
    held = scoring.held_bytes(host, cache)
    # n - 1 tokens were fed (the last one is never scored); 2 sinks + 8 window held in 16 bits
    # (bfloat16: 2 bytes) although the model computes in float32.
    cfg = m.model.config
    heads_layers = cfg.num_hidden_layers * cfg.num_key_value_heads
    enc = (n - 1) - 10
    per_vec = 32 * 4 // 8 + 32 * 2 // 8 + 2 * 2
    assert held["total"] == heads_layers * (enc * per_vec + 10 * 32 * 2 * 2)
    assert held["tokens"] == n - 1
    base_lp, base_cache = scoring.logprobs(host, m, ids, None, Protocol(n, 1), return_cache=True)
    assert scoring.held_bytes(host, base_cache)["total"] == heads_layers * (n - 1) * 32 * 2 * 4


@pytest.mark.parametrize("config, chunk", [(CacheConfig(sinks=2, window=8), 1), (CacheConfig(sinks=2, window=8), 4),
                                           (CacheConfig(sinks=0, window=0), 1)],
                         ids=["s2w8-chunk1", "s2w8-chunk4", "plain-chunk1"])
def test_fork_from_baseline_is_exact(tiny16, config, chunk, monkeypatch):
    """Starting the compressed cache from the baseline's first sinks+window K/V changes nothing
    (a 16-bit model, whose sinks and window the cache holds exactly as computed)."""
    host, m, ids = tiny16
    p = Protocol(len(ids), chunk)
    base = scoring.logprobs(host, m, ids, None, p, return_cache=True)
    full = scoring.logprobs(host, m, ids, config, p)
    forks = _count_forks(monkeypatch, host)
    forked = scoring.logprobs(host, m, ids, config, p, fork_from=base)
    f = scoring.fork_point(config, p)
    assert f == (min(config.sinks + config.window, len(ids) - 1) // chunk) * chunk
    assert forks == ([f] if f else [])  # it really forked (where there is anything to skip)
    np.testing.assert_array_equal(forked, full)


@pytest.mark.parametrize("chunk", [1, 4])
def test_float32_model_scoring_does_not_fork(tiny, chunk, monkeypatch):
    """A float32 model's sinks and window are held in bfloat16, not as the baseline computed them:
    ``fork_from`` is ignored, and the scoring is exactly the unforked one."""
    host, m, ids = tiny
    config, p = CacheConfig(sinks=2, window=8), Protocol(len(ids), chunk)
    assert not host.holds_window_exactly(m)
    assert scoring.fork_point(config, p) > 0  # a 16-bit model would fork here
    base = scoring.logprobs(host, m, ids, None, p, return_cache=True)
    full = scoring.logprobs(host, m, ids, config, p)
    forks = _count_forks(monkeypatch, host)
    forked = scoring.logprobs(host, m, ids, config, p, fork_from=base)
    assert forks == []
    np.testing.assert_array_equal(forked, full)


def test_fork_from_rejects_a_foreign_baseline(tiny):
    host, m, ids = tiny
    p = Protocol(len(ids), 1)
    base = scoring.logprobs(host, m, ids[:-4], None, Protocol(len(ids) - 4, 1), return_cache=True)
    with pytest.raises(ValueError, match="fork_from"):
        scoring.logprobs(host, m, ids, CacheConfig(sinks=2, window=8), p, fork_from=base)
    with pytest.raises(TypeError, match="fork_from"):
        scoring.logprobs(host, m, ids, CacheConfig(sinks=2, window=8), p, fork_from=base[0])


@pytest.mark.parametrize("model", ["float32", "bfloat16"])
def test_simulated_mode_quantizes_the_chunk_itself(tiny, tiny16, model):
    """Simulated mode: a chunk's own K/V are quantized too, so one chunk no longer equals the baseline."""
    host, m, ids = tiny16 if model == "bfloat16" else tiny
    n = len(ids)
    plain = CacheConfig(sinks=0, window=0)
    cache_mode = scoring.logprobs(host, m, ids, plain, Protocol(n, n))
    sim = scoring.logprobs(host, m, ids, plain, Protocol(n, n, "simulated"))
    assert np.abs(sim - cache_mode).max() > 1e-3
    # With a window covering the text nothing is ever encoded, simulated or not: a 16-bit model's
    # window is its K/V as computed; a float32 model's is rounded to bfloat16 (simulated mode reads
    # the chunk as stored), which alone moves it (measured KLD 3e-8, max |d logprob| 1.2e-3).
    wide = CacheConfig(sinks=0, window=n)
    wide_lp = scoring.logprobs(host, m, ids, wide, Protocol(n, n, "simulated"))
    if model == "bfloat16":
        np.testing.assert_allclose(wide_lp, cache_mode, atol=2e-5)
    else:
        assert scoring.compare(cache_mode, wide_lp, ids)["kld_mean"] < 1e-6


# ---- the same through mlx-lm (tiny random Llama) --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mlx():
    """(mlx host, hosts.Model of a tiny random mlx-lm Llama, token ids)."""
    mx = pytest.importorskip("mlx.core", reason="mlx-lm not installed: pip install 'tq-core[mlx-cpu]'")
    llama = pytest.importorskip("mlx_lm.models.llama", reason="mlx-lm not installed: pip install 'tq-core[mlx-cpu]'")
    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=97, head_dim=32, num_key_value_heads=2)
    model = llama.Model(args)
    mx.eval(model.parameters())
    ids = np.random.default_rng(1).integers(0, 97, size=40).tolist()
    from harness.identity import geometry

    return hosts.get("mlx"), hosts.Model(model, None, None, geometry(args)), ids


@pytest.fixture(scope="module")
def tiny_mlx16(tiny_mlx):
    """``tiny_mlx``'s Llama (same seed, same ids) in bfloat16: a compressed cache holds its sinks and
    window exactly as computed."""
    import mlx.core as mx
    import mlx_lm.models.llama as llama

    from harness.identity import geometry

    host, m, ids = tiny_mlx
    mx.random.seed(0)
    model = llama.Model(m.model.args)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    m16 = hosts.Model(model, None, None, geometry(m.model.args))
    assert host.holds_window_exactly(m16) and not host.holds_window_exactly(m)
    return host, m16, ids


def test_mlx_fork_is_exact_and_bytes_are_counted(tiny_mlx16, monkeypatch):
    host, m, ids = tiny_mlx16
    n = len(ids)
    p = Protocol(n, 1)
    config = CacheConfig(bits_k=4, bits_v=2, sinks=2, window=8)
    base = scoring.logprobs(host, m, ids, None, p, return_cache=True)
    single = scoring.logprobs(host, m, ids, None, Protocol(n, n))
    assert scoring.compare(single, base[0], ids)["kld_mean"] < 1e-6
    full, cache = scoring.logprobs(host, m, ids, config, p, return_cache=True)
    forks = _count_forks(monkeypatch, host)
    forked = scoring.logprobs(host, m, ids, config, p, fork_from=base)
    assert forks == [scoring.fork_point(config, p)] == [10]  # it really forked
    np.testing.assert_array_equal(forked, full)
    assert scoring.compare(base[0], full, ids)["kld_mean"] > 1e-5  # it reads the codes
    held = scoring.held_bytes(host, cache)
    enc = (n - 1) - 10
    assert held["tokens"] == n - 1 and held["channels"] == 2 * 2 * 64
    assert held["codes"] + held["norms"] == 2 * 2 * enc * (16 + 8 + 4)
    assert held["sinks"] + held["window"] == 2 * 2 * 10 * 64 * 2  # bfloat16 model: 2 bytes


def test_mlx_float32_model_scoring_does_not_fork(tiny_mlx, monkeypatch):
    """A float32 model's sinks and window are held in bfloat16 (2 bytes, not 4): ``fork_from`` is
    ignored, and the scoring is exactly the unforked one."""
    host, m, ids = tiny_mlx
    n = len(ids)
    p = Protocol(n, 1)
    config = CacheConfig(bits_k=4, bits_v=2, sinks=2, window=8)
    assert not host.holds_window_exactly(m)
    assert scoring.fork_point(config, p) == 10  # a 16-bit model would fork here
    base = scoring.logprobs(host, m, ids, None, p, return_cache=True)
    full, cache = scoring.logprobs(host, m, ids, config, p, return_cache=True)
    forks = _count_forks(monkeypatch, host)
    forked = scoring.logprobs(host, m, ids, config, p, fork_from=base)
    assert forks == []
    np.testing.assert_array_equal(forked, full)
    assert scoring.compare(base[0], full, ids)["kld_mean"] > 1e-5  # it reads the codes
    held = scoring.held_bytes(host, cache)
    assert held["codes"] + held["norms"] == 2 * 2 * ((n - 1) - 10) * (16 + 8 + 4)
    assert held["sinks"] + held["window"] == 2 * 2 * 10 * 64 * 2  # float32 model, held in bfloat16
