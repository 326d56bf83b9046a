"""TurboQuantCache inside transformers' own generate: packed history, bytes, patch/unpatch,
attention over the codes, sliding-window configs and beam search. Runs with transformers 5.17 and 5.24.

Two paths read a compressed layer: an unpatched model gets dense K/V from the cache (the history
decoded: the reference path); ``tq_core.patch`` switches the model to the registered attention
function ``"tq"``, which attends over what the layer holds without decoding it (the fast path).
The two must give the same greedy tokens and logits to float32 rounding when they read the same
codes (sinks and window are held in bfloat16 for this float32 model, which makes free-running
generations of the two paths drift apart in their codes: see ``N_FAST``).

SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32 weights. K4/V2 packs a K vector into
64*4/8 = 32 bytes and a V vector into 16, plus one fp16 norm each: 52 bytes per token per KV head,
against 2 * 64 * 2 = 256 for an fp16 K/V pair (ratio 0.203).
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tq_core  # noqa: E402
from tq_core import CacheConfig  # noqa: E402
from tq_core import kvstore  # noqa: E402
from tq_core.integrations import hf  # noqa: E402
from tq_core.integrations.patch import patched_config  # noqa: E402

pytestmark = pytest.mark.model

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
K4_BYTES, V2_BYTES, NORM_BYTES = HEAD_DIM * 4 // 8, HEAD_DIM * 2 // 8, 2
PER_TOKEN_HEAD = K4_BYTES + V2_BYTES + 2 * NORM_BYTES  # 52
PROMPT = "The three most important rules of writing clean Python code are"


def _prompt(tokenizer):
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _greedy(model, tokenizer, inputs, n, **kwargs):
    """``n`` greedy tokens exactly (EOS suppressed, so lengths are known)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _forward(model, ids, cache):
    """One forward pass of ``ids`` into ``cache``; the last position's logits."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=True, logits_to_keep=1,
                     **{hf.cache_kwarg(model): cache}).logits


def _float_tensors(obj):
    """Floating tensors an object holds directly in its attributes (name -> tensor)."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _is_class_generate(model) -> bool:
    return "generate" not in vars(model) and model.generate.__func__ is type(model).generate


def _hist(store, kind: str = "k") -> dict:
    """The held history fields of a layer store, (B, H, n, ...) each."""
    return getattr(store, "hist_" + kind).parts()


@pytest.fixture(autouse=True)
def _never_left_patched(hf_model):
    """The session model must leave every test unpatched (other tests share it)."""
    yield
    model, _ = hf_model
    if patched_config(model) is not None:
        tq_core.unpatch(model)
        pytest.fail("test left the shared model patched")


# ------------------------------------------------------------------ generation holds packed codes


def test_cache_kwarg_matches_transformers_version(hf_model):
    model, _ = hf_model
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    known = {(5, 17): "past_key_values", (5, 24): "cache"}  # the two versions this is tested with
    assert hf.cache_kwarg(model) == known.get(major_minor, hf.cache_kwarg(model))
    assert hf.cache_kwarg(model) in ("cache", "past_key_values")


def test_generate_holds_history_packed(hf_model):
    model, tokenizer = hf_model
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=8)
    cache = hf.TurboQuantCache(model.config, config=cfg)
    inputs = _prompt(tokenizer)
    new = _greedy(model, tokenizer, inputs, 16, **{hf.cache_kwarg(model): cache})

    assert len(new) == 16
    assert tokenizer.decode(new, skip_special_tokens=True).strip()
    held = inputs["input_ids"].shape[1] + len(new) - 1  # the last token is never fed back
    encoded = held - cfg.sinks - cfg.window
    assert cache.get_seq_length() == held
    assert len(cache.layers) == LAYERS
    assert all(isinstance(layer, hf.TurboQuantLayer) for layer in cache.layers)
    assert len(cache.compressed_layers()) == LAYERS
    for layer in cache.layers:
        s = layer.store
        assert s.length == held
        assert s.encoded_tokens == encoded
        for kind, nbytes in (("k", K4_BYTES), ("v", V2_BYTES)):
            enc = _hist(s, kind)
            assert set(enc) == {"codes", "norms"}
            assert enc["codes"].dtype == torch.uint8
            assert tuple(enc["codes"].shape) == (1, KV_HEADS, encoded, nbytes)
            assert enc["norms"].dtype == torch.float16
            assert tuple(enc["norms"].shape) == (1, KV_HEADS, encoded)
        # Full precision only for the sinks and the window; transformers' keys/values stay empty.
        assert layer.keys.numel() == 0 and layer.values.numel() == 0
        assert set(_float_tensors(s)) == {"sink_k", "sink_v", "win_k", "win_v"}
        for name in ("sink_k", "sink_v"):
            assert tuple(getattr(s, name).shape) == (1, KV_HEADS, cfg.sinks, HEAD_DIM)
        for name in ("win_k", "win_v"):
            assert tuple(getattr(s, name).shape) == (1, KV_HEADS, cfg.window, HEAD_DIM)
        assert sum(t.numel() for t in _float_tensors(layer).values()) == 0

    parts = cache.nbytes()
    assert parts["codes"] == LAYERS * KV_HEADS * encoded * (K4_BYTES + V2_BYTES)
    assert parts["norms"] == LAYERS * KV_HEADS * encoded * 2 * NORM_BYTES
    assert parts["uncompressed"] == parts["other"] == 0
    # no reservation: the history grew by blocks; what it has not filled yet is counted as spare
    capacity = cache.layers[0].store.hist_k.capacity
    assert capacity % kvstore.BLOCK == 0 and capacity >= encoded
    assert parts["spare"] == LAYERS * KV_HEADS * (capacity - encoded) * PER_TOKEN_HEAD


# ------------------------------------------------------------------ bytes


class _TeeCache(hf.TurboQuantCache):
    """A TurboQuantCache that also hands every K/V it is given to a plain DynamicCache, so both
    hold the very same tokens of the very same forward pass."""

    def __init__(self, model, **fields):
        super().__init__(model.config, **fields)
        self.tee = hf.dynamic_cache(model)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.tee.update(key_states, value_states, layer_idx, *args, **kwargs)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@pytest.fixture(scope="module")
