"""Centered keys (``CacheConfig.center``, label option ``c=1``; ``tq_core/kvstore.py``).

A centered store holds every key minus a per-head mean fixed when tokens first leave the window
(the first ``window + 1`` positions after the sinks, rounded to 16 bits as the window holds them):
the same center whatever the call sizes. Attention is unchanged by a key offset shared by all
positions, so ``View.attend`` must still agree with a float64 softmax over ``View.dense`` (which adds
the center back), values are held as without centering, and keys dominated by an offset must lose
far less to the codes than without centering.
"""

from __future__ import annotations

import numpy as np
import pytest

from tq_core.config import CacheConfig
from tq_core.kvstore import LayerStore

from test_kvstore import ALL_LIBS, LIBS, B, D, _causal, _dense, _np, _r16, _reference, _to

OFFSET_K, OFFSET_V = 12.0, 2.0  # per-head offsets, in units of the per-token spread


def _offset_data(t: int, seed: int, heads: int = 2):
    """Keys/values (B, heads, t, D) = a per-head constant offset + a smaller token-varying part."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, heads, t, D)) + OFFSET_K * rng.standard_normal((1, heads, 1, D)) / np.sqrt(D) * 8
    v = rng.standard_normal((B, heads, t, D)) + OFFSET_V * rng.standard_normal((1, heads, 1, D))
    return k.astype(np.float32), v.astype(np.float32)


def _cfg(center: bool, sinks: int = 4, window: int = 8, **kw) -> CacheConfig:
    return CacheConfig(bits_k=4, bits_v=2, sinks=sinks, window=window, center=center, **kw)


def test_label_round_trip_and_refusals():
    cfg = _cfg(True)
    assert cfg.label == "K4V2+s4w8+c=1"
    assert CacheConfig.parse(cfg.label) == cfg
    assert CacheConfig.parse("K4V2+s4w8+c=0") == _cfg(False)
    assert cfg.centers_keys and not _cfg(False).centers_keys
    with pytest.raises(ValueError, match="center is not an option of method 'uniform'"):
        CacheConfig(method="uniform", center=True)
    with pytest.raises(TypeError, match="center must be a bool"):
        CacheConfig(center=1)
    with pytest.raises(ValueError, match="c=0, c=1"):
        CacheConfig.parse("K4V2+c=2")


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("layout", [(4, 8), (0, 0), (2, 0)])
def test_centers_are_the_first_positions_mean_whatever_the_chunking(lib, layout):
    sinks, window = layout
    k, v = _offset_data(40, seed=1)
    first = slice(sinks, sinks + window + 1)
    centers = []
    for chunks in ([40], [1] * 40, [3, 7, 1, 29], [sinks + window, 1, 39 - sinks - window]):
        store = LayerStore(_cfg(True, sinks, window), 0, D)
        start = 0
        for n in chunks:
            if store.center_k is None:
                assert "centers" not in store.nbytes()
            store.update(_to(lib, k[:, :, start:start + n]), _to(lib, v[:, :, start:start + n]))
            start += n
        centers.append(_np(store.center_k))
        assert store.nbytes()["centers"] == B * 2 * D * 4  # float32, one vector per KV head
        assert not hasattr(store, "center_v")  # values are held as without centering
    for ck in centers:
        np.testing.assert_array_equal(ck, centers[0])
    want_k = _r16(lib, k[:, :, first]).astype(np.float64).mean(2, keepdims=True)
    np.testing.assert_allclose(centers[0], want_k, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lib", ALL_LIBS)
def test_no_centers_before_tokens_leave_the_window(lib):
    k, v = _offset_data(12, seed=2)
    store = LayerStore(_cfg(True), 0, D)
    store.update(_to(lib, k), _to(lib, v))  # 4 sinks + 8 in the window: nothing encoded yet
    assert store.center_k is None and store.encoded_tokens == 0
    keys, values = _dense(store.snapshot(), _to(lib, k), _to(lib, v))
    np.testing.assert_array_equal(keys, _r16(lib, k))


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layout", [(4, 8), (0, 0)])
@pytest.mark.parametrize("held, tq", [(0, 5), (40, 1), (40, 5), (9, 7)])
def test_centered_attend_matches_dense_reference(lib, groups, layout, held, tq):
    """Attention over the centered codes (every key's logit shifted alike) equals a float64 softmax
    over what ``dense`` gives back (every held key plus the center)."""
    sinks, window = layout
    heads = 2
    k, v = _offset_data(held + tq, seed=3 + held + tq, heads=heads)
    store = LayerStore(_cfg(True, sinks, window), 1, D)
    if held:
        store.update(_to(lib, k[:, :, :held]), _to(lib, v[:, :, :held]))
    kk, vv = _to(lib, k[:, :, held:]), _to(lib, v[:, :, held:])
    view = store.update(kk, vv)
    assert (view.center_k is not None) == (held > sinks + window)
    rng = np.random.default_rng(4)
    q = rng.standard_normal((B, heads * groups, tq, D)).astype(np.float32)
    scale = D ** -0.5
    out = _np(view.attend(_to(lib, q), scale))
    keys, values = (x.astype(np.float64) for x in _dense(view, kk, vv))
    ref = _reference(q.astype(np.float64), keys, values, scale, _causal(held + tq, tq))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * OFFSET_V)


@pytest.mark.parametrize("lib", ALL_LIBS)
def test_dense_gives_back_the_tokens_held(lib):
    """Sinks and window come back as the originals to 16-bit rounding of what is held (the centered
    key), the history to the codes' error: the center is added back, not lost; values are held
    exactly as an uncentered store holds them."""
    k, v = _offset_data(60, seed=5)
    store = LayerStore(_cfg(True), 0, D)
    for i in range(60):
        store.update(_to(lib, k[:, :, i:i + 1]), _to(lib, v[:, :, i:i + 1]))
    keys, values = _dense(store.snapshot(), _to(lib, k), _to(lib, v))
    eps = 2.0 ** -8 if lib != "numpy" else 2.0 ** -11  # bfloat16 / float16 rounding, relative
    # the window was centered before its 16-bit rounding; the sinks were held (rounded) before the
    # centers existed, then re-held centered: rounded twice, on the scale of the raw keys
    spread_k = np.abs(k - _np(store.center_k)).max()
    np.testing.assert_allclose(keys[:, :, 52:], k[:, :, 52:], rtol=0, atol=eps * spread_k + 1e-5)
    np.testing.assert_allclose(keys[:, :, :4], k[:, :, :4], rtol=0, atol=eps * (np.abs(k).max() + spread_k) + 1e-5)
    hist = slice(4, 52)
    rel = ((keys[:, :, hist] - k[:, :, hist]) ** 2).sum(-1) / ((k[:, :, hist] - _np(store.center_k)) ** 2).sum(-1)
    assert 0.002 < rel.mean() < 0.03  # 4-bit codes of the centered keys (D_mse 0.0093 at d=64 ± rounding)
    plain = LayerStore(_cfg(False), 0, D)
    for i in range(60):
        plain.update(_to(lib, k[:, :, i:i + 1]), _to(lib, v[:, :, i:i + 1]))
    np.testing.assert_array_equal(values, _dense(plain.snapshot(), _to(lib, k), _to(lib, v))[1])


@pytest.mark.parametrize("lib", LIBS)
def test_centering_cuts_the_error_of_offset_dominated_keys(lib):
    """Decode semantics over keys that are mostly one offset: attention outputs against the exact ones
    (float64, uncompressed) lose at least 10x less with centering."""
    heads, t = 2, 80
    k, v = _offset_data(t, seed=6, heads=heads)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((B, heads, t, D)).astype(np.float32)
    scale = D ** -0.5
    exact = np.concatenate([_reference(q[:, :, i:i + 1].astype(np.float64), k[:, :, :i + 1].astype(np.float64),
                                       v[:, :, :i + 1].astype(np.float64), scale, True) for i in range(t)], 2)
    err = {}
    for center in (False, True):
        # 8-bit values: their error is the same either way; what is compared is the keys'
        store = LayerStore(CacheConfig(bits_k=4, bits_v=8, sinks=4, window=8, center=center), 0, D)
        outs = [_np(store.update(_to(lib, k[:, :, i:i + 1]), _to(lib, v[:, :, i:i + 1])).attend(
            _to(lib, q[:, :, i:i + 1]), scale)) for i in range(t)]
        out = np.concatenate(outs, 2)[:, :, 20:]  # where the history is read
        err[center] = float(((out - exact[:, :, 20:]) ** 2).mean() / (exact[:, :, 20:] ** 2).mean())
    assert err[True] < err[False] / 10, err


@pytest.mark.parametrize("lib", ALL_LIBS)
def test_select_batch_reorders_the_centers(lib):
    from test_kvstore import _idx

    k, v = _offset_data(20, seed=8)
    store = LayerStore(_cfg(True), 0, D)
    store.update(_to(lib, k), _to(lib, v))
    before = _np(store.center_k)
    store.select_batch(_idx(lib, [1, 0]))
    np.testing.assert_array_equal(_np(store.center_k), before[[1, 0]])
