"""Peer KV caches as methods: labels and refusals, where they run, bytes from their own tensors, and
each cache through the real host path (quantizes, changes the logits a little, holds less).

Tiny random-weight models (a 2-layer Llama in transformers and in mlx-lm) keep every test to
seconds; a peer whose library is not installed skips with its install line.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fixtures import configs as registry
from harness import hosts, scoring
from tq_core import CacheConfig, methods
from tq_core.methods.peer import NO_CODEC

PEER_NAMES = ("quanto", "hqq", "mlxkv")
TOKENS = 41  # scored ids: 40 fed, decode semantics
WINDOW = 8  # the transformers peers' residual window in these tests (flushes at 8 tokens)


def need(method: str):
    missing = methods.get(method).missing()
    if missing:
        pytest.skip(missing)


# ---- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", [c.label for c in registry.PEERS] + ["quanto:K4V4+s0w128+g=32", "hqq:K1V1+s0w0",
                                                                       "mlxkv:K3V3+s0w0+g=128"])
def test_peer_labels_parse_and_round_trip(label):
    c = CacheConfig.parse(label)
    assert c.label == label and CacheConfig.parse(c.label) == c
    assert methods.get(c.method).peer


def test_registry_order_and_tiers():
    labels = [c.label for c in registry.PEERS]
    assert [CacheConfig.parse(label).method for label in labels] == ["quanto"] * 2 + ["hqq"] * 2 + ["mlxkv"] * 2
    nightly = registry.TIERS["nightly"]
    assert nightly[:len(registry.MATRIX)] == [c.label for c in registry.MATRIX]  # TurboQuant first
    assert all(label in nightly and label not in registry.TIERS["default"] for label in labels)
    assert all(registry.BY_LABEL[label].label == label for label in labels)


@pytest.mark.parametrize("label, match", [
    ("quanto:K4V2+s0w128", "bits_k must equal bits_v, got K4V2"),
    ("quanto:K3V3+s0w128", "bits for quanto must be one of 2, 4, got 3"),
    ("quanto:K4V4+s4w128", "sinks must be 0 for quanto .*got 4"),
    ("quanto:K4V4+s0w128+seed=1", "seed is not an option of method 'quanto'"),
    ("quanto:K4V4+s0w128+nc=0", r"unknown option nc='0' for method 'quanto' \(allowed: g=<group size>\)"),
    ("quanto:K4V4+s0w128+g=0", "unknown option g='0'"),
    ("hqq:K3V3+s0w128", "bits for hqq must be one of 1, 2, 4, 8 .3 is refused"),
    ("hqq:K8V4+s0w128", "bits_k must equal bits_v"),
    ("mlxkv:K4V4+s0w128", "window must be 0 for mlxkv .*quantizes from the first token.*got 128"),
    ("mlxkv:K7V7+s0w0", "bits for mlxkv must be one of 1, 2, 3, 4, 5, 6, 8, got 7"),
    ("mlxkv:K4V4+s0w0+g=16", "group_size for mlxkv must be one of 32, 64, 128 .*got 16"),
])
def test_peer_refusals_name_the_parameter(label, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig.parse(label)


def test_peers_have_no_codec_and_ours_no_cache_of_their_own():
    c = CacheConfig.parse("quanto:K4V4+s0w128")
    with pytest.raises(ValueError, match="peer cache .*no codec"):
        methods.get("quanto").codec(c, 0, "k", 64)
    with pytest.raises(NotImplementedError, match="no cache of its own"):
        methods.get("turboquant").make_cache("torch", None, CacheConfig())
    assert not methods.get("turboquant").peer and not methods.get("uniform").peer
    assert methods.get("turboquant").hosts == ("torch", "mlx") and methods.get("turboquant").missing() is None
    assert (methods.get("quanto").hosts, methods.get("hqq").hosts, methods.get("mlxkv").hosts) == (
        ("torch",), ("torch",), ("mlx",))


def test_peer_libraries_are_imported_lazily():
    code = ("import sys, tq_core, fixtures.configs; tq_core.CacheConfig.parse('hqq:K4V4+s0w128'); "
            "print(sorted(m for m in ('optimum.quanto', 'hqq', 'mlx_lm', 'mlx.core', 'torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- where a config runs --------------------------------------------------------------------------
def test_runs_on_names_the_host_library():
    quanto, mlxkv = CacheConfig.parse("quanto:K4V4+s0w128"), CacheConfig.parse("mlxkv:K4V4+s0w0")
    assert registry.runs_on(quanto, "mlx") == ("quanto is transformers QuantizedCache, optimum-quanto backend: it runs "
                                               "on the torch targets, not mlx")
    assert "runs on the mlx targets, not torch" in registry.runs_on(mlxkv, "torch")
    assert "runs on the torch or mlx targets, not llama.cpp" in registry.runs_on(CacheConfig(), "llama.cpp")
    assert registry.runs_on(CacheConfig(), "torch") is None
    assert hosts.LIBS == {"torch-cpu": "torch", "torch-cuda": "torch", "mlx": "mlx", "llama-cpp": "llama.cpp"}


def test_runs_on_gives_the_install_line_when_the_library_is_missing(monkeypatch):
    quanto = methods.get("quanto")
    monkeypatch.setattr(type(quanto), "requires", (("tq_no_such_module", "pip install 'tq-core[peers]'"),))
    reason = registry.runs_on(CacheConfig.parse("quanto:K4V4+s0w128"), "torch")
    assert reason == "quanto: tq_no_such_module is not installed (pip install 'tq-core[peers]')"


def test_collection_skips_peers_where_they_cannot_be_measured():
    """conftest.py marks, before anything runs: a peer on another host library's backend skips with
    runs_on's reason; a test that measures a codec (marker ``codec``) skips peers with NO_CODEC."""
    ids = ["suites/test_perplexity.py::test_perplexity[backend=mlx-config=quanto:K4V4+s0w128]",
           "suites/test_perplexity.py::test_perplexity[backend=torch-cpu-config=mlxkv:K4V4+s0w0]",
           "suites/test_attention.py::test_attention_per_layer[backend=torch-cpu-config=quanto:K4V4+s0w128]"]
    out = subprocess.run([sys.executable, "-m", "pytest", *ids, "-q", "-rs", "-p", "no:cacheprovider", "--tq-no-results",
                          "--tq-target", "torch-cpu,mlx", "--tq-tier", "nightly", "--tq-config", "quanto:K4V4+s0w128",
                          "--tq-config", "mlxkv:K4V4+s0w0"], capture_output=True, text=True, timeout=300)
    assert "3 skipped" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    assert "quanto is transformers QuantizedCache, optimum-quanto backend: it runs on the torch targets, not mlx" in out.stdout
    assert "mlxkv is mlx-lm QuantizedKVCache: it runs on the mlx targets, not torch" in out.stdout
    assert NO_CODEC in out.stdout