def prefill_1024(hf_model, corpus_ids):
    """1024 corpus tokens in one forward pass into K4/V2 with sinks=0, window=0 (and, from the same
    pass, an uncompressed DynamicCache); then 64 more tokens (for the per-token slope)."""
    model, _ = hf_model
    tq = _TeeCache(model, bits_k=4, bits_v=2, sinks=0, window=0)
    _forward(model, corpus_ids[:1024], tq)
    bytes_1024 = tq.nbytes()
    dyn, tq.tee = tq.tee, hf.dynamic_cache(model)
    _forward(model, corpus_ids[1024:1088], tq)
    return {"dyn": dyn, "tq_1024": bytes_1024, "tq_1088": tq.nbytes(), "tq": tq}


def test_bytes_vs_fp16_dynamic_cache(prefill_1024, record_property):
    assert prefill_1024["tq_1024"]["spare"] == 0  # 1024 encoded tokens fill whole blocks exactly
    dyn = prefill_1024["dyn"]
    assert dyn.get_seq_length() == 1024
    numel = 0
    for layer in dyn.layers:
        for t in (layer.keys, layer.values):
            assert t.dtype == torch.float32  # the model runs in fp32
            numel += t.numel()
    assert numel == 2 * LAYERS * KV_HEADS * 1024 * HEAD_DIM
    assert hf.cache_nbytes(dyn) == numel * 4
    fp16_bytes = numel * 2
    tq_bytes = prefill_1024["tq_1024"]["total"]
    ratio = tq_bytes / fp16_bytes
    record_property("bytes_ratio_vs_fp16", ratio)
    print(f"\nK4/V2 1024 tokens: {tq_bytes} B vs fp16 DynamicCache {fp16_bytes} B, ratio {ratio:.4f}")
    assert ratio <= 0.21


def test_bytes_per_token_per_head(prefill_1024, record_property):
    """Per token per KV head the history holds 52 B; the preallocated capacity it has not filled
    (``spare``) is counted apart: 0 at 1024 tokens (whole blocks), under one growth step at 1088."""
    b1024, b1088 = prefill_1024["tq_1024"], prefill_1024["tq_1088"]
    for parts in (b1024, b1088):
        assert parts["sinks"] == parts["window"] == parts["uncompressed"] == parts["other"] == 0
    held = {n: parts["total"] - parts["spare"] for n, parts in ((1024, b1024), (1088, b1088))}
    assert b1024["spare"] == 0
    capacity = prefill_1024["tq"].layers[0].store.hist_k.capacity
    assert capacity % kvstore.BLOCK == 0 and 1088 <= capacity < 1088 + kvstore.BLOCK + 1024 // kvstore.GROWTH
    assert b1088["spare"] == (capacity - 1088) * PER_TOKEN_HEAD * LAYERS * KV_HEADS
    slope = (held[1088] - held[1024]) / (64 * LAYERS * KV_HEADS)
    mean = held[1024] / (1024 * LAYERS * KV_HEADS)
    constant = held[1024] - PER_TOKEN_HEAD * 1024 * LAYERS * KV_HEADS
    record_property("bytes_per_token_head", mean)
    print(f"\nbytes/token/KV head: mean {mean:.3f}, slope {slope:.3f}, constant {constant} B")
    assert slope == pytest.approx(PER_TOKEN_HEAD, rel=0.01)
    assert mean == pytest.approx(PER_TOKEN_HEAD, rel=0.01)
    assert abs(constant) <= 4096
    assert prefill_1024["tq"].get_seq_length() == 1088
    for layer in prefill_1024["tq"].layers:
        assert layer.store.encoded_tokens == 1088
        assert layer.keys.numel() == 0


def test_bytes_sinks_and_window_counted(hf_model, corpus_ids):
    model, _ = hf_model
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=32)
    n = 128
    cache = hf.TurboQuantCache(model.config, config=cfg, reserve=n)  # reserved: no spare once n are held
    _forward(model, corpus_ids[:n], cache)
    parts = cache.nbytes()
    # the model computes in float32; sinks and window are held in bfloat16: 2 bytes per element
    held_kv_token = LAYERS * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, all layers
    assert parts["sinks"] == 4 * held_kv_token
    assert parts["window"] == 32 * held_kv_token
    encoded = n - 4 - 32
    assert parts["codes"] + parts["norms"] == LAYERS * KV_HEADS * encoded * PER_TOKEN_HEAD
    assert parts["spare"] == parts["other"] == parts["uncompressed"] == 0
    assert parts["total"] == parts["codes"] + parts["norms"] + parts["sinks"] + parts["window"]
    assert hf.cache_nbytes(cache) == parts["total"]
    for layer in cache.layers:
        assert layer.store.sink_k.dtype == layer.store.win_v.dtype == torch.bfloat16


# ------------------------------------------------------------------ patch / unpatch


@pytest.fixture(scope="module")
def never_patched_40(hf_model):
    """40 greedy tokens of the model before any patching in this module (transformers' own cache)."""
    model, tokenizer = hf_model
    assert patched_config(model) is None and _is_class_generate(model)
    return _greedy(model, tokenizer, _prompt(tokenizer), 40)


def _prompt_logits(model, tokenizer):
    """All logits of the prompt through transformers' own DynamicCache."""
    with torch.no_grad():
        return model(**_prompt(tokenizer), use_cache=True,
                     **{hf.cache_kwarg(model): hf.dynamic_cache(model)}).logits


@pytest.fixture(scope="module")
def never_patched_state(hf_model):
    """The attention implementation and prompt logits of the model before any patching here."""
    model, tokenizer = hf_model
    assert patched_config(model) is None and _is_class_generate(model)
    return {"attn": model.config._attn_implementation, "logits": _prompt_logits(model, tokenizer)}


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


