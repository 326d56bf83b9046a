"""llama.cpp's KV cache types as a peer: labels and type mapping (``tq_core.methods.llamacpp``), and
the llama.cpp host (``harness.hosts.llamacpp_host``) measured against the torch-cpu host on the same
ids, against llama.cpp's own serialized state size, and against itself (decode vs one pass, greedy).

The tests that run llama.cpp skip when llama-cpp-python is missing, with the line that installs it.
Model tests use the first 128 corpus tokens of the default model (a few seconds in all).
"""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib

import numpy as np
import pytest

from fixtures import configs, targets
from harness import hosts, scoring
from tq_core import METHODS, CacheConfig
from tq_core.methods.llamacpp import GGML_TYPES, bytes_per_value

INSTALL = "llama-cpp-python is not installed: pip install 'tq-core[peers]'"
N = 128  # corpus tokens the model tests score
LLAMA = METHODS["llamacpp"]


# ---- labels and types (no llama.cpp needed) ---------------------------------------------------
@pytest.mark.parametrize("label, types", [
    ("llamacpp:K8V8+s0w0", ("q8_0", "q8_0")),
    ("llamacpp:K5V5+s0w0", ("q5_0", "q5_0")),
    ("llamacpp:K4V4+s0w0+t=1", ("q4_1", "q4_1")),
    ("llamacpp:K4V4+s0w0", ("q4_0", "q4_0")),
    ("llamacpp:K8V4+s0w0", ("q8_0", "q4_0")),
    ("llamacpp:K5V5+s0w0+t=1", ("q5_1", "q5_1")),
    ("llamacpp:K8V5+s0w0+t=1", ("q8_0", "q5_1")),
    ("llamacpp:K4V8+s0w0+t=nl", ("iq4_nl", "q8_0")),
], ids=lambda v: v if isinstance(v, str) else "/".join(v))
def test_label_round_trip_and_types(label, types):
    config = CacheConfig.parse(label)
    assert config.method == "llamacpp" and config.label == label
    assert CacheConfig.parse(config.label) == config
    assert LLAMA.types(config) == types