# ---- bytes from tensors ---------------------------------------------------------------------------
def test_tensor_bytes_walks_containers_and_counts_each_storage_once():
    torch = pytest.importorskip("torch")
    a = torch.zeros(4, 8, dtype=torch.uint8)  # 32 B
    s = torch.zeros(4, 1)  # 16 B
    view = a[:2]  # the same storage as a: counted with it, once
    held = hosts.tensor_bytes({"codes": [a, (view, {"scale": s, "zero": s, "shape": a.shape, "nbits": 4})],
                               "residual": torch.zeros(3, 2, dtype=torch.float16)})
    assert held == {"codes": 32, "scales": 16, "residual": 12}
    assert hosts.tensor_bytes({"codes": view}) == {"codes": 32}  # a view holds its whole storage alive


def test_tensor_bytes_reads_inside_quantized_tensors():
    pytest.importorskip("torch")
    need("quanto")
    import torch
    from optimum.quanto import MaxOptimizer, qint4, quantize_weight

    x = torch.randn(1, 2, 6, 64)
    scale, shift = MaxOptimizer()(x, qint4, 0, 64)
    q = quantize_weight(x, qint4, 0, scale, shift, 64)
    held = hosts.tensor_bytes({"codes": q})
    # 768 values at 4 bits, one float32 scale and shift per group of 64 (12 groups)
    assert held == {"codes": 768 // 2, "scales": 12 * 4, "zeros": 12 * 4}


# ---- through the real host path: transformers -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_torch(make_tiny_llama):
    """A 2-layer random Llama (4 KV heads of 64 channels: every peer group size fits) on the torch host,
    its attention as the torch host loads models: peer caches must go through it untouched."""
    return make_tiny_llama(hidden_size=128, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                           enable_attention=True)


def _ids(n: int = TOKENS) -> list[int]:
    return [int(i) for i in np.random.default_rng(1).integers(3, 97, n)]


def _score(host, m, config, n: int = TOKENS):
    return scoring.logprobs(host, m, _ids(n), config, scoring.Protocol(n, 1), return_cache=True)


@pytest.fixture(scope="module")
def torch_baseline(tiny_torch):
    return _score(*tiny_torch, None)


def _hand_count_transformers(cache) -> dict:
    """What a transformers QuantizedCache holds, read off its layers directly."""
    out = {"codes": 0, "scales": 0, "zeros": 0, "residual": 0}
    for layer in cache.layers:
        for q in (layer._quantized_keys, layer._quantized_values):
            if isinstance(q, tuple):  # HQQ: (codes, meta)
                out["codes"] += q[0].nbytes
                out["scales"] += q[1]["scale"].nbytes
                out["zeros"] += q[1]["zero"].nbytes
            else:  # optimum-quanto: a QTensor of packed codes, scale and shift
                out["codes"] += q._data._data.nbytes
                out["scales"] += q._scale.nbytes
                out["zeros"] += q._shift.nbytes
        out["residual"] += layer.keys.nbytes + layer.values.nbytes
    return out


@pytest.mark.parametrize("method", ["quanto", "hqq"])
def test_transformers_peer_quantizes_through_the_host(tiny_torch, torch_baseline, method):
    need(method)
    host, m = tiny_torch
    base_lp, base_cache = torch_baseline
    config = CacheConfig.parse(f"{method}:K4V4+s0w{WINDOW}")
    lp, cache = _score(host, m, config)
    held = scoring.held_bytes(host, cache)
    assert held["tokens"] == TOKENS - 1 and held["channels"] == 2 * 4 * (64 + 64)
    # decode semantics: token 0 is quantized by the first call, then the window flushes at 8 tokens
    assert held["encoded"] == 33
    hand = _hand_count_transformers(cache)
    assert {k: held[k] for k in hand} == hand and held["total"] == sum(hand.values())
    layers, heads, dims = 2, 4, 128  # K and V channels per token and head
    assert held["codes"] == layers * heads * held["encoded"] * dims * 4 // 8  # 4-bit codes, packed
    assert held["residual"] == layers * heads * (held["tokens"] - held["encoded"]) * dims * 4  # float32 model
    assert held["total"] < scoring.held_bytes(host, base_cache)["total"]
    cmp = scoring.compare(base_lp, lp, _ids())
    assert np.abs(lp - base_lp).max() > 1e-3, "the peer's cache did not change the logits: nothing quantized"
    assert cmp["kld_mean"] < 0.5 and cmp["same_top1_pct"] >= 50, cmp


def test_transformers_peer_bytes_grow_with_tokens(tiny_torch):
    need("quanto")
    host, m = tiny_torch
    config = CacheConfig.parse(f"quanto:K2V2+s0w{WINDOW}")
    short = scoring.held_bytes(host, _score(host, m, config, 1 + 1 + WINDOW)[1])  # one flush: 9 quantized
    long = scoring.held_bytes(host, _score(host, m, config, 1 + 1 + 3 * WINDOW)[1])  # three: 25
    assert (short["encoded"], long["encoded"]) == (9, 25) and short["residual"] == long["residual"] == 0
    per_token = (long["codes"] - short["codes"]) / 16
    assert per_token == 2 * 4 * 128 * 2 / 8  # 2-bit codes of K and V, every layer and head
    assert long["scales"] - short["scales"] == 16 * 2 * 4 * 2 * 4  # a float32 scale per token, head, K/V


def test_fewer_bits_cost_more_kld(tiny_torch, torch_baseline):
    need("hqq")
    host, m = tiny_torch
    base_lp = torch_baseline[0]
    kld = {b: scoring.compare(base_lp, _score(host, m, CacheConfig.parse(f"hqq:K{b}V{b}+s0w{WINDOW}"))[0],
                              _ids())["kld_mean"] for b in (8, 4, 2)}
    assert kld[8] < kld[4] < kld[2], kld
    assert kld[8] < 0.01, kld


def test_hqq_refuses_a_model_whose_groups_it_cannot_pack(tiny_torch):
    need("hqq")
    host, m = tiny_torch
    # 1 bit packs 8 rows of groups; 4 KV heads x 64 channels make 4 groups of 64 per token
    with pytest.raises(methods.Unsupported, match="HQQ packs 8 rows .*4 groups of 64 per token.*g=32 fits"):
        host.new_cache(m, CacheConfig.parse("hqq:K1V1+s0w8"))
    assert host.new_cache(m, CacheConfig.parse("hqq:K1V1+s0w8+g=32")) is not None


def test_transformers_peers_refuse_sliding_window_models_and_shape_caches(tiny_torch):
    need("quanto")
    transformers = pytest.importorskip("transformers")
    from harness.identity import geometry

    cfg = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256)
    gemma = hosts.Model(transformers.Gemma3ForCausalLM(cfg).eval(), None, None, geometry(cfg))
    host = tiny_torch[0]
    with pytest.raises(methods.Unsupported, match="only full-attention models; this one has sliding_attention"):
        host.new_cache(gemma, CacheConfig.parse("quanto:K4V4+s0w128"))
    with pytest.raises(methods.Unsupported, match="shape-only cache has no model"):
        host.shape_cache(2, CacheConfig.parse("quanto:K4V4+s0w128"))
    with pytest.raises(ValueError, match="simulated mode .*peer cache has none"):
        host.new_cache(tiny_torch[1], CacheConfig.parse("quanto:K4V4+s0w128"), simulate=True)
    with pytest.raises(ValueError, match="lib for quanto must be one of torch, got 'mlx'"):
        methods.get("quanto").make_cache("mlx", tiny_torch[1].model, CacheConfig.parse("quanto:K4V4+s0w128"))