@pytest.fixture
def update_spy(monkeypatch):
    """Counts TurboQuantCache.update calls; the list holds the cache of each call."""
    calls = []
    original = hf.TurboQuantCache.update

    def update(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(hf.TurboQuantCache, "update", update)
    return calls


def test_patch_makes_plain_generate_compress(hf_model, never_patched_40, update_spy):
    model, tokenizer = hf_model
    inputs = _prompt(tokenizer)
    tq_core.patch(model, bits_k=4, bits_v=2)
    try:
        assert patched_config(model) == CacheConfig(bits_k=4, bits_v=2)
        assert "generate" in vars(model)
        assert model.config._attn_implementation == hf.ATTENTION == "tq"
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert update_spy, "patched generate never called TurboQuantCache.update"
        caches = {id(c) for c in update_spy}
        assert len(caches) == 1
        cache = update_spy[0]
        assert cache.tq_config == CacheConfig(bits_k=4, bits_v=2)
        assert len(cache.compressed_layers()) == LAYERS
        assert cache.get_seq_length() == out.shape[1] - 1
        assert len(update_spy) == LAYERS * (out.shape[1] - inputs["input_ids"].shape[1])

        # every call gets a fresh cache (the spy keeps the caches alive, so ids stay unique) ...
        n_first = len(update_spy)
        _greedy(model, tokenizer, inputs, 2)
        assert len(update_spy) > n_first and {id(c) for c in update_spy[n_first:]}.isdisjoint(caches)
        # ... unless the caller passes one
        update_spy.clear()
        dyn = hf.dynamic_cache(model)
        _greedy(model, tokenizer, inputs, 2, **{hf.cache_kwarg(model): dyn})
        assert not update_spy and dyn.get_seq_length() == inputs["input_ids"].shape[1] + 1
    finally:
        tq_core.unpatch(model)
    assert _is_class_generate(model)


def test_unpatch_restores_output(hf_model, never_patched_40, never_patched_state, update_spy, view_spy):
    model, tokenizer = hf_model
    tq_core.patch(model, bits_k=4, bits_v=2)
    _greedy(model, tokenizer, _prompt(tokenizer), 2)  # the patched model really ran (over the codes)
    assert update_spy and view_spy["attend"] == 2 * LAYERS
    update_spy.clear()
    assert tq_core.unpatch(model) is model
    assert _is_class_generate(model)
    assert patched_config(model) is None
    assert model.config._attn_implementation == never_patched_state["attn"]
    assert _greedy(model, tokenizer, _prompt(tokenizer), 40) == never_patched_40
    assert torch.equal(_prompt_logits(model, tokenizer), never_patched_state["logits"])  # byte-identical
    assert not update_spy
    assert view_spy["attend"] == 2 * LAYERS  # nothing more read through a compressed layer


def test_patch_twice_unpatch_once(hf_model):
    model, _ = hf_model
    tq_core.patch(model, bits_k=4, bits_v=2)
    tq_core.patch(model, bits_k=3, bits_v=3, window=16)
    try:
        assert patched_config(model) == CacheConfig(bits_k=3, bits_v=3, window=16)
        # the second patch wraps the class method, not the first wrapper
        assert model.generate.__wrapped__.__func__ is type(model).generate
    finally:
        tq_core.unpatch(model)
    assert patched_config(model) is None
    assert _is_class_generate(model)
    assert model.config._attn_implementation != hf.ATTENTION  # the original, not the first patch's "tq"


def test_unpatch_unpatched_is_noop(hf_model):
    model, _ = hf_model
    before = dict(vars(model))
    assert tq_core.unpatch(model) is model
    assert tq_core.unpatch(model) is model
    assert vars(model) == before
    assert _is_class_generate(model)


def test_patch_bad_bits_leaves_model_unpatched(hf_model):
    model, _ = hf_model
    with pytest.raises(ValueError, match="bits_k"):
        tq_core.patch(model, bits_k=9)
    assert patched_config(model) is None
    assert _is_class_generate(model)
    # on a patched model a bad config keeps the patch already there
    tq_core.patch(model, bits_k=4, bits_v=2)
    try:
        with pytest.raises(ValueError, match="bits_v"):
            tq_core.patch(model, bits_v=0)
        assert patched_config(model) == CacheConfig(bits_k=4, bits_v=2)
    finally:
        tq_core.unpatch(model)
    assert _is_class_generate(model)


def test_patch_by_label(hf_model, update_spy):
    model, tokenizer = hf_model
    assert tq_core.patch(model, config="K4V2+s0w0") is model
    try:
        assert patched_config(model) == CacheConfig(bits_k=4, bits_v=2, sinks=0, window=0)
        _greedy(model, tokenizer, _prompt(tokenizer), 2)
        assert {c.tq_config.label for c in update_spy} == {"K4V2+s0w0"}
        # a CacheConfig, or another label, replaces it
        tq_core.patch(model, config=CacheConfig.parse("uniform:K4V4+s2w8"))
        assert patched_config(model).label == "uniform:K4V4+s2w8"
        tq_core.patch(model, config="K3V2+s4w128+nc=0")
        assert patched_config(model) == CacheConfig(bits_k=3, norm_correction=False)
    finally:
        tq_core.unpatch(model)
    assert patched_config(model) is None and _is_class_generate(model)


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"config": "K4V9"}, ValueError, "bits_v"),
    ({"config": "K4V2+g=8"}, ValueError, "unknown option g"),
    ({"config": "nope"}, ValueError, "is not of the form"),
    ({"config": 42}, TypeError, "config must be a CacheConfig or its label"),
    ({"config": "K4V2+s0w0", "window": 8}, TypeError, "not both"),
    ({"config": "K4V2+s0w0", "bits_k": 3}, TypeError, "not both"),
])
def test_patch_bad_config_leaves_model_unpatched(hf_model, kwargs, exc, words):
    model, _ = hf_model
    with pytest.raises(exc, match=words):
        tq_core.patch(model, **kwargs)
    assert patched_config(model) is None and _is_class_generate(model)
    assert model.config._attn_implementation != hf.ATTENTION


