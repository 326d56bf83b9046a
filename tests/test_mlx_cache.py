"""TurboQuantMLXCache inside mlx-lm's own generate / stream_generate: packed codes, patch/unpatch,
attention over the codes, no ``bits`` attribute, agreement with the torch backend, bytes.

An unpatched model gets dense K/V from the cache (the history decoded: the reference path);
``tq_core.patch`` wraps the ``scaled_dot_product_attention`` of the model's module, which then
attends over what each compressed layer holds (``View.attend``: the fast path). Both must give the
same greedy tokens and logits to float32 rounding (see ``N_FAST`` on how their codes drift apart).

The mlx[cpu] wheel computes matmuls with a slow reference BLAS (~0.15 s of CPU per generated
token for SmolLM2-135M, ~130 s for a 1024-token forward pass), so prompts are a few tokens, few
tokens are generated, and the 1024-token byte accounting fills the caches with K/V arrays
directly instead of running the model over 1024 tokens.
"""

from __future__ import annotations

import pytest

HINT = "mlx-lm not installed: pip install 'tq-core[mlx-cpu]'"
mx = pytest.importorskip("mlx.core", reason=HINT)
mlx_lm = pytest.importorskip("mlx_lm", reason=HINT)

import sys  # noqa: E402

import numpy as np  # noqa: E402

import tq_core  # noqa: E402
from harness import generation, hosts  # noqa: E402
from harness.identity import geometry  # noqa: E402
from tq_core import CacheConfig, kvstore  # noqa: E402
from tq_core.greedy import hf_tokenizer, prompt_ids  # noqa: E402
from tq_core.integrations import mlx_lm as tqm  # noqa: E402
from tq_core.integrations.patch import patched_config  # noqa: E402

pytestmark = [pytest.mark.mlx, pytest.mark.model]

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
K4_BYTES, V2_BYTES, NORM_BYTES = HEAD_DIM * 4 // 8, HEAD_DIM * 2 // 8, 2
PER_TOKEN_HEAD = K4_BYTES + V2_BYTES + 2 * NORM_BYTES  # 52
PROMPT = "The capital of France is"
N_COMPARE = 24
K4V2 = CacheConfig(bits_k=4, bits_v=2, sinks=0, window=0)


def _tokens(model, tokenizer, ids, n, **kwargs) -> list[int]:
    """Greedy tokens from ``mlx_lm.stream_generate`` (stops at EOS like mlx-lm does)."""
    stream = mlx_lm.stream_generate(model, tokenizer, mx.array(ids), max_tokens=n, **kwargs)
    return [int(r.token) for r in stream]