def test_peers_take_nothing_from_the_baseline():
    """A peer quantizes on its own schedule: scoring never forks it from the baseline's positions."""
    protocol = scoring.Protocol(512, 1)
    assert scoring.fork_point(CacheConfig.parse("quanto:K4V4+s0w128"), protocol) == 0
    assert scoring.fork_point(CacheConfig(), protocol) == 132


# ---- through the real host path: mlx-lm -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mlx():
    """A 2-layer random mlx-lm Llama (2 KV heads of 64 channels) on the mlx host."""
    pytest.importorskip("mlx.core", reason="mlx-lm not installed: pip install 'tq-core[mlx-cpu]'")
    pytest.importorskip("mlx_lm", reason="mlx-lm not installed: pip install 'tq-core[mlx-cpu]'")
    import mlx.core as mx
    from mlx_lm.models import llama

    from harness.identity import geometry

    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
                           vocab_size=97, tie_word_embeddings=True)
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return hosts.get("mlx"), hosts.Model(model, None, None, geometry(model.args))


def test_mlxkv_is_read_by_mlx_lms_quantized_attention_through_the_hook(tiny_mlx, monkeypatch):
    """The project's attention hook passes a QuantizedKVCache to mlx-lm's own quantized attention
    untouched: same log-probs as the unhooked model, and mlx-lm's quantized attention ran."""
    from mlx_lm.models import base

    from tq_core.integrations import mlx_lm as tqm

    host, m = tiny_mlx
    config = CacheConfig.parse("mlxkv:K4V4+s0w0")
    plain = _score(host, m, config)[0]
    calls = []
    original = base.quantized_scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("bits"))
        return original(*args, **kwargs)

    monkeypatch.setattr(base, "quantized_scaled_dot_product_attention", spy)
    assert tqm.enable_attention(m.model)
    try:
        hooked = _score(host, m, config)[0]
    finally:
        tqm.disable_attention(m.model, True)
    assert calls and set(calls) == {4}
    assert np.array_equal(plain, hooked)