# ------------------------------------------------------------------ attention over the codes


def test_cache_returns_dense_unless_patched(hf_model):
    model, _ = hf_model
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=2, window=4)
    k = torch.randn(1, KV_HEADS, 10, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, KV_HEADS, 10, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    # unpatched: what any attention function reads, the history decoded
    cache = hf.TurboQuantCache(model.config, config=cfg)
    keys, values = cache.update(k[:, :, :7], v[:, :, :7], 0)
    assert torch.equal(keys, k[:, :, :7]) and not hasattr(keys, hf._VIEW)
    keys, values = cache.update(k[:, :, 7:], v[:, :, 7:], 0)
    dense = keys
    assert keys.shape == values.shape == (1, KV_HEADS, 10, HEAD_DIM) and not hasattr(keys, hf._VIEW)
    # sinks and window as held (the float32 originals rounded to bfloat16, exactly); this call's own
    # tokens as given
    k16 = k.bfloat16().float()
    assert torch.equal(keys[:, :, :2], k16[:, :, :2]) and torch.equal(keys[:, :, 3:7], k16[:, :, 3:7])
    assert torch.equal(keys[:, :, 7:], k[:, :, 7:])
    assert not torch.equal(keys[:, :, 2], k[:, :, 2])  # token 2 left the window: decoded
    assert not torch.equal(keys[:, :, 2], k16[:, :, 2])
    tq_core.patch(model, config=cfg)
    try:
        # patched: the call's own K/V, carrying the layer's View for the "tq" attention function
        fast = hf.TurboQuantCache(model.config, config=cfg)
        fast.update(k[:, :, :7], v[:, :, :7], 0)
        keys, values = fast.update(k[:, :, 7:], v[:, :, 7:], 0)
        assert torch.equal(keys, k[:, :, 7:]) and values is not None and torch.equal(values, v[:, :, 7:])
        view = getattr(keys, hf._VIEW)
        assert isinstance(view, kvstore.View) and view.history == 1
        assert not hasattr(k, hf._VIEW)  # the caller's tensor is left untouched
        # the same codes as the unpatched cache holds; decoded, what the unpatched cache returned
        assert torch.equal(fast.layers[0].store.hist_k.parts()["codes"], cache.layers[0].store.hist_k.parts()["codes"])
        torch.testing.assert_close(view.dense(k.dtype, v.dtype)[0], dense, rtol=0, atol=1e-6)
        # a cache made without a model config cannot know the attention in use: always dense
        lazy = hf.TurboQuantCache(config=cfg)
        keys, _ = lazy.update(k, v, 0)
        assert keys.shape[2] == 10 and not hasattr(keys, hf._VIEW)
        # nor does a simulated cache (every K/V as stored, this call's too)
        sim = hf.TurboQuantCache(model.config, config=cfg, simulate=True)
        keys, _ = sim.update(k, v, 0)
        assert keys.shape[2] == 10 and not hasattr(keys, hf._VIEW)
    finally:
        tq_core.unpatch(model)
    keys, _ = fast.update(k[:, :, :1], v[:, :, :1], 0)  # the same cache, after unpatch: dense again
    assert keys.shape[2] == 11 and not hasattr(keys, hf._VIEW)


def test_patch_registers_and_selects_tq_attention(hf_model, never_patched_state):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, _ = hf_model
    tq_core.patch(model, config="K4V2+s0w0")
    try:
        assert model.config._attn_implementation == "tq"
        assert ALL_ATTENTION_FUNCTIONS["tq"] is hf.attention
        assert "tq" in ALL_MASK_ATTENTION_FUNCTIONS
    finally:
        tq_core.unpatch(model)
    assert model.config._attn_implementation == never_patched_state["attn"]


N_FAST = 32
# Generation runs free: each path computes its own K/V and encodes it, so a float32 difference
# between the paths can flip a code that the other path does not flip. TurboQuant codes of float32
# K/V flip only within ~1e-7 of a boundary; but the store holds and encodes this float32 model's
# K/V rounded to bfloat16, so a path difference of ~3e-7 (relative) now and then becomes a one-ulp
# bfloat16 difference (~4e-3), which can flip a code, after which the two caches drift apart:
# measured after 32 free-running tokens, K4V2+s0w0: 11508 of 120960 K code bytes differ (from
# layer 1 on; 263 with float32 sinks/window) and the greedy tokens part at step 28 (top-2 margin
# 0.14); K3V2+s4w8: 226 of 64800 (from layer 4 on; 0 with float32), tokens equal. Uniform codes
# also move with the fp16 rounding of each vector's scale and min (~1e-3 apart): measured,
# uniform:K4V2+s0w0 flips codes from layer 3 on within 8 steps and its greedy tokens part at
# step 8 (top-2 margin 0.16). So uniform's attention over the codes is held to the reference on
# shared codes (the logits test below); for TurboQuant, free-running generate() is held to the
# reference for as long as the two caches hold the same codes, and greedy decoding to the
# reference at every step on the same codes (the patched path attends over a copy of the
# reference cache).
GEN_LABELS = ["K4V2+s0w0", "K3V2+s4w8"]
FAST_LABELS = GEN_LABELS + ["uniform:K4V2+s0w0", "K3V2+s4w8+c=1"]


def _first_code_difference(cfg: CacheConfig, a, b) -> int | None:
    """The first token position whose codes (any field, K or V, any layer) differ between the
    compressed caches ``a`` and ``b``, or None where they hold the same codes."""
    first = None
    for la, lb in zip(a.compressed_layers(), b.compressed_layers()):
        for kind in ("k", "v"):
            pa, pb = _hist(la.store, kind), _hist(lb.store, kind)
            for name in pa:
                n = min(pa[name].shape[2], pb[name].shape[2])
                x, y = pa[name][:, :, :n], pb[name][:, :, :n]
                differs = (x != y).reshape(x.shape[0], x.shape[1], n, -1).any(-1).any(1).any(0).nonzero()
                if len(differs):
                    pos = cfg.sinks + int(differs[0])  # history entry i holds token sinks + i
                    first = pos if first is None else min(first, pos)
    return first


@pytest.mark.parametrize("label", GEN_LABELS)
def test_patched_generation_matches_reference_path(hf_model, label, view_spy, record_property):
    """Greedy tokens over the codes (patched) == through the same compressed cache decoded
    (unpatched): free-running while both caches hold the same codes, and at every step on shared codes."""
    import copy

    model, tokenizer = hf_model
    cfg = CacheConfig.parse(label)
    inputs = _prompt(tokenizer)
    ref_cache = hf.make_cache(model, cfg)
    reference = _greedy(model, tokenizer, inputs, N_FAST, **{hf.cache_kwarg(model): ref_cache})
    assert view_spy == {"attend": 0, "dense": N_FAST * LAYERS}  # the unpatched model read dense K/V
    tq_core.patch(model, config=cfg)
    try:
        cache = hf.make_cache(model, cfg)
        fast = _greedy(model, tokenizer, inputs, N_FAST, **{hf.cache_kwarg(model): cache})
    finally:
        tq_core.unpatch(model)
    # every layer of every step attended over the codes, none decoded its history
    assert view_spy == {"attend": N_FAST * LAYERS, "dense": N_FAST * LAYERS}
    prompt = inputs["input_ids"].shape[1]
    assert cache.layers[0].store.encoded_tokens == prompt + N_FAST - 1 - cfg.full_precision
    record_property("fast_vs_reference_match", sum(a == b for a, b in zip(fast, reference)) / N_FAST)
    # Free-running: token 0 comes from the prefill, which reads no codes (only its own tokens);
    # token i reads the codes of positions < prompt + i - 1 at most. While those are the same in
    # both caches, the tokens are the same. (Measured here: the caches part at position 7, inside
    # the prompt, for both labels, so the check on shared codes below carries the rest.)
    first = _first_code_difference(cfg, ref_cache, cache)
    record_property("first_code_difference", first)
    agree = N_FAST if first is None else max(1, min(N_FAST, first - prompt + 2))
    assert fast[:agree] == reference[:agree], (tokenizer.decode(fast), tokenizer.decode(reference))

    # On the same codes at every step: the patched path attends over a copy of the reference cache
    # (sharing the model's live config, which tells each layer how it is read) and must pick the
    # reference's token, with logits within 1e-3 (measured 3.4e-5).
    kwarg = hf.cache_kwarg(model)
    text = model.config.get_text_config(decoder=True)
    shared, ids, locked, worst = hf.make_cache(model, cfg), inputs["input_ids"][0].tolist(), [], 0.0
    for _ in range(N_FAST):
        fork = copy.deepcopy(shared, {id(model.config): model.config, id(text): text})
        tq_core.patch(model, config=cfg)
        try:
            fast_logits = _forward(model, ids, fork)[0, -1]
        finally:
            tq_core.unpatch(model)
        ref_logits = _forward(model, ids, shared)[0, -1]
        worst = max(worst, float((fast_logits - ref_logits).abs().max()))
        assert int(fast_logits.argmax()) == int(ref_logits.argmax()), (len(locked), tokenizer.decode(locked))
        ids = [int(ref_logits.argmax())]
        locked.append(ids[0])
    record_property("shared_codes_max_abs_logit_diff", worst)
    assert worst < 1e-3
    assert view_spy == {"attend": 2 * N_FAST * LAYERS, "dense": 2 * N_FAST * LAYERS}
    assert shared.layers[0].store.encoded_tokens == prompt + N_FAST - 1 - cfg.full_precision
    assert locked == reference, (tokenizer.decode(locked), tokenizer.decode(reference))  # generate()'s greedy path


@pytest.mark.parametrize("label", FAST_LABELS)
def test_patched_prefill_logits_match_reference_path(hf_model, corpus_ids, label, view_spy, record_property):
    """Prefill logits over the codes (patched) vs decoded (unpatched), within 1e-3 (logits ~40):
    a first chunk (its own tokens, no history), then a second chunk attending to the first as stored,
    both paths reading the very same codes (measured: 9.3e-05 and 5.3e-05)."""
    model, _ = hf_model
    cfg = CacheConfig.parse(label)
    kwarg = hf.cache_kwarg(model)

    def forward(cache, ids):
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=True, **{kwarg: cache}).logits[0]

    first, second = corpus_ids[:96], corpus_ids[96:160]
    ref_cache, fast_cache = hf.make_cache(model, cfg), hf.make_cache(model, cfg)
    ref_first = forward(ref_cache, first)
    assert torch.equal(forward(fast_cache, first), ref_first)  # the same path twice: the same codes
    assert view_spy["attend"] == 0
    tq_core.patch(model, config=cfg)
    try:
        fast_first = forward(hf.make_cache(model, cfg), first)
        fast_second = forward(fast_cache, second)
    finally:
        tq_core.unpatch(model)
    assert view_spy["attend"] == 2 * LAYERS
    assert fast_cache.layers[0].store.encoded_tokens == 160 - cfg.full_precision
    ref_second = forward(ref_cache, second)
    worst = {"first": float((fast_first - ref_first).abs().max()),
             "second": float((fast_second - ref_second).abs().max())}
    record_property("max_abs_logit_diff", max(worst.values()))
    assert max(worst.values()) < 1e-3, worst
    # and the second chunk really read a compressed history: it differs from the uncompressed model
    dyn = hf.dynamic_cache(model)
    forward(dyn, first)
    assert float((forward(dyn, second) - ref_second).abs().max()) > 1e-2