@pytest.mark.parametrize("label, message", [
    ("llamacpp:K3V4+s0w0", r"bits_k of method 'llamacpp' must be one of 8 \(q8_0\), 5 \(q5_0\), 4 \(q4_0\).*got 3"),
    ("llamacpp:K4V2+s0w0", r"bits_v of method 'llamacpp' must be one of 8 \(q8_0\), 5 \(q5_0\), 4 \(q4_0\).*got 2"),
    ("llamacpp:K6V6+s0w0+t=1", r"bits_k of method 'llamacpp' with t=1 must be one of 8 \(q8_0\), 5 \(q5_1\), "
                               r"4 \(q4_1\).*got 6"),
    ("llamacpp:K5V5+s0w0+t=nl", r"bits_k of method 'llamacpp' with t=nl must be one of 8 \(q8_0\), 4 \(iq4_nl\)"),
    ("llamacpp:K8V8+s0w0+t=1", r"variant '1' of method 'llamacpp' changes q5_1/q4_1 for 5 and 4 bits only"),
    ("llamacpp:K4V4", r"sinks and window must be 0 for method 'llamacpp'.*sinks=4 window=128"),
    ("llamacpp:K4V4+s0w32", r"sinks and window must be 0 .*window=32"),
    ("llamacpp:K4V4+s0w0+seed=3", r"seed must be 0 for method 'llamacpp'"),
    ("llamacpp:K4V4+s0w0+t=2", r"unknown option t='2' for method 'llamacpp' \(allowed: t=1 .*, t=nl"),
    ("llamacpp:K4V4+s0w0+g=32", r"unknown option g='32' for method 'llamacpp'"),
    ("K4V2+s4w128+t=1", r"unknown option t='1' for method 'turboquant'"),
])
def test_bad_labels_are_one_clear_error(label, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig.parse(label)


def test_variant_belongs_to_llamacpp_only():
    with pytest.raises(ValueError, match="variant is not an option of method 'uniform'"):
        CacheConfig(method="uniform", variant="1")
    with pytest.raises(TypeError, match="variant must be a str, got int 1"):
        CacheConfig(bits_k=4, bits_v=4, sinks=0, window=0, method="llamacpp", variant=1)
    with pytest.raises(ValueError, match="variant of method 'llamacpp' must be one of '1'"):
        CacheConfig(bits_k=4, bits_v=4, sinks=0, window=0, method="llamacpp", variant="2")


def test_bits_per_value_include_the_block_scale():
    bits = {t: 8 * bytes_per_value(t) for t in GGML_TYPES}
    assert bits == {"f16": 16, "q8_0": 8.5, "q5_1": 6, "q5_0": 5.5, "q4_1": 5, "q4_0": 4.5, "iq4_nl": 4.5}


def test_peers_are_nightly_and_ordered_easy_to_hard():
    labels = [c.label for c in configs.LLAMACPP_PEERS]
    assert [LLAMA.types(c) for c in configs.LLAMACPP_PEERS] == [
        ("q8_0", "q8_0"), ("q5_0", "q5_0"), ("q4_1", "q4_1"), ("q4_0", "q4_0"), ("q8_0", "q4_0")]
    assert configs.TIERS["nightly"][-len(labels):] == labels
    assert not set(labels) & set(configs.TIERS["default"])
    assert [c.label for c in configs.for_tier("nightly")][-len(labels):] == labels


def test_method_declares_its_host_and_requirement():
    assert LLAMA.hosts == ("llama.cpp",) and LLAMA.peer
    assert LLAMA.requires == (("llama_cpp", "pip install 'tq-core[peers]'"),)
    with pytest.raises(ValueError, match=r"method 'llamacpp' runs in llama.cpp only \(llama.cpp\), not in 'torch'"):
        LLAMA.make_cache("torch", None, CacheConfig.parse("llamacpp:K4V4+s0w0"))


def test_missing_llama_cpp_is_skipped_in_auto_and_an_error_when_asked_for(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    reason = ("llama-cpp: llama-cpp-python is not installed (pip install 'tq-core[peers]'; it builds llama.cpp "
              "from source in a few minutes)")
    assert targets.missing_reason("llama-cpp") == reason
    backends, reasons = targets.resolve("auto")
    assert "llama-cpp" in backends and reasons["llama-cpp"] == reason
    with pytest.raises(RuntimeError, match="--tq-target asked for llama-cpp: llama-cpp-python is not installed"):
        targets.resolve("llama-cpp")
    assert "pip install 'tq-core[peers]'" in LLAMA.missing()


def test_a_llama_cpp_run_files_its_results_under_cpu():
    assert targets.results_target(["llama-cpp"], {}) == "cpu"
    assert targets.results_target(["torch-cpu", "llama-cpp"], {}) == "cpu"


# ---- llama.cpp itself -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason=INSTALL)


def test_type_table_matches_ggml(llama_cpp):
    """Ids and block sizes of ``GGML_TYPES`` are llama_cpp's constants and ggml's own type traits."""
    found = sorted((pathlib.Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not found:
        pytest.skip("llama_cpp ships no libggml-base library to read ggml's type traits from")
    ggml = ctypes.CDLL(str(found[0]))
    ggml.ggml_type_size.restype, ggml.ggml_blck_size.restype = ctypes.c_size_t, ctypes.c_int64
    for name, (type_id, size, block) in GGML_TYPES.items():
        assert getattr(llama_cpp, f"GGML_TYPE_{name.upper()}") == type_id, name
        assert (ggml.ggml_type_size(type_id), ggml.ggml_blck_size(type_id)) == (size, block), name


def test_nothing_imports_llama_cpp_until_its_host_is_made():
    import subprocess
    import sys

    code = ("import sys; from fixtures import targets; from harness import hosts; import tq_core.methods; "
            "targets.resolve('auto'); assert 'llama_cpp' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_host_is_registered(llama_cpp):
    host = hosts.get("llama-cpp")
    assert (host.lib, host.backend) == ("llama.cpp", "llama-cpp") and host is hosts.get("llama-cpp")
    assert host.versions() == {"llama-cpp-python": llama_cpp.__version__}
    assert targets.missing_reason("llama-cpp") is None


@pytest.mark.parametrize("call", [
    lambda h: h.shape_cache(2), lambda h: h.stores(None), lambda h: h.layer_kv(None),
    lambda h: h.update(None, 0, None, None), lambda h: h.fork(None, None, None), lambda h: h.randn((2, 3)),
    lambda h: h.from_numpy(np.zeros(3)), lambda h: h.float16, lambda h: h.sdpa_backends(),
], ids=["shape_cache", "stores", "layer_kv", "update", "fork", "randn", "from_numpy", "float16", "sdpa_backends"])
def test_what_llama_cpp_keeps_inside_is_unsupported_naming_the_host(llama_cpp, call):
    with pytest.raises(hosts.Unsupported, match=r"^llama-cpp: no .+ \(llama.cpp keeps its K/V inside its context"):
        call(hosts.get("llama-cpp"))


def test_only_gguf_files_load(llama_cpp, tmp_path):
    from harness.hosts.llamacpp_host import gguf_path

    with pytest.raises(ValueError, match=f"--tq-model {tmp_path}: the llama-cpp host loads GGUF files only"):
        gguf_path(str(tmp_path))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="loads GGUF files only"):
        gguf_path(str(tmp_path / "x.gguf"))


# ---- the default model in llama.cpp -----------------------------------------------------------
@pytest.fixture(scope="module")
def llama(llama_cpp):
    """(host, Model) of the default model's GGUF in llama.cpp."""
    from tq_core import models

    try:
        models.locate_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable: {e}")
    host = hosts.get("llama-cpp")
    return host, host.load(None)


@pytest.fixture(scope="module")
def text():
    from fixtures import text as corpus

    return corpus.load(None).text[: N * 8]  # ~3.5 characters per token here


@pytest.fixture(scope="module")
def ids(llama, text):
    host, m = llama
    out = host.tokenize(m, text)[:N]
    assert len(out) == N
    return out


def decode(host, m, ids, config=None) -> np.ndarray:
    """Log-probs (len(ids), vocab) of ``ids`` fed one per forward (decode semantics)."""
    cache = host.new_cache(m, config, reserve=len(ids))
    return host.log_softmax(np.concatenate([host.forward(m, [t], cache) for t in ids]))


@pytest.fixture(scope="module")
def f16(llama, ids):
    host, m = llama
    return decode(host, m, ids)


def test_llama_cpp_s_tokenizer_agrees_with_the_hf_one(llama, text, ids):
    """The host feeds the HF tokenizer's ids; llama.cpp's own tokenizer gives the same ones here."""
    _, m = llama
    assert m.model.tokenize(text)[:N] == ids


def test_f16_baseline_agrees_with_torch_cpu(llama, ids, f16, hf_model):
    """llama.cpp's f16 cache vs the torch-cpu model on the same ids, one pass each.

    Not rounding: llama.cpp runs the GGUF's Q4_1 weights with activations quantized to 8 bits in
    those matmuls and holds K/V in f16, where torch runs the weights dequantized to float32.
    Measured (128 tokens, llama-cpp-python 0.3.36): KLD 0.0038 (max 0.020), same top-1 94.5 %
    (7 of 127 positions differ), ΔPPL -0.6 %; at 512 tokens KLD 0.0033, top-1 97.5 %, ΔPPL +0.12 %.
    The band leaves room for another llama.cpp build and catches a wrong position, RoPE base or
    tokenizer (each moves the KLD by orders of magnitude), and a comparison of torch with itself.
    """
    import torch

    model, _ = hf_model
    with torch.no_grad():
        ref = hosts.get("torch-cpu").log_softmax(model(input_ids=torch.tensor([ids])).logits[0])
    cmp = scoring.compare(ref[:-1], f16[:-1], ids)
    assert 5e-4 <= cmp["kld_mean"] <= 0.015, cmp["kld_mean"]
    assert cmp["kld_max"] <= 0.1, cmp["kld_max"]
    assert cmp["same_top1_pct"] >= 90, cmp["same_top1_pct"]
    assert abs(cmp["dppl_pct"]) <= 3, cmp["dppl_pct"]


def test_decode_equals_chunks_below_64_and_differs_by_the_tiled_kernel_above(llama, ids, f16):
    """The f16 cache fed one token per forward vs in chunks. llama.cpp (ggml-cpu) attends a batch
    of >= 64 queries over an f16 cache with its tiled flash-attention kernel (queries kept in
    float32, a GEMM over K/V converted to float32) and fewer with the per-query one (queries
    rounded to f16). Measured (128 tokens, one thread): chunks of 8..63 give the decode log-probs
    bit for bit; one pass of 128 differs by KLD 0.0039 (max 0.015), same top-1 96.9 %. A wrong
    position or a token fed twice would move every later row of the chunked scoring."""
    host, m = llama

    def chunked(size):
        cache = host.new_cache(m, None, reserve=len(ids))
        return host.log_softmax(np.concatenate([host.forward(m, ids[s:s + size], cache)
                                                for s in range(0, len(ids), size)]))

    assert f16.shape == (N, m.model.n_vocab)
    assert float(np.abs(chunked(40) - f16).max()) <= 1e-5
    one = scoring.compare(f16[:-1], chunked(N)[:-1], ids)
    assert 3e-4 <= one["kld_mean"] <= 0.02, one["kld_mean"]
    assert one["same_top1_pct"] >= 90, one["same_top1_pct"]


def test_q4_0_cache_changes_the_logits_but_stays_close(llama, ids, f16):
    """q4_0 and q8_0 caches vs the f16 cache, decode semantics. Measured (128 tokens): q4_0 KLD
    0.066, same top-1 82.7 %; q8_0 KLD 0.0051, top-1 96.1 %. Above the floor (the cache types took
    effect), below a cache that lost the history, and q8_0 closer than q4_0."""
    host, m = llama
    q4 = scoring.compare(f16[:-1], decode(host, m, ids, CacheConfig.parse("llamacpp:K4V4+s0w0"))[:-1], ids)
    q8 = scoring.compare(f16[:-1], decode(host, m, ids, CacheConfig.parse("llamacpp:K8V8+s0w0"))[:-1], ids)
    assert 0.02 <= q4["kld_mean"] <= 0.2, q4["kld_mean"]
    assert q4["same_top1_pct"] >= 65, q4["same_top1_pct"]
    assert 1e-3 <= q8["kld_mean"] <= 0.02, q8["kld_mean"]
    assert q8["kld_mean"] < q4["kld_mean"] / 4


@pytest.mark.parametrize("label", [None, "llamacpp:K8V8+s0w0", "llamacpp:K5V5+s0w0+t=1", "llamacpp:K8V4+s0w0",
                                   "llamacpp:K4V4+s0w0+t=nl"], ids=lambda v: f"config={v}")
def test_bytes_held_match_llama_cpp_s_state_size(llama, ids, label):
    """Bytes held (block sizes x tokens x layers x KV heads x head_dim) vs llama.cpp's serialized
    state of the sequence (``llama_state_seq_get_size``), which adds headers only: measured exactly
    12 B per token (cell position, sequence count, sequence id) + 24 B per layer (K and V type and
    row size) + 24 B, at every type. The band (16 B per token + 32 per layer + 64) allows a format
    change of those headers, but not a missing layer, head or token (>= 96 B per token per layer)."""
    host, m = llama
    config = None if label is None else CacheConfig.parse(label)
    tokens = 48
    cache = host.new_cache(m, config, reserve=tokens)
    assert cache.n_ctx >= tokens
    host.forward(m, ids[:tokens], cache)
    held = scoring.held_bytes(host, cache)
    g = m.geometry
    type_k, type_v = ("f16", "f16") if config is None else LLAMA.types(config)
    values = tokens * g.layers * g.kv_heads * g.head_dim
    assert (held["k"], held["v"]) == (values * bytes_per_value(type_k), values * bytes_per_value(type_v))
    assert held["tokens"] == tokens
    assert held["bits_per_channel"] == pytest.approx(4 * (bytes_per_value(type_k) + bytes_per_value(type_v)))
    overhead = host.state_size(cache) - held["total"]
    assert 0 < overhead <= 16 * tokens + 32 * g.layers + 64, overhead


def test_greedy_is_argmax_of_fed_tokens(llama, ids):
    host, m = llama
    prompt, n = ids[:20], 6
    cache = host.new_cache(m, CacheConfig.parse("llamacpp:K8V4+s0w0"), reserve=host.greedy_held(len(prompt), n))
    new = host.greedy(m, prompt, cache, n)
    assert len(new) == n and cache.n_past == host.greedy_held(len(prompt), n)
    ref = host.new_cache(m, CacheConfig.parse("llamacpp:K8V4+s0w0"), reserve=len(prompt) + n)
    logits, want = host.forward(m, prompt, ref), []
    for _ in range(n):
        want.append(host.argmax(logits))
        logits = host.forward(m, [want[-1]], ref)
    assert new == want


def test_a_context_too_small_is_one_clear_error(llama, ids):
    host, m = llama
    cache = host.new_cache(m, None, reserve=8)
    with pytest.raises(ValueError, match=rf"the context holds 0 of {cache.n_ctx} tokens: {cache.n_ctx + 1} more"):
        host.forward(m, (ids * 10)[: cache.n_ctx + 1], cache)


def test_other_methods_and_simulated_mode_are_unsupported(llama):
    host, m = llama
    with pytest.raises(hosts.Unsupported, match="llama-cpp: runs llama.cpp's own cache types only"):
        host.new_cache(m, CacheConfig())
    with pytest.raises(hosts.Unsupported, match="llama-cpp: llama.cpp has no simulated mode"):
        host.new_cache(m, CacheConfig.parse("llamacpp:K4V4+s0w0"), simulate=True)


def test_llama_cpp_noise_floors_are_its_own_two_sided_bands():
    """llama.cpp's floors (``gates.LIB_FLOORS``) hold its measured kernel and weight differences
    (decode vs one pass KLD 0.0036, vs torch-cpu 0.0030) and refuse a KLD near 0 (not llama.cpp)
    or ten times the measured one; the other hosts keep their rounding-only limits."""
    from suites import gates

    measured = {"kld_mean": 0.0036, "dppl_pct": -0.25}
    gates.check_decode_noise_floor(measured, "llama.cpp")
    gates.check_cross_backend_kld(0.0030, "llama.cpp")
    for kld in (1e-9, 0.036):
        with pytest.raises(AssertionError, match="decode vs one pass: KLD"):
            gates.check_decode_noise_floor({**measured, "kld_mean": kld}, "llama.cpp")
        with pytest.raises(AssertionError, match="baseline KLD vs torch-cpu"):
            gates.check_cross_backend_kld(kld, "llama.cpp")
    with pytest.raises(AssertionError, match="decode vs one pass: KLD"):
        gates.check_decode_noise_floor(measured, "torch")
    gates.check_cross_backend(12.742, 12.87, "llama.cpp")  # +1.0 %: within llama.cpp's ±1.5 %, not the ±0.5 %
    with pytest.raises(AssertionError, match="beyond ±0.5%"):
        gates.check_cross_backend(12.742, 12.87)
    with pytest.raises(AssertionError, match="beyond ±1.5%"):
        gates.check_cross_backend(12.742, 13.0, "llama.cpp")


def test_a_model_not_fetched_yet_gives_the_fetch_command(tmp_path, monkeypatch):
    """A ``tq_core.model_sources`` name resolves to its fetched GGUF; before ``tq fetch`` one line says how."""
    from harness.hosts.llamacpp_host import gguf_path

    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tq fetch gemma-3-270m"):
        gguf_path("gemma-3-270m")