def _hf_tokenizer(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


@pytest.fixture(scope="module")
def prompt(mlx_model) -> list[int]:
    _, tokenizer = mlx_model
    ids, fmt = prompt_ids(hf_tokenizer(tokenizer), PROMPT, chat=False)
    assert fmt == "plain"
    return ids


def test_prompt_ids_of_the_mlx_tokenizer(mlx_model, prompt):
    """mlx-lm hands users a ``TokenizerWrapper``: prompt ids from it are the HF tokenizer's (as the
    old ``generation.prompt_ids`` gave them), for plain text and the chat template."""
    _, tokenizer = mlx_model
    assert prompt_ids(tokenizer, PROMPT, chat=False) == (prompt, "plain")
    assert prompt_ids(tokenizer, PROMPT) == prompt_ids(hf_tokenizer(tokenizer), PROMPT)


@pytest.fixture(scope="module")
def mlx_baseline(mlx_model, prompt) -> list[int]:
    """N_COMPARE greedy tokens of the never-patched model with mlx-lm's own KVCache."""
    model, tokenizer = mlx_model
    assert patched_config(model) is None and "make_cache" not in vars(model)
    out = _tokens(model, tokenizer, prompt, N_COMPARE)
    assert len(out) == N_COMPARE, "the prompt must not hit EOS early"
    return out


@pytest.fixture(autouse=True)
def _never_left_patched(mlx_model):
    yield
    model, _ = mlx_model
    if patched_config(model) is not None:
        tq_core.unpatch(model)
        pytest.fail("test left the shared model patched")


@pytest.fixture
def view_spy(monkeypatch):
    """Counts ``View.attend`` (attention over the codes) and ``View.dense`` (the decoded reference)."""
    calls = {"attend": 0, "dense": 0}
    for name in calls:
        original = getattr(kvstore.View, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(kvstore.View, name, wrapper)
    return calls


def _module(model):
    return sys.modules[type(model).__module__]


@pytest.fixture
def update_spy(monkeypatch):
    """Records the cache of every TurboQuantMLXCache.update_and_fetch call."""
    calls = []
    original = tqm.TurboQuantMLXCache.update_and_fetch

    def update_and_fetch(self, keys, values):
        calls.append(self)
        return original(self, keys, values)

    monkeypatch.setattr(tqm.TurboQuantMLXCache, "update_and_fetch", update_and_fetch)
    return calls


def _check_packed(cache, held, cfg):
    encoded = held - cfg.sinks - cfg.window
    assert len(cache) == LAYERS
    for c in cache:
        assert isinstance(c, tqm.TurboQuantMLXCache)
        s = c.store
        assert s.length == c.offset == held
        assert s.encoded_tokens == encoded
        for hist, nbytes in ((s.hist_k, K4_BYTES), (s.hist_v, V2_BYTES)):
            enc = hist.parts()
            assert set(enc) == {"codes", "norms"}
            assert enc["codes"].dtype == mx.uint8
            assert tuple(enc["codes"].shape) == (1, KV_HEADS, encoded, nbytes)
            assert enc["norms"].dtype == mx.float16
            assert tuple(enc["norms"].shape) == (1, KV_HEADS, encoded)
        held_fp = [a for a in (s.sink_k, s.sink_v, s.win_k, s.win_v) if a is not None]
        assert sum(a.shape[2] for a in held_fp) == 2 * (cfg.sinks + cfg.window)


# ------------------------------------------------------------------ generate with prompt_cache


def test_generate_with_prompt_cache(mlx_model, prompt, mlx_baseline):
    model, tokenizer = mlx_model
    cfg = CacheConfig()
    cache = tqm.make_cache(model, cfg)
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20, prompt_cache=cache)
    assert text.strip()
    # A short prompt stays inside the default sinks + window: exactly what the baseline reads.
    # (mlx-lm's streaming detokenizer drops the first token's leading space)
    assert text.strip() == _hf_tokenizer(tokenizer).decode(mlx_baseline[:20]).strip()
    held = len(prompt) + 20
    assert all(isinstance(c, tqm.TurboQuantMLXCache) and c.store.length == held for c in cache)
    assert all(c.store.encoded_tokens == 0 for c in cache)
    assert cache[0].store.sink_k.shape[2] == cfg.sinks
    assert cache[0].store.win_k.shape[2] == held - cfg.sinks


def test_no_bits_attribute(mlx_model):
    """mlx-lm sends any cache with ``bits`` to its quantized attention: there must be none."""
    model, _ = mlx_model
    cache = tqm.make_cache(model, CacheConfig())
    c = cache[0]
    assert not hasattr(c, "bits")
    k = mx.random.normal((1, KV_HEADS, 3, HEAD_DIM))
    c.update_and_fetch(k, k)
    assert not hasattr(c, "bits")
    assert c.tq_config.bits_k == 4


# ------------------------------------------------------------------ patch / unpatch


def test_patch_makes_plain_generate_compress(mlx_model, prompt, mlx_baseline, update_spy):
    model, tokenizer = mlx_model
    tq_core.patch(model, bits_k=4, bits_v=2)
    try:
        assert patched_config(model) == CacheConfig(bits_k=4, bits_v=2)
        assert "make_cache" in vars(model)
        assert tqm._installed(_module(model))  # the module's attention is wrapped
        text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=3)
        assert text.strip()
        first = {id(c) for c in update_spy}  # the spy keeps the caches alive: ids stay unique
        assert len(first) == LAYERS
        cfgs = {c.tq_config for c in update_spy}
        assert cfgs == {CacheConfig(bits_k=4, bits_v=2)}

        n_first = len(update_spy)
        out = [r.token for r in mlx_lm.stream_generate(model, tokenizer, mx.array(prompt), max_tokens=3)]
        assert len(out) == 3
        second = {id(c) for c in update_spy[n_first:]}
        assert len(second) == LAYERS and second.isdisjoint(first)  # a fresh cache per call
        assert out == mlx_baseline[:3]
    finally:
        tq_core.unpatch(model)
    assert "make_cache" not in vars(model)