# ------------------------------------------------------------------ sliding-window configs


@pytest.fixture(scope="module")
def tiny_gemma3():
    """A 4-layer random Gemma3 text model, sliding and full attention layers interleaved."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _tiny_generate(model, n, **kwargs):
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_sliding_window_model(tiny_gemma3):
    model = tiny_gemma3
    kwarg = hf.cache_kwarg(model)
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=0, window=4)
    cache = hf.TurboQuantCache(model.config, config=cfg)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[1] is kinds[3] is hf.TurboQuantLayer
    assert kinds[0] is kinds[2] is transformers.cache_utils.DynamicSlidingWindowLayer

    new = _tiny_generate(model, 10, **{kwarg: cache})
    assert len(new) == 10
    held = 20 + 10 - 1
    assert [layer.store.encoded_tokens for layer in cache.compressed_layers()] == [held - 4] * 2
    for i in (1, 3):
        assert _hist(cache.layers[i].store)["codes"].dtype == torch.uint8
        assert cache.layers[i].keys.numel() == 0
    for i in (0, 2):  # transformers' own sliding layers keep sliding_window - 1 tokens
        assert cache.layers[i].keys.shape[-2] == 8 - 1
    parts = cache.nbytes()
    assert parts["uncompressed"] == 2 * 2 * (2 * 7 * 32 * 4)  # layers * (K,V) * heads*tokens*dim*fp32
    assert parts["window"] == 2 * 2 * (2 * 4 * 32 * 2)  # ... and the window in bfloat16

    # With everything inside the full-precision window the cache must reproduce DynamicCache: the
    # sliding layers really are transformers' and the full ones see every token. The window holds a
    # float32 model's K/V in bfloat16 (the same greedy tokens here), a 16-bit model's exactly.
    wide = hf.TurboQuantCache(model.config, bits_k=4, bits_v=2, sinks=0, window=1000)
    baseline = _tiny_generate(model, 10, **{kwarg: hf.dynamic_cache(model)})
    assert _tiny_generate(model, 10, **{kwarg: wide}) == baseline
    import copy

    model16 = copy.deepcopy(model).to(torch.bfloat16)
    wide16 = hf.TurboQuantCache(model16.config, bits_k=4, bits_v=2, sinks=0, window=1000)
    baseline16 = _tiny_generate(model16, 10, **{kwarg: hf.dynamic_cache(model16)})
    assert _tiny_generate(model16, 10, **{kwarg: wide16}) == baseline16
    assert all(layer.store.win_k.dtype == torch.bfloat16 for layer in wide16.compressed_layers())


def test_patch_sliding_window_model(tiny_gemma3, update_spy, view_spy):
    tq_core.patch(tiny_gemma3, bits_k=4, bits_v=2, sinks=0, window=0)
    try:
        assert len(_tiny_generate(tiny_gemma3, 4)) == 4
    finally:
        tq_core.unpatch(tiny_gemma3)
    cache = update_spy[0]
    assert [layer.layer_idx for layer in cache.compressed_layers()] == [1, 3]
    assert "generate" not in vars(tiny_gemma3)
    assert view_spy["attend"] == 2 * 4  # the two full-attention layers, over the codes, every step


@pytest.mark.parametrize("sliding, attending", [("keep", 2), ("codes", 4)], ids=lambda v: f"{v}")
def test_patched_sliding_window_model_matches_reference_path(tiny_gemma3, view_spy, sliding, attending):
    """GQA (4 query heads on 2 KV heads), Gemma's own scaling: the same greedy tokens over the codes as
    through the reference path, with the sliding layers left to sdpa (``keep``) or compressed and read
    over their codes under the library's sliding mask (``codes``: every layer attends over its codes)."""
    model, kwarg = tiny_gemma3, hf.cache_kwarg(tiny_gemma3)
    cfg = CacheConfig(bits_k=3, bits_v=2, sinks=2, window=4 if sliding == "keep" else 3, sliding=sliding)
    reference = _tiny_generate(model, 12, **{kwarg: hf.TurboQuantCache(model.config, config=cfg)})
    tq_core.patch(model, config=cfg)
    try:
        fast = _tiny_generate(model, 12, **{kwarg: hf.TurboQuantCache(model.config, config=cfg)})
    finally:
        tq_core.unpatch(model)
    assert view_spy["attend"] == attending * 12
    assert fast == reference


