"""LayerStore (tq_core/kvstore.py): what attention reads, what is stored, bytes, batch reordering.

Layout along the token axis: [ sinks (exact) | history (codes + fp16 norms) | window (exact) ],
and ``update`` returns that followed by the call's own tokens, exact.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tq_core import codebook
from tq_core.config import CacheConfig
from tq_core.kvstore import LayerStore

HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx.core") is not None

B, H, D = 2, 3, 64
LIBS = ["torch", pytest.param("mlx", marks=[pytest.mark.mlx,
                                            pytest.mark.skipif(not HAVE_MLX, reason="mlx is not importable")])]
CFG = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=8, seed=0)


def _data(t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, t, D)).astype(np.float32),
            rng.standard_normal((B, H, t, D)).astype(np.float32))


def _to(lib: str, a: np.ndarray):
    if lib == "torch":
        return torch.from_numpy(np.ascontiguousarray(a))
    import mlx.core as mx

    return mx.array(a)


def _np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.array(x)


def _idx(lib: str, idx: list[int]):
    if lib == "torch":
        return torch.tensor(idx)
    import mlx.core as mx

    return mx.array(idx)


def _feed(lib, store, k, v, chunks):
    """Feed k, v (numpy, full length) in chunks; yield (start, n, keys, values) per call."""
    start = 0
    for n in chunks:
        keys, values = store.update(_to(lib, k[:, :, start:start + n]), _to(lib, v[:, :, start:start + n]))
        yield start, n, _np(keys), _np(values)
        start += n


def _rel_mse(x_hat: np.ndarray, x: np.ndarray) -> float:
    """Mean over vectors of |x_hat - x|^2 / |x|^2."""
    x64, h64 = x.astype(np.float64), x_hat.astype(np.float64)
    return float(np.mean(np.sum((h64 - x64) ** 2, -1) / np.sum(x64**2, -1)))


# ----------------------------------------------------------------------------- what update returns


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("chunks", [[35], [7] * 5, [1] * 35, [3, 10, 1, 21]])
def test_update_returns_exact_and_decoded_parts(lib, chunks):
    k, v = _data(35, 1)
    store = LayerStore(CFG, layer=2, head_dim=D)
    s, w = CFG.sinks, CFG.window
    for start, n, keys, values in _feed(lib, store, k, v, chunks):
        total = start + n
        assert store.length == total
        assert keys.shape == values.shape == (B, H, total, D)
        # this call's tokens: exact
        np.testing.assert_array_equal(keys[:, :, start:], k[:, :, start:total])
        np.testing.assert_array_equal(values[:, :, start:], v[:, :, start:total])
        # sinks: exact, forever
        ns = min(s, start)
        np.testing.assert_array_equal(keys[:, :, :ns], k[:, :, :ns])
        np.testing.assert_array_equal(values[:, :, :ns], v[:, :, :ns])
        # window: the last `window` earlier tokens after the sinks, exact
        lo = max(s, start - w)
        np.testing.assert_array_equal(keys[:, :, lo:start], k[:, :, lo:start])
        np.testing.assert_array_equal(values[:, :, lo:start], v[:, :, lo:start])
        # history: decoded, exactly what the store's own quantizers give for those tokens
        if lo > s:
            hk, hv = keys[:, :, s:lo], values[:, :, s:lo]
            ref_k = _np(store.qk.decode(store.qk.encode(_to(lib, k[:, :, s:lo]))))
            ref_v = _np(store.qv.decode(store.qv.encode(_to(lib, v[:, :, s:lo]))))
            np.testing.assert_allclose(hk, ref_k, rtol=0, atol=1e-5)
            np.testing.assert_allclose(hv, ref_v, rtol=0, atol=1e-5)
            assert np.all(np.any(hk != k[:, :, s:lo], axis=-1))  # every vector was quantized
            assert np.all(np.any(hv != v[:, :, s:lo], axis=-1))
    assert store.encoded_tokens == 35 - s - w


@pytest.mark.parametrize("lib", LIBS)
def test_decoded_error_consistent_with_bits(lib):
    k, v = _data(200, 2)
    store = LayerStore(CFG, layer=0, head_dim=D)
    store.update(_to(lib, k), _to(lib, v))
    keys, values = (_np(a) for a in store.update(_to(lib, k[:, :, :1]), _to(lib, v[:, :, :1])))
    hist = slice(CFG.sinks, 200 - CFG.window)  # 188 tokens x 6 heads = 1128 vectors
    dk, dv = codebook.load(D, 4).mse, codebook.load(D, 2).mse  # 0.00913, 0.1145
    ek, ev = _rel_mse(keys[:, :, hist], k[:, :, hist]), _rel_mse(values[:, :, hist], v[:, :, hist])
    # relative error of a norm-corrected code: between ~D and D + D^2/4 (measured 0.00885, 0.1169)
    assert 0.85 * dk < ek < 1.15 * (dk + dk * dk / 4)
    assert 0.85 * dv < ev < 1.15 * (dv + dv * dv / 4)


@pytest.mark.parametrize("lib", LIBS)
def test_no_sinks_no_window_everything_earlier_is_decoded(lib):
    cfg = CacheConfig(bits_k=3, bits_v=3, sinks=0, window=0)
    k, v = _data(10, 3)
    store = LayerStore(cfg, 0, D)
    for start, n, keys, values in _feed(lib, store, k, v, [4, 6]):
        np.testing.assert_array_equal(keys[:, :, start:], k[:, :, start:start + n])
        assert np.all(np.any(keys[:, :, :start] != k[:, :, :start], axis=-1))
    assert store.encoded_tokens == 10
    assert store.nbytes()["sinks"] == store.nbytes()["window"] == 0


# ----------------------------------------------------------------------------- what is stored


def _stored(store):
    out = {}
    for name in ("sink_k", "sink_v", "win_k", "win_v"):
        x = getattr(store, name)
        out[name] = None if x is None else _np(x).copy()
    for name in ("hist_k", "hist_v"):
        e = getattr(store, name)
        out[name + ".codes"] = None if e is None else _np(e.codes).copy()
        out[name + ".norms"] = None if e is None else _np(e.norms).copy()
    return out


@pytest.mark.parametrize("lib", LIBS)
def test_history_is_append_only(lib):
    k, v = _data(60, 4)
    store = LayerStore(CFG, 1, D)
    snapshots = []
    for _ in _feed(lib, store, k, v, [20, 1, 9, 1, 1, 28]):
        snapshots.append(_stored(store))
    final = snapshots[-1]
    for snap in snapshots:
        for name in ("hist_k.codes", "hist_k.norms", "hist_v.codes", "hist_v.norms"):
            old = snap[name]
            if old is None:
                continue
            n = old.shape[2]
            new = final[name][:, :, :n]
            assert new.tobytes() == old.tobytes(), f"{name} of old tokens changed"


@pytest.mark.parametrize("lib", LIBS)
def test_chunking_does_not_change_what_is_stored(lib):
    k, v = _data(35, 5)
    stores = {}
    for chunks in ([35], [7] * 5, [1] * 35, [3, 10, 1, 21]):
        store = LayerStore(CFG, 3, D)
        for _ in _feed(lib, store, k, v, chunks):
            pass
        stores[tuple(chunks)] = store
    ref = _stored(stores[(35,)])
    assert ref["hist_k.codes"].shape == (B, H, 23, 32) and ref["hist_v.codes"].shape == (B, H, 23, 16)
    for chunks, store in stores.items():
        assert store.length == 35 and store.encoded_tokens == 23
        got = _stored(store)
        for name, arr in ref.items():
            assert got[name].tobytes() == arr.tobytes(), (chunks, name)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("t", [0, 3, 4, 10, 12, 13, 50])
def test_nbytes_parts(lib, t):
    store = LayerStore(CFG, 0, D)
    k, v = _data(max(t, 1), 6)
    if t:
        store.update(_to(lib, k), _to(lib, v))
    parts = store.nbytes()
    assert set(parts) == {"codes", "norms", "sinks", "window", "other"}
    assert parts["other"] == 0  # the store holds nothing beyond its layout
    e = store.encoded_tokens
    assert e == max(0, t - CFG.sinks - CFG.window)
    # K4/V2 at d=64: 32 + 16 code bytes and 2 + 2 norm bytes per token per head
    assert store.qk.bytes_per_vector() + store.qv.bytes_per_vector() == 52
    assert parts["codes"] == e * B * H * (32 + 16)
    assert parts["norms"] == e * B * H * (2 + 2)
    assert parts["codes"] + parts["norms"] == e * B * H * 52
    assert parts["sinks"] == min(t, CFG.sinks) * B * H * D * 4 * 2
    assert parts["window"] == min(max(t - CFG.sinks, 0), CFG.window) * B * H * D * 4 * 2
    # the parts add up to every array the store holds
    held = sum(a.nbytes for a in _stored(store).values() if a is not None)
    assert sum(parts.values()) == held


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("idx", [[1, 0], [1, 1]])
def test_select_batch_reorders_every_part(lib, idx):
    k, v = _data(30, 7)
    store = LayerStore(CFG, 0, D)
    for _ in _feed(lib, store, k, v, [25, 5]):
        pass
    before = _stored(store)
    twin = LayerStore(CFG, 0, D)
    for _ in _feed(lib, twin, k, v, [25, 5]):
        pass
    store.select_batch(_idx(lib, idx))
    after = _stored(store)
    for name, arr in before.items():
        assert arr is not None, name  # every part is populated, so every part is checked
        np.testing.assert_array_equal(after[name], arr[idx], err_msg=name)
    assert store.length == 30
    # and attention then reads the reordered cache
    nk, nv = _data(1, 8)
    keys, values = (_np(a) for a in store.update(_to(lib, nk[idx]), _to(lib, nv[idx])))
    ref_k, ref_v = (_np(a) for a in twin.update(_to(lib, nk), _to(lib, nv)))
    np.testing.assert_allclose(keys, ref_k[idx], rtol=0, atol=1e-6)
    np.testing.assert_allclose(values, ref_v[idx], rtol=0, atol=1e-6)


@pytest.mark.parametrize("lib", LIBS)
def test_fp16_inputs(lib):
    k, v = _data(20, 9)
    if lib == "torch":
        kk, vv = torch.from_numpy(k).half(), torch.from_numpy(v).half()
    else:
        import mlx.core as mx

        kk, vv = mx.array(k).astype(mx.float16), mx.array(v).astype(mx.float16)
    store = LayerStore(CFG, 0, D)
    store.update(kk, vv)
    keys, values = store.update(kk[:, :, :2], vv[:, :, :2])
    assert keys.dtype == kk.dtype and values.dtype == vv.dtype
    assert tuple(keys.shape) == (B, H, 22, D)
    assert store.nbytes()["sinks"] == CFG.sinks * B * H * D * 2 * 2


# ----------------------------------------------------------------------------- torch vs mlx


@pytest.mark.mlx
@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not importable")
def test_torch_and_mlx_stores_agree():
    k, v = _data(40, 10)
    st, sm = LayerStore(CFG, 5, D), LayerStore(CFG, 5, D)
    for (_, _, kt, vt), (_, _, km, vm) in zip(_feed("torch", st, k, v, [17, 1, 22]),
                                              _feed("mlx", sm, k, v, [17, 1, 22])):
        assert kt.shape == km.shape and vt.shape == vm.shape
        # rare float32 boundary flips could change a code; everything else agrees to rounding
        assert np.mean(np.abs(kt - km) > 1e-4) < 1e-3
        assert np.mean(np.abs(vt - vm) > 1e-4) < 1e-3
    assert st.length == sm.length == 40
    assert st.encoded_tokens == sm.encoded_tokens == 28
    assert st.nbytes() == sm.nbytes()
    a, b = _stored(st), _stored(sm)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert a[name].dtype == b[name].dtype, name
    for name in ("hist_k.codes", "hist_v.codes"):
        assert np.mean(a[name] != b[name]) < 1e-3