def _prompt_logits(model, ids) -> np.ndarray:
    """All logits of ``ids`` through mlx-lm's own KVCache."""
    logits = model(mx.array([ids]), cache=tqm.baseline_cache(model))
    return np.array(logits.astype(mx.float32))


@pytest.fixture(scope="module")
def never_patched_state(mlx_model, prompt):
    """The module's attention function and the prompt logits before any patching here."""
    model, _ = mlx_model
    assert patched_config(model) is None and not tqm._installed(_module(model))
    return {"sdpa": _module(model).scaled_dot_product_attention, "logits": _prompt_logits(model, prompt)}


def test_unpatch_restores_output(mlx_model, prompt, mlx_baseline, never_patched_state, update_spy, view_spy):
    model, tokenizer = mlx_model
    tq_core.patch(model, bits_k=4, bits_v=2)
    _tokens(model, tokenizer, prompt, 2)  # the patched model really ran (over the codes)
    assert update_spy and view_spy["attend"] > 0
    update_spy.clear()
    attended = view_spy["attend"]
    assert tq_core.unpatch(model) is model
    assert patched_config(model) is None
    assert "make_cache" not in vars(model)
    assert _module(model).scaled_dot_product_attention is never_patched_state["sdpa"]
    assert _tokens(model, tokenizer, prompt, 8) == mlx_baseline[:8]
    np.testing.assert_array_equal(_prompt_logits(model, prompt), never_patched_state["logits"])  # byte-identical
    assert not update_spy
    assert view_spy["attend"] == attended


def test_patch_twice_unpatch_once_and_bad_bits(mlx_model):
    model, _ = mlx_model
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    with pytest.raises(ValueError, match="bits_k"):
        tq_core.patch(model, bits_k=9)
    assert patched_config(model) is None and "make_cache" not in vars(model)
    tq_core.patch(model, bits_k=4, bits_v=2)
    tq_core.patch(model, bits_k=3, bits_v=3)
    try:
        cache = make_prompt_cache(model)
        assert {c.tq_config for c in cache} == {CacheConfig(bits_k=3, bits_v=3)}
    finally:
        tq_core.unpatch(model)
    assert patched_config(model) is None and "make_cache" not in vars(model)
    assert not tqm._installed(_module(model))  # patched twice, unpatched once: the original is back
    assert all(type(c) is KVCache for c in make_prompt_cache(model))
    before = dict(vars(model))
    assert tq_core.unpatch(model) is model  # unpatching an unpatched model: no-op
    assert vars(model) == before


def test_patch_wraps_module_attention(mlx_model, never_patched_state):
    model, _ = mlx_model
    module = _module(model)
    original = never_patched_state["sdpa"]
    assert module.scaled_dot_product_attention is original
    tq_core.patch(model, config="K4V2+s0w0")
    try:
        wrapper = module.scaled_dot_product_attention
        assert wrapper is not original and getattr(wrapper, tqm._WRAPPED) is original
        # other caches pass through the wrapper to the original: mlx-lm's own cache reads as before
        np.testing.assert_array_equal(_prompt_logits(model, [1, 2, 3, 4]),
                                      _prompt_logits_unpatched(model, [1, 2, 3, 4], original))
    finally:
        tq_core.unpatch(model)
    assert module.scaled_dot_product_attention is original


def _prompt_logits_unpatched(model, ids, original):
    """Logits with the module's original attention, whatever is installed now."""
    module = _module(model)
    installed = module.scaled_dot_product_attention
    module.scaled_dot_product_attention = original
    try:
        return _prompt_logits(model, ids)
    finally:
        module.scaled_dot_product_attention = installed