def test_sliding_layers_as_codes(tiny_gemma3):
    """``sw=codes``: sliding layers are compressed too, each holding only its last window - 1
    positions (no sinks), and the model's sliding mask reads exactly those."""
    model, kwarg = tiny_gemma3, hf.cache_kwarg(tiny_gemma3)
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=2, window=4, sliding="codes")
    cache = hf.TurboQuantCache(model.config, config=cfg)
    assert [type(layer) for layer in cache.layers] == [hf.TurboQuantSlidingLayer, hf.TurboQuantLayer] * 2
    assert len(_tiny_generate(model, 10, **{kwarg: cache})) == 10
    stores = [layer.store for layer in cache.layers]
    assert [s.held for s in stores] == [7, 29, 7, 29]
    assert [s.encoded_tokens for s in stores] == [3, 29 - 6, 3, 29 - 6]
    assert stores[0].sink_k is None and stores[1].sink_k.shape[2] == 2
    assert cache.nbytes()["uncompressed"] == 0

    # Everything in full precision: the same greedy tokens as DynamicCache (sliding layers included),
    # through the reference path and over the codes.
    wide = cfg.replace(window=1000)
    baseline = _tiny_generate(model, 12, **{kwarg: hf.dynamic_cache(model)})
    assert _tiny_generate(model, 12, **{kwarg: hf.TurboQuantCache(model.config, config=wide)}) == baseline
    tq_core.patch(model, config=wide)
    try:
        assert _tiny_generate(model, 12) == baseline
    finally:
        tq_core.unpatch(model)


# ------------------------------------------------------------------ beam search