def test_mlxkv_quantizes_through_the_host(tiny_mlx):
    host, m = tiny_mlx
    base_lp, base_cache = _score(host, m, None)
    kld = {}
    for bits in (8, 4):
        lp, cache = _score(host, m, CacheConfig.parse(f"mlxkv:K{bits}V{bits}+s0w0"))
        held = scoring.held_bytes(host, cache)
        hand = {"codes": 0, "scales": 0, "zeros": 0}
        for c in cache:
            for i, part in enumerate(hand):
                hand[part] += c.keys[i].nbytes + c.values[i].nbytes
        assert {k: held[k] for k in hand} == hand and held["total"] == sum(hand.values())
        # allocated in steps of 256 tokens, as mlx-lm's own KVCache: 2 layers x 2 heads x K and V
        assert held["codes"] == 2 * 2 * 2 * 256 * 64 * bits // 8
        assert held["encoded"] == held["tokens"] == TOKENS - 1 and held["channels"] == 2 * 2 * 128
        assert held["total"] < scoring.held_bytes(host, base_cache)["total"]
        assert np.abs(lp - base_lp).max() > 1e-4
        kld[bits] = scoring.compare(base_lp, lp, _ids())["kld_mean"]
    assert kld[8] < kld[4] < 0.1, kld


def test_mlxkv_refuses_what_mlx_lm_cannot_allocate(tiny_mlx):
    from harness.identity import geometry

    host, m = tiny_mlx
    with pytest.raises(methods.Unsupported, match="shape-only cache has no model"):
        host.shape_cache(2, CacheConfig.parse("mlxkv:K4V4+s0w0"))
    with pytest.raises(methods.Unsupported, match="group size 128 does not divide this model's head_dim 64"):
        host.new_cache(m, CacheConfig.parse("mlxkv:K4V4+s0w0+g=128"))
    wide = hosts.Model(m.model, None, None, geometry(m.model.args))
    wide.model.args.head_dim = 128  # mlx-lm allocates 128 // 6 = 21 words per vector at 5 bits, mx.quantize fills 20
    try:
        with pytest.raises(methods.Unsupported, match="allocates 21 words per 128-channel vector at 5 bits"):
            host.new_cache(wide, CacheConfig.parse("mlxkv:K5V5+s0w0"))
    finally:
        wide.model.args.head_dim = 64