def test_patch_by_label(mlx_model):
    model, _ = mlx_model
    from mlx_lm.models.cache import make_prompt_cache

    assert tq_core.patch(model, config="K4V2+s0w0") is model
    try:
        assert patched_config(model) == CacheConfig(bits_k=4, bits_v=2, sinks=0, window=0)
        assert {c.tq_config.label for c in make_prompt_cache(model)} == {"K4V2+s0w0"}
        tq_core.patch(model, config=CacheConfig.parse("uniform:K4V4+s2w8"))
        assert {c.tq_config.label for c in make_prompt_cache(model)} == {"uniform:K4V4+s2w8"}
    finally:
        tq_core.unpatch(model)
    assert patched_config(model) is None and not tqm._installed(_module(model))
    with pytest.raises(ValueError, match="bits_v"):
        tq_core.patch(model, config="K4V9")
    with pytest.raises(TypeError, match="not both"):
        tq_core.patch(model, config="K4V2", window=8)
    assert patched_config(model) is None and "make_cache" not in vars(model)
    assert not tqm._installed(_module(model))


# ------------------------------------------------------------------ attention over the codes


def test_cache_returns_dense_unless_patched(mlx_model):
    model, _ = mlx_model
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=2, window=4)
    k = mx.random.normal((1, KV_HEADS, 10, HEAD_DIM), key=mx.random.key(0))
    v = mx.random.normal((1, KV_HEADS, 10, HEAD_DIM), key=mx.random.key(1))
    c = tqm.make_cache(model, cfg)[0]
    c.update_and_fetch(k[:, :, :7], v[:, :, :7])
    keys, values = c.update_and_fetch(k[:, :, 7:], v[:, :, 7:])
    assert keys.shape == values.shape == (1, KV_HEADS, 10, HEAD_DIM) and c.view is None
    dense = np.array(keys)
    # sinks and window as held (the float32 originals rounded to bfloat16, exactly); this call's own
    # tokens as given
    k16 = np.array(k.astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_array_equal(dense[:, :, :2], k16[:, :, :2])
    np.testing.assert_array_equal(dense[:, :, 3:7], k16[:, :, 3:7])
    np.testing.assert_array_equal(dense[:, :, 7:], np.array(k[:, :, 7:]))
    assert np.any(dense[:, :, 2] != np.array(k[:, :, 2]))  # token 2 left the window: decoded
    assert np.any(dense[:, :, 2] != k16[:, :, 2])
    tq_core.patch(model, config=cfg)
    try:
        fast = tqm.make_cache(model, cfg)[0]
        assert fast.fast and not c.store.simulate
        fast.update_and_fetch(k[:, :, :7], v[:, :, :7])
        keys, values = fast.update_and_fetch(k[:, :, 7:], v[:, :, 7:])
        # the call's own K/V; the layer's View waits for the wrapped attention
        np.testing.assert_array_equal(np.array(keys), np.array(k[:, :, 7:]))
        assert isinstance(fast.view, kvstore.View) and fast.view.history == 1
        np.testing.assert_allclose(np.array(fast.view.dense(k.dtype, v.dtype)[0]), dense, rtol=0, atol=1e-6)
        sim = tqm.make_cache(model, cfg, simulate=True)[0]  # simulated: every K/V as stored, dense
        keys, _ = sim.update_and_fetch(k, v)
        assert keys.shape[2] == 10 and sim.view is None
    finally:
        tq_core.unpatch(model)
    fast.view = None
    keys, _ = fast.update_and_fetch(k[:, :, :1], v[:, :, :1])  # the same cache after unpatch: dense again
    assert keys.shape[2] == 11 and fast.view is None


N_FAST = 24
# See tests/test_hf_cache.py: free-running generation is compared for TurboQuant; uniform's attention
# over the codes is held to the reference on shared codes. Sinks and window are held in bfloat16 for
# this float32 model, so the two paths' codes drift apart here too (measured after 24 tokens:
# K4V2+s0w0 6751 of 72000 K code bytes differ, K3V2+s4w8 243 of 36720), yet the greedy tokens agree;
# should they part, compare on shared codes as tests/test_hf_cache.py does.
GEN_LABELS = ["K4V2+s0w0", "K3V2+s4w8"]
FAST_LABELS = GEN_LABELS + ["uniform:K4V2+s0w0", "K3V2+s4w8+c=1"]


@pytest.mark.parametrize("label", GEN_LABELS)
def test_patched_generation_matches_reference_path(mlx_model, prompt, label, view_spy, record_property):
    """Greedy tokens over the codes (patched) == through the same compressed cache decoded (unpatched)."""
    model, tokenizer = mlx_model
    cfg = CacheConfig.parse(label)
    ref_cache = tqm.make_cache(model, cfg)
    reference = _tokens(model, tokenizer, prompt, N_FAST, prompt_cache=ref_cache)
    assert view_spy["attend"] == 0 and view_spy["dense"] > 0  # the unpatched model read dense K/V
    dense = view_spy["dense"]
    tq_core.patch(model, config=cfg)
    try:
        cache = tqm.make_cache(model, cfg)
        fast = _tokens(model, tokenizer, prompt, N_FAST, prompt_cache=cache)
    finally:
        tq_core.unpatch(model)
    assert view_spy["dense"] == dense and view_spy["attend"] == dense  # every call over the codes
    assert cache[0].store.encoded_tokens == ref_cache[0].store.encoded_tokens > 0
    record_property("fast_vs_reference_match", sum(a == b for a, b in zip(fast, reference)) / max(len(reference), 1))
    dec = _hf_tokenizer(tokenizer).decode
    assert fast == reference, (dec(fast), dec(reference))


def _corpus_ids(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[: n * 8]
    ids = _hf_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"][:n]
    assert len(ids) == n
    return ids


@pytest.mark.parametrize("label", FAST_LABELS)
def test_patched_prefill_logits_match_reference_path(mlx_model, label, view_spy, record_property):
    """Prefill logits over the codes (patched) vs decoded (unpatched), within 1e-3: a first chunk (its
    own tokens), then a second attending to the first as stored, both paths on the very same codes."""
    model, tokenizer = mlx_model
    cfg = CacheConfig.parse(label)
    ids = _corpus_ids(tokenizer, 96)
    first, second = ids[:64], ids[64:]

    def forward(cache, chunk):
        logits = model(mx.array([chunk]), cache=cache)
        return np.array(logits[0].astype(mx.float32))

    ref_cache, fast_cache = tqm.make_cache(model, cfg), tqm.make_cache(model, cfg)
    ref_first = forward(ref_cache, first)
    np.testing.assert_array_equal(forward(fast_cache, first), ref_first)  # the same path twice: same codes
    assert view_spy["attend"] == 0
    tq_core.patch(model, config=cfg)
    try:
        fast_first = forward(tqm.make_cache(model, cfg), first)
        fast_second = forward(fast_cache, second)
    finally:
        tq_core.unpatch(model)
    assert view_spy["attend"] == 2 * LAYERS
    assert fast_cache[0].store.encoded_tokens == 96 - cfg.full_precision
    ref_second = forward(ref_cache, second)
    worst = {"first": float(np.max(np.abs(fast_first - ref_first))),
             "second": float(np.max(np.abs(fast_second - ref_second)))}
    record_property("max_abs_logit_diff", max(worst.values()))
    assert max(worst.values()) < 1e-3, worst
    # and the second chunk really read a compressed history: it differs from the uncompressed model
    base = tqm.baseline_cache(model)
    forward(base, first)
    assert float(np.max(np.abs(forward(base, second) - ref_second))) > 1e-2


# ------------------------------------------------------------------ torch vs mlx


def _torch_greedy_mlx_chunking(hf, eos, ids, n, cache) -> list[int]:
    """Greedy tokens from a transformers model, fed the way mlx-lm feeds its cache: the prompt
    but its last token in one pass, then one token per pass (transformers' generate would prefill
    the whole prompt at once, so with a compressed cache the last prompt token would see its
    predecessors in full precision instead of as stored)."""
    import torch

    from tq_core.integrations import hf as tq_hf

    kw = {tq_hf.cache_kwarg(hf): cache, "use_cache": True, "logits_to_keep": 1}
    out = []
    with torch.no_grad():
        hf(torch.tensor([ids[:-1]]), **kw)
        nxt = ids[-1]
        for _ in range(n):
            nxt = int(hf(torch.tensor([[nxt]]), **kw).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out


def test_torch_vs_mlx(hf_model, mlx_model, prompt, mlx_baseline, record_property):
    hf, hf_tok = hf_model
    model, tokenizer = mlx_model
    assert prompt_ids(hf_tok, PROMPT, chat=False)[0] == prompt
    torch_host = hosts.get("torch-cpu")
    hm = hosts.Model(hf, hf_tok, hf_tok, geometry(hf.config))

    cache = tqm.make_cache(model, K4V2)
    mlx_tq = _tokens(model, tokenizer, prompt, N_COMPARE, prompt_cache=cache)
    _check_packed(cache, len(prompt) + len(mlx_tq), K4V2)

    torch_base = generation.generate(torch_host, hm, prompt, None, N_COMPARE).tokens
    torch_tq = generation.generate(torch_host, hm, prompt, K4V2, N_COMPARE).tokens
    from tq_core.integrations import hf as tq_hf

    torch_tq_chunked = _torch_greedy_mlx_chunking(hf, hf_tok.eos_token_id, prompt, N_COMPARE,
                                                  tq_hf.make_cache(hf, K4V2))

    rates = {
        "baseline_torch_vs_mlx": generation.match(torch_base, mlx_baseline)[0],
        "k4v2_torch_vs_mlx": generation.match(torch_tq, mlx_tq)[0],
        "k4v2_torch_mlx_chunking_vs_mlx": generation.match(torch_tq_chunked, mlx_tq)[0],
        "k4v2_vs_baseline_torch": generation.match(torch_tq, torch_base)[0],
        "k4v2_vs_baseline_mlx": generation.match(mlx_tq, mlx_baseline)[0],
    }
    for name, rate in rates.items():
        record_property(name, rate)
    dec = _hf_tokenizer(tokenizer).decode
    print(f"\nmatch rates over {N_COMPARE} greedy tokens: {rates}")
    print(f"torch base: {dec(torch_base)!r}\nmlx base:   {dec(mlx_baseline)!r}")
    print(f"torch K4V2: {dec(torch_tq)!r}\ntorch K4V2, mlx-lm chunking: {dec(torch_tq_chunked)!r}\n"
          f"mlx K4V2:   {dec(mlx_tq)!r}")
    assert rates["baseline_torch_vs_mlx"] >= 0.9


# ------------------------------------------------------------------ bytes


def test_bytes_1024_tokens(mlx_model, record_property):
    """1024 tokens prefilled in one call per layer (K/V arrays fed directly, see module docstring)."""
    model, _ = mlx_model
    from mlx_lm.models.cache import KVCache

    cache = tqm.make_cache(model, K4V2)
    base = [KVCache() for _ in range(LAYERS)]
    for i, (c, b) in enumerate(zip(cache, base)):
        k, v = mx.random.normal((2, 1, KV_HEADS, 1024 + 64, HEAD_DIM), key=mx.random.key(i))
        b.update_and_fetch(k[..., :1024, :], v[..., :1024, :])
        c.update_and_fetch(k[..., :1024, :], v[..., :1024, :])
    mx.eval([c.state for c in cache])
    b1024 = tqm.cache_nbytes(cache)
    parts = {p: sum(c.nbytes_parts()[p] for c in cache)
             for p in ("codes", "norms", "sinks", "window", "spare", "other")}
    fp16 = 0
    for b in base:
        keys, values = b.keys_and_values()
        assert keys.dtype == mx.float32 and keys.shape[2] == 1024
        fp16 += (keys.size + values.size) * 2
    assert fp16 == 2 * LAYERS * KV_HEADS * 1024 * HEAD_DIM * 2

    for i, c in enumerate(cache):
        k, v = mx.random.normal((2, 1, KV_HEADS, 1024 + 64, HEAD_DIM), key=mx.random.key(i))
        c.update_and_fetch(k[..., 1024:, :], v[..., 1024:, :])
    b1088 = tqm.cache_nbytes(cache)
    spare1088 = sum(c.nbytes_parts()["spare"] for c in cache)
    _check_packed(cache, 1088, K4V2)

    # 1024 encoded tokens fill whole preallocated blocks: nothing spare, every byte is a held token's.
    # At 1088 the history has grown by blocks; its unfilled capacity is counted apart, as spare.
    assert parts["spare"] == parts["other"] == 0
    capacity = cache[0].store.hist_k.capacity
    assert capacity % kvstore.BLOCK == 0 and 1088 <= capacity < 1088 + kvstore.BLOCK + 1024 // kvstore.GROWTH
    assert spare1088 == (capacity - 1088) * PER_TOKEN_HEAD * LAYERS * KV_HEADS
    ratio = b1024 / fp16
    mean = b1024 / (1024 * LAYERS * KV_HEADS)
    slope = (b1088 - spare1088 - b1024) / (64 * LAYERS * KV_HEADS)
    record_property("bytes_ratio_vs_fp16", ratio)
    print(f"\nmlx K4/V2 1024 tokens: {b1024} B vs fp16 {fp16} B, ratio {ratio:.4f}; "
          f"bytes/token/KV head mean {mean:.3f}, slope {slope:.3f}")
    assert parts["sinks"] == parts["window"] == 0
    assert parts["codes"] == LAYERS * KV_HEADS * 1024 * (K4_BYTES + V2_BYTES)
    assert ratio <= 0.21
    assert mean == pytest.approx(PER_TOKEN_HEAD, rel=0.01)
    assert slope == pytest.approx(PER_TOKEN_HEAD, rel=0.01)
    assert abs(b1024 - PER_TOKEN_HEAD * 1024 * LAYERS * KV_HEADS) <= 4096


# ------------------------------------------------------------------ hardening (issue G)


def test_deepcopy_of_patched_model_makes_its_own_caches(mlx_model, prompt):
    """Finding 2: the patched ``make_cache`` was a closure over the original model; a deep copy of a
    patched model now makes caches for itself, counts as a user of the wrapped attention (unpatching
    the original leaves the copy reading its codes), and generates with its own weights."""
    import copy

    from mlx.utils import tree_map

    model, tokenizer = mlx_model
    tq_core.patch(model, config="K4V2+s2w4")
    try:
        twin = copy.deepcopy(model)
        assert twin.make_cache.model is twin and model.make_cache.model is model
        assert patched_config(twin) == patched_config(model)
        theirs = _tokens(model, tokenizer, prompt, 4)
        twin.update(tree_map(lambda a: -a, twin.parameters()))  # other weights: other tokens
        ours = _tokens(twin, tokenizer, prompt, 4)
        assert ours != theirs
        assert ours == _tokens(twin, tokenizer, prompt, 4, prompt_cache=tqm.make_cache(twin, patched_config(twin)))
        tq_core.unpatch(model)
        assert tqm._installed(_module(twin)), "unpatching the original unwrapped the copy's attention"
        tq_core.unpatch(twin)
        assert not tqm._installed(_module(model))
    finally:
        tq_core.unpatch(model)


def test_patch_refuses_what_is_not_an_mlx_model(mlx_model):
    """Finding 10: ``patch`` on mlx-lm's tokenizer, a decoder layer or the inner decoder reported
    success; now one TypeError, and nothing is changed."""
    model, tokenizer = mlx_model
    for thing in (tokenizer, model.layers[0], model.model):
        with pytest.raises(TypeError, match="model must be a"):
            tq_core.patch(thing)
        assert patched_config(thing) is None and "make_cache" not in vars(thing)
    assert not tqm._installed(_module(model))


def test_user_prompt_cache_is_used(mlx_model, prompt, update_spy):
    """Finding 7: a ``prompt_cache=`` the caller passes to a patched model is the one generation uses."""
    model, tokenizer = mlx_model
    tq_core.patch(model, config="K4V2+s0w0")
    try:
        own = [mlx_lm.models.cache.KVCache() for _ in model.layers]
        _tokens(model, tokenizer, prompt, 2, prompt_cache=own)
    finally:
        tq_core.unpatch(model)
    assert not update_spy and own[0].offset > len(prompt)  # (mlx-lm computes a token ahead)


def test_batch_generation_is_refused_clearly(mlx_model, prompt):
    """Finding 9 on mlx-lm: batch generation merges per-prompt caches into one left-padded batch
    cache; a compressed cache cannot be merged, and says so (instead of a generic error)."""
    model, tokenizer = mlx_model
    tq_core.patch(model, config="K4V2+s2w4")
    try:
        with pytest.raises(NotImplementedError, match="TurboQuantMLXCache cannot be merged into a batch"):
            mlx_lm.batch_generate(model, tokenizer, [prompt, prompt[:3]], max_tokens=2)
    finally:
        tq_core.unpatch(model)