def test_beam_search_reorders_compressed_cache(hf_model, monkeypatch):
    model, tokenizer = hf_model
    reorders = []
    original = hf.TurboQuantLayer.reorder_cache

    def reorder_cache(self, beam_idx):
        reorders.append(beam_idx.tolist())
        return original(self, beam_idx)

    monkeypatch.setattr(hf.TurboQuantLayer, "reorder_cache", reorder_cache)
    cache = hf.TurboQuantCache(model.config, bits_k=4, bits_v=2, sinks=0, window=0)
    inputs = _prompt(tokenizer)
    new = _greedy(model, tokenizer, inputs, 6, num_beams=2, **{hf.cache_kwarg(model): cache})
    assert len(new) == 6
    assert tokenizer.decode(new, skip_special_tokens=True).strip()
    assert reorders, "transformers did not reorder the cache during beam search"
    for layer in cache.layers:
        assert _hist(layer.store)["codes"].shape[0] == 2  # one row per beam
        assert _hist(layer.store)["codes"].dtype == torch.uint8


def test_reorder_cache_on_filled_cache(hf_model, corpus_ids):
    model, _ = hf_model
    cache = hf.TurboQuantCache(model.config, bits_k=4, bits_v=2, sinks=2, window=4)
    batch = torch.tensor([corpus_ids[:24], corpus_ids[24:48]])
    with torch.no_grad():
        model(batch, use_cache=True, **{hf.cache_kwarg(model): cache})

    def rows(layer):
        s = layer.store
        return [x.clone() for x in (s.sink_k, s.win_v, _hist(s, "k")["codes"], _hist(s, "v")["norms"])]

    before = [rows(layer) for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    for layer, old in zip(cache.layers, before):
        for new, ref in zip(rows(layer), old):
            assert torch.equal(new, ref.flip(0))
    cache.reorder_cache(torch.tensor([0, 0]))
    for layer in cache.layers:
        for x in rows(layer):
            assert torch.equal(x[0], x[1])
        assert layer.store.encoded_tokens == 24 - 2 - 4
    assert cache.get_seq_length() == 24


# ------------------------------------------------------------------ hardening (issue G)


def _tiny_llama(dtype=torch.float32):
    """A 2-layer random Llama (GQA 4 on 2, head_dim 32) in ``dtype``: generation costs milliseconds."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=512, initializer_range=0.2, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def _tiny_ids(rows=1, n=12, seed=1):
    return torch.randint(3, 97, (rows, n), generator=torch.Generator().manual_seed(seed))


def _tiny_greedy(model, ids, n, mask=None, **kwargs):
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.fixture
def stores_made(monkeypatch):
    """Every LayerStore built while the test runs (the integrations' caches build them lazily)."""
    made = []
    original = kvstore.LayerStore.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(kvstore.LayerStore, "__init__", init)
    return made


def _module_state() -> dict:
    """Size of every container and functools cache held at module level by tq_core's modules."""
    import sys

    out = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("tq_core") or mod is None:
            continue
        for attr, value in vars(mod).items():
            info = getattr(value, "cache_info", None)
            if callable(info):
                out[f"{name}.{attr}"] = info().currsize
            elif isinstance(value, (dict, list, set)) and not attr.startswith("__"):
                out[f"{name}.{attr}"] = len(value)
    return out


def _live_tensors() -> tuple[int, int]:
    """(count, bytes) of the torch tensors alive in the process, after a full collection."""
    import gc

    gc.collect()
    ts = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]  # type(): no __class__ hooks
    return len(ts), sum(t.nbytes for t in ts if not t.is_meta)


def test_30_patched_generates_hold_no_more_memory(hf_model):
    """Finding 1: every patched generate() pinned ~3 MB of rotation constants in a module-level
    cache keyed by id(). Constants now belong to each quantizer: 30 patched generate() calls (each
    encoding history, so each builds quantizers) leave no tensor and no module-level entry behind."""
    model, tokenizer = hf_model
    inputs = _prompt(tokenizer)
    tq_core.patch(model, config="K4V2+s2w4")  # a 4-token window: every call encodes history
    try:
        for _ in range(3):  # warm-up: lazily built, process-wide things (kernels, codebooks) exist now
            _greedy(model, tokenizer, inputs, 2)
        state, (count, nbytes) = _module_state(), _live_tensors()
        for _ in range(30):
            _greedy(model, tokenizer, inputs, 2)
        state_after, (count_after, nbytes_after) = _module_state(), _live_tensors()
    finally:
        tq_core.unpatch(model)
    grown = {k: (state.get(k), v) for k, v in state_after.items() if v != state.get(k)}
    assert not grown, f"module-level state grew over 30 patched generate() calls: {grown}"
    assert count_after <= count, f"{count_after - count} more live tensors after 30 patched generate() calls"
    assert nbytes_after <= nbytes, f"{nbytes_after - nbytes} more bytes of live tensors after 30 calls"


def test_deepcopy_of_patched_model_generates_with_its_own_weights():
    """Finding 2: the patched generate was a closure over the original model, which deepcopy copies
    as is: the copy generated with the original's weights. Now the copy's generate is its own."""
    import copy

    model = _tiny_llama()
    config = CacheConfig.parse("K4V2+s2w4")
    tq_core.patch(model, config=config)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-1.0)  # other weights: other tokens
    ids = _tiny_ids()
    own = _tiny_greedy(twin, ids, 12)
    expected = _tiny_greedy(twin, ids, 12, **{hf.cache_kwarg(twin): hf.make_cache(twin, config)})
    assert torch.equal(own, expected), "the copy did not generate with its own weights"
    assert not torch.equal(own, _tiny_greedy(model, ids, 12))
    assert patched_config(twin) == config and twin.generate.model is twin
    tq_core.unpatch(twin)
    assert patched_config(model) == config and model.generate.model is model  # the original keeps its patch
    tq_core.unpatch(model)