# ---- the report: peers are measured, never gated ---------------------------------------------------
def test_report_shows_peers_as_measured_never_gated():
    pytest.importorskip("pandas")
    pytest.importorskip("jinja2")
    from pathlib import Path

    from reports import frontier, render, runs, summary, synthetic

    data = synthetic.results()
    peer, ours = "quanto:K4V4+s0w128", "K4V2+s4w128"
    node = f"suites/test_perplexity.py::test_perplexity[backend=torch-cpu-config={peer}]"
    template = next(r for r in data["records"] if r["suite"] == "perplexity" and r["metric"] == "kld_mean"
                    and r["labels"].get("config") == ours and r["labels"].get("extra") is None)
    for metric, value, unit in (("kld_mean", 0.02, "nats"), ("dppl_pct", 1.5, "%"), ("same_top1_pct", 95.0, "%"),
                                ("bits_per_channel", 6.1, "bit")):
        data["records"].append({**template, "test": node, "metric": metric, "value": value, "unit": unit,
                                "labels": {**template["labels"], "config": peer}})
    data["tests"][node] = "passed"
    data["run"]["peers"] = [peer]
    run, recs, tests = runs.validate(data)
    r = runs.Run(Path("/results/cpu/peers.json"), run, recs, tests, timings=runs.timings_of(data))
    status = summary.gate_status(r)
    assert status[("perplexity", peer, "torch-cpu")] == "MEASURED"
    assert status[("perplexity", ours, "torch-cpu")] == "PASS"
    g = summary.gates(r)
    assert g["status"] == "PASS" and not any(i["config"] == peer for v in g["uncalibrated"].values() for i in v)
    rows = {row["config"]: row["gates"] for row in summary.headlines(r)}
    assert set(rows[peer].values()) == {"MEASURED"}
    html = render.page(r)
    assert '<span class="badge measured">MEASURED</span>' in html
    assert frontier.method_name(frontier.method_of(peer)[0]) == "transformers quanto"
    data["tests"][node] = "failed"  # a peer's test that failed is a failure all the same
    run, recs, tests = runs.validate(data)
    failed = runs.Run(Path("/results/cpu/peers.json"), run, recs, tests, timings=runs.timings_of(data))
    assert summary.gate_status(failed)[("perplexity", peer, "torch-cpu")] == "FAIL"


def test_gates_measure_peers_and_hold_them_to_no_band():
    from suites import gates

    at_floor = dict(tokens=100, kld_mean=1e-6, dppl_pct=0.0, same_top1_pct=100.0, ppl=10.0, ppl_base=10.0)
    assert gates.check_perplexity("mlxkv:K8V8+s0w0", at_floor) == gates.MEASURED
    with pytest.raises(AssertionError, match="noise floor"):  # ours: a cache this close reads no codes
        gates.check_perplexity("K4V2+s4w128", at_floor)
    with pytest.raises(AssertionError, match="non-finite"):  # a peer's numbers must still be numbers
        gates.check_perplexity("quanto:K4V4+s0w128", {**at_floor, "kld_mean": float("nan")})
    assert gates.check_generation("quanto:K2V2+s0w128", "nightly", 0.01, [0.01], "smollm2-135m") == gates.MEASURED
    status = gates.check_needle("nightly", {"baseline": 21, "hqq:K4V4+s0w128": 0, "K4V2+s4w128": 20}, 25,
                                ["hqq:K4V4+s0w128", "K4V2+s4w128"], "smollm2-135m")
    assert status["hqq:K4V4+s0w128"] == gates.MEASURED and status["K4V2+s4w128"] != gates.MEASURED
    assert not gates.measured_only("baseline") and gates.measured_only(CacheConfig.parse("mlxkv:K4V4+s0w0"))