@pytest.mark.parametrize("label", ["K4V2+s4w8", "K4V2+s0w0", "uniform:K4V2+s2w4"])
def test_float64_model_generates_past_the_window(label, stores_made):
    """Finding 6: a float64 model is supported: it generates past sinks + window (the history is
    encoded from the 16-bit residual it held), over the codes and on the reference path alike."""
    model = _tiny_llama(torch.float64)
    ids = _tiny_ids(n=10)
    cache = hf.TurboQuantCache(model.config, config=CacheConfig.parse(label))
    reference = _tiny_greedy(model, ids, 40, **{hf.cache_kwarg(model): cache})
    tq_core.patch(model, config=label)
    try:
        fast = _tiny_greedy(model, ids, 40)
    finally:
        tq_core.unpatch(model)
    assert fast.shape == reference.shape == (1, 40)
    stores = stores_made[-2:]  # the patched call's two layers
    assert all(s.encoded_tokens == 10 + 40 - 1 - s.sinks - s.config.window for s in stores)
    dense = stores[0].snapshot().dense(torch.float64, torch.float64)
    assert dense[0].dtype == torch.float64 and bool(torch.isfinite(dense[0]).all())
    assert (fast == reference).float().mean() >= 0.9, (fast, reference)


def test_user_cache_is_never_replaced(hf_model, update_spy):
    """Finding 7: a cache the caller passes, under either name transformers accepts, is the one
    generate uses (5.24 names it ``cache=`` and still takes ``past_key_values=``)."""
    model, tokenizer = hf_model
    inputs = _prompt(tokenizer)
    tq_core.patch(model, bits_k=4, bits_v=2)
    try:
        # past_key_values= on every version (deprecated on 5.24), cache= where the model takes it
        for name in dict.fromkeys(("past_key_values", hf.cache_kwarg(model))):
            update_spy.clear()
            dyn = hf.dynamic_cache(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated in 5.24
                _greedy(model, tokenizer, inputs, 2, **{name: dyn})
            assert dyn.get_seq_length() == inputs["input_ids"].shape[1] + 1, f"{name}= cache was not used"
            assert not update_spy, f"{name}= cache was replaced by a compressed one"
    finally:
        tq_core.unpatch(model)


def test_use_cache_false_does_not_compress(hf_model, stores_made):
    """Finding 7: ``use_cache=False`` (argument or generation config) generates without a cache,
    patched or not: nothing is compressed, and the tokens are the unpatched model's."""
    model, tokenizer = hf_model
    inputs = _prompt(tokenizer)
    plain = _greedy(model, tokenizer, inputs, 3, use_cache=False)
    tq_core.patch(model, config="K4V2+s0w0")
    try:
        assert _greedy(model, tokenizer, inputs, 3, use_cache=False) == plain
        gen = copy_generation_config(model, use_cache=False)
        assert _greedy(model, tokenizer, inputs, 3, generation_config=gen) == plain
        assert not stores_made, "use_cache=False still built compressed layer stores"
        _greedy(model, tokenizer, inputs, 1)
        assert stores_made  # while the default still compresses
    finally:
        tq_core.unpatch(model)


def copy_generation_config(model, **changes):
    import copy

    gen = copy.deepcopy(model.generation_config)
    for k, v in changes.items():
        setattr(gen, k, v)
    return gen


LEFT = "Tell me a story about"  # the short row, left-padded to the long one


def _left_padded(tokenizer):
    long = tokenizer(PROMPT)["input_ids"]
    short = tokenizer(LEFT)["input_ids"]
    pad = len(long) - len(short)
    ids = torch.tensor([long, [tokenizer.eos_token_id] * pad + short])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask, pad


def test_left_padded_batch_sinks_are_the_first_real_tokens(hf_model, stores_made):
    """Finding 9: in a left-padded batch each row's sinks are its first real tokens, not padding:
    the sink region holds the padding plus ``sinks`` tokens, and the short row's sinks equal those
    of the same prompt generated alone; the short row generates what it generates alone."""
    model, tokenizer = hf_model
    ids, mask, pad = _left_padded(tokenizer)
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=4)
    tq_core.patch(model, config=cfg)
    try:
        batch = _tiny_greedy(model, ids, 6, mask=mask, pad_token_id=tokenizer.eos_token_id)
        batch_stores = list(stores_made)
        stores_made.clear()
        alone = _tiny_greedy(model, ids[1:, pad:], 6, pad_token_id=tokenizer.eos_token_id)
        alone_stores = list(stores_made)
    finally:
        tq_core.unpatch(model)
    assert len(batch_stores) == len(alone_stores) == LAYERS
    for b, a in zip(batch_stores, alone_stores):
        assert b.lead == pad and b.sink_k.shape[2] == pad + cfg.sinks
        assert b.encoded_tokens > 0 and a.encoded_tokens > 0
        torch.testing.assert_close(b.sink_k[1:, :, pad:].float(), a.sink_k.float(), atol=0.05, rtol=0.02)
    assert batch[1].tolist() == alone[0].tolist()


def test_untold_left_padding_is_refused(hf_model):
    """Finding 9: a cache built by hand for a left-padded batch (its sinks would hold padding) is
    refused by attention over the codes with one error naming ``left_padding``; told, it works."""
    model, tokenizer = hf_model
    ids, mask, pad = _left_padded(tokenizer)
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=4)
    tq_core.patch(model, config=cfg)
    try:
        with torch.no_grad():
            with pytest.raises(ValueError, match=rf"left-padded batch: .* left_padding={pad}"):
                model(ids, attention_mask=mask, use_cache=True,
                      **{hf.cache_kwarg(model): hf.TurboQuantCache(model.config, config=cfg)})
            told = hf.TurboQuantCache(model.config, config=cfg, left_padding=hf.left_padding(mask))
            model(ids, attention_mask=mask, use_cache=True, **{hf.cache_kwarg(model): told})
        assert told.layers[0].store.sink_k.shape[2] == pad + cfg.sinks
    finally:
        tq_core.unpatch(model)


def test_patch_refuses_what_is_not_a_model(hf_model):
    """Finding 10: ``patch`` on a tokenizer, a layer or a base model without generate() refuses
    with one TypeError and leaves it untouched."""
    model, tokenizer = hf_model
    for thing in (tokenizer, model.model.layers[0], model.model, _tiny_llama().model):
        before = dict(vars(thing))
        with pytest.raises(TypeError, match="model must be a transformers"):
            tq_core.patch(thing)
        assert patched_config(thing) is None and "generate" not in vars(thing)
        assert vars(thing).keys() == before.keys()
