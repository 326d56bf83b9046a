"""LayerStore (tq_core/kvstore.py): what attention reads, what is stored, bytes, batch reordering,
preallocated growth, and attention over what is held (``View.attend``).

Layout along the token axis: [ sinks (16-bit) | history (the method's fields) | window (16-bit) ],
and ``update`` returns a ``View``: that, followed by the call's own tokens, exact (input precision).
Sinks and window are held in 16 bits: the input's dtype when it is float16/bfloat16, else bfloat16
(numpy: float16), so they equal the originals rounded to that dtype, bit for bit; tokens leaving
the window are encoded from those 16-bit values.
``View.dense`` decodes the history (the reference path); ``View.attend`` attends in the method's
space (TurboQuant: rotated queries against ``s * c[code]``) and must agree with a float64 softmax
over ``View.dense``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tq_core import codebook
from tq_core import kvstore
from tq_core.config import CacheConfig
from tq_core.kvstore import LayerStore

HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx.core") is not None

B, H, D = 2, 3, 64
MLX = pytest.param("mlx", marks=[pytest.mark.mlx, pytest.mark.skipif(not HAVE_MLX, reason="mlx is not importable")])
LIBS = ["torch", MLX]
ALL_LIBS = ["numpy", "torch", MLX]
METHODS = ["turboquant", "uniform"]
CFG = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=8, seed=0)


def _data(t: int, seed: int, heads: int = H) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, heads, t, D)).astype(np.float32),
            rng.standard_normal((B, heads, t, D)).astype(np.float32))


def _to(lib: str, a: np.ndarray):
    if lib == "numpy":
        return np.ascontiguousarray(a)
    if lib == "torch":
        return torch.from_numpy(np.ascontiguousarray(a))
    import mlx.core as mx

    return mx.array(a)


def _np(x) -> np.ndarray:
    """Values as numpy (bfloat16, which numpy lacks, widened exactly to float32)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    import mlx.core as mx

    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def _raw(x) -> np.ndarray:
    """What an array holds, as numpy with the same bytes (bfloat16 as its uint16 bit patterns), so
    byte comparisons and byte counts see exactly what is stored."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    import mlx.core as mx

    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def _r16(lib: str, a: np.ndarray) -> np.ndarray:
    """float32 ``a`` rounded to the 16-bit dtype the store holds sinks and window of a float32 input
    in (numpy: float16; torch, mlx: bfloat16, rounded here by torch), widened back to float32."""
    if lib == "numpy":
        return a.astype(np.float16).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a)).bfloat16().float().numpy()


def _idx(lib: str, idx: list[int]):
    if lib == "numpy":
        return np.array(idx)
    if lib == "torch":
        return torch.tensor(idx)
    import mlx.core as mx

    return mx.array(idx)


def _dense(view, k, v):
    """What the old ``update`` returned: (keys, values) as numpy, the history decoded."""
    keys, values = view.dense(k.dtype, v.dtype)
    return _np(keys), _np(values)


def _feed(lib, store, k, v, chunks):
    """Feed k, v (numpy, full length) in chunks; yield (start, n, keys, values) per call."""
    start = 0
    for n in chunks:
        kk, vv = _to(lib, k[:, :, start:start + n]), _to(lib, v[:, :, start:start + n])
        keys, values = _dense(store.update(kk, vv), kk, vv)
        yield start, n, keys, values
        start += n


def _rel_mse(x_hat: np.ndarray, x: np.ndarray) -> float:
    """Mean over vectors of |x_hat - x|^2 / |x|^2."""
    x64, h64 = x.astype(np.float64), x_hat.astype(np.float64)
    return float(np.mean(np.sum((h64 - x64) ** 2, -1) / np.sum(x64**2, -1)))


def _vector_bytes(codec) -> int:
    """Bytes one encoded vector holds, from the codec's own field declarations."""
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
               for shape, dtype in codec.fields().values())


# ----------------------------------------------------------------------------- what update returns


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("chunks", [[35], [7] * 5, [1] * 35, [3, 10, 1, 21]])
def test_update_returns_exact_and_decoded_parts(lib, chunks):
    k, v = _data(35, 1)
    store = LayerStore(CFG, layer=2, head_dim=D)
    s, w = CFG.sinks, CFG.window
    qk, qv = store.codec_k.q, store.codec_v.q  # the TurboQuantizers of this layer
    for start, n, keys, values in _feed(lib, store, k, v, chunks):
        total = start + n
        assert store.length == total
        assert keys.shape == values.shape == (B, H, total, D)
        # this call's tokens: exact
        np.testing.assert_array_equal(keys[:, :, start:], k[:, :, start:total])
        np.testing.assert_array_equal(values[:, :, start:], v[:, :, start:total])
        # sinks: the originals rounded to the store's 16-bit dtype, exactly, forever
        ns = min(s, start)
        np.testing.assert_array_equal(keys[:, :, :ns], _r16(lib, k[:, :, :ns]))
        np.testing.assert_array_equal(values[:, :, :ns], _r16(lib, v[:, :, :ns]))
        # window: the last `window` earlier tokens after the sinks, rounded to 16 bits, exactly
        lo = max(s, start - w)
        np.testing.assert_array_equal(keys[:, :, lo:start], _r16(lib, k[:, :, lo:start]))
        np.testing.assert_array_equal(values[:, :, lo:start], _r16(lib, v[:, :, lo:start]))
        # history: decoded, exactly what the store's own quantizers give for those tokens as the
        # window held them (16-bit)
        if lo > s:
            hk, hv = keys[:, :, s:lo], values[:, :, s:lo]
            ref_k = _np(qk.decode(qk.encode(_to(lib, _r16(lib, k[:, :, s:lo])))))
            ref_v = _np(qv.decode(qv.encode(_to(lib, _r16(lib, v[:, :, s:lo])))))
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
    kk, vv = _to(lib, k[:, :, :1]), _to(lib, v[:, :, :1])
    keys, values = _dense(store.update(kk, vv), kk, vv)
    hist = slice(CFG.sinks, 200 - CFG.window)  # 188 tokens x 6 heads = 1128 vectors
    dk, dv = codebook.load(D, 4).mse, codebook.load(D, 2).mse  # 0.00913, 0.1145
    ek, ev = _rel_mse(keys[:, :, hist], k[:, :, hist]), _rel_mse(values[:, :, hist], v[:, :, hist])
    # relative error of a norm-corrected code: between ~D and D + D^2/4 (measured 0.00885, 0.1169)
    assert 0.85 * dk < ek < 1.15 * (dk + dk * dk / 4)
    assert 0.85 * dv < ev < 1.15 * (dv + dv * dv / 4)


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_no_sinks_no_window_everything_earlier_is_decoded(lib, method):
    cfg = CacheConfig(bits_k=3, bits_v=3, sinks=0, window=0, method=method)
    k, v = _data(10, 3)
    store = LayerStore(cfg, 0, D)
    for start, n, keys, values in _feed(lib, store, k, v, [4, 6]):
        np.testing.assert_array_equal(keys[:, :, start:], k[:, :, start:start + n])
        assert np.all(np.any(keys[:, :, :start] != k[:, :, :start], axis=-1))
    assert store.encoded_tokens == 10
    assert store.nbytes()["sinks"] == store.nbytes()["window"] == 0


@pytest.mark.parametrize("lib", ALL_LIBS)
def test_update_returns_a_view_of_the_state_before_the_call(lib):
    """The View of a call is the layer before the call plus the call's own tokens (new), and the
    store has taken the tokens by the time update returns."""
    k, v = _data(20, 11)
    store = LayerStore(CFG, 0, D)
    kk, vv = _to(lib, k[:, :, :15]), _to(lib, v[:, :, :15])
    first = store.update(kk, vv)
    assert isinstance(first, kvstore.View)
    assert first.history == 0 and store.length == 15 and store.encoded_tokens == 15 - 12
    nk, nv = _to(lib, k[:, :, 15:]), _to(lib, v[:, :, 15:])
    view = store.update(nk, nv)
    assert view.history == 3  # encoded before this call; this call's spill is not in its view
    assert store.encoded_tokens == 20 - 12
    keys, values = _dense(view, nk, nv)
    assert keys.shape == (B, H, 20, D)


# ----------------------------------------------------------------------------- what is stored


def _stored(store):
    """Copies of every part the store holds: sinks, window, and the held tokens of each history field."""
    out = {}
    for name in ("sink_k", "sink_v", "win_k", "win_v"):
        x = getattr(store, name)
        out[name] = None if x is None else _raw(x).copy()
    for name in ("hist_k", "hist_v"):
        hist = getattr(store, name)
        fields = getattr(store, "codec_" + name[-1]).fields()
        parts = hist.parts() if hist.n else {}
        for field in fields:
            out[f"{name}.{field}"] = _raw(parts[field]).copy() if field in parts else None
    return out


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_history_is_append_only(lib, method):
    k, v = _data(60, 4)
    store = LayerStore(CFG.replace(method=method), 1, D)
    snapshots = []
    for _ in _feed(lib, store, k, v, [20, 1, 9, 1, 1, 28]):
        snapshots.append(_stored(store))
    final = snapshots[-1]
    hist_names = [n for n in final if n.startswith("hist_")]
    assert len(hist_names) == 2 * len(store.codec_k.fields())
    for snap in snapshots:
        for name in hist_names:
            old = snap[name]
            if old is None:
                continue
            n = old.shape[2]
            new = final[name][:, :, :n]
            assert new.tobytes() == old.tobytes(), f"{name} of old tokens changed"


@pytest.mark.parametrize("lib", ALL_LIBS)
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
    assert ref["hist_k.norms"].shape == ref["hist_v.norms"].shape == (B, H, 23)
    for chunks, store in stores.items():
        assert store.length == 35 and store.encoded_tokens == 23
        got = _stored(store)
        for name, arr in ref.items():
            assert got[name].tobytes() == arr.tobytes(), (chunks, name)


def _held_bytes(store) -> int:
    """Bytes of every array the store holds, whole preallocated buffers included."""
    total = 0
    for name in ("sink_k", "sink_v", "win_k", "win_v"):
        x = getattr(store, name)
        total += 0 if x is None else _raw(x).nbytes
    for hist in (store.hist_k, store.hist_v):
        total += sum(_raw(buf).nbytes for buf in (hist.buffers or {}).values())
    return total


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("t", [0, 3, 4, 10, 12, 13, 50])
def test_nbytes_parts(lib, t):
    store = LayerStore(CFG, 0, D)
    k, v = _data(max(t, 1), 6)
    if t:
        store.update(_to(lib, k), _to(lib, v))
    parts = store.nbytes()
    e = store.encoded_tokens
    assert e == max(0, t - CFG.sinks - CFG.window)
    if e:  # (that the names are there before anything is encoded too: see the test below)
        assert set(parts) == {"codes", "norms", "spare", "sinks", "window", "other"}
    assert parts["other"] == 0  # the store holds nothing beyond its layout
    # K4/V2 at d=64: 32 + 16 code bytes and 2 + 2 norm bytes per token per head
    assert store.codec_k.q.bytes_per_vector() + store.codec_v.q.bytes_per_vector() == 52
    assert _vector_bytes(store.codec_k) + _vector_bytes(store.codec_v) == 52
    assert parts.get("codes", 0) == e * B * H * (32 + 16)
    assert parts.get("norms", 0) == e * B * H * (2 + 2)
    assert parts.get("codes", 0) + parts.get("norms", 0) == e * B * H * 52
    # spare: the preallocated history capacity not (yet) holding a token
    assert parts["spare"] == (store.hist_k.capacity - e) * B * H * 52
    assert store.hist_k.capacity == store.hist_v.capacity
    # sinks and window: 2 bytes per element (held in 16 bits for this float32 input), K and V
    assert parts["sinks"] == min(t, CFG.sinks) * B * H * D * 2 * 2
    assert parts["window"] == min(max(t - CFG.sinks, 0), CFG.window) * B * H * D * 2 * 2
    # the parts add up to every array the store holds
    assert sum(parts.values()) == _held_bytes(store)


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_nbytes_part_names_do_not_depend_on_the_length(lib, method):
    """Every length reports the same parts, the method's fields included (0 before anything is
    encoded), so per-part accounting (reports, sums over layers) never meets a missing key."""
    cfg = CFG.replace(method=method)
    expected = {"spare", "sinks", "window", "other"} | set(LayerStore(cfg, 0, D).codec_k.fields())
    seen = {}
    for t in (0, 3, 12, 13, 50):
        store = LayerStore(cfg, 0, D)
        if t:
            k, v = _data(t, 6)
            store.update(_to(lib, k), _to(lib, v))
        seen[t] = sorted(store.nbytes())
    assert all(set(names) == expected for names in seen.values()), (sorted(expected), seen)


@pytest.mark.parametrize("lib", ALL_LIBS)
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
    a, b = _to(lib, nk[idx]), _to(lib, nv[idx])
    keys, values = _dense(store.update(a, b), a, b)
    a, b = _to(lib, nk), _to(lib, nv)
    ref_k, ref_v = _dense(twin.update(a, b), a, b)
    np.testing.assert_allclose(keys, ref_k[idx], rtol=0, atol=1e-6)
    np.testing.assert_allclose(values, ref_v[idx], rtol=0, atol=1e-6)


@pytest.mark.parametrize("lib", ALL_LIBS)
def test_fp16_inputs(lib):
    k, v = _data(20, 9)
    if lib == "numpy":
        kk, vv = k.astype(np.float16), v.astype(np.float16)
    elif lib == "torch":
        kk, vv = torch.from_numpy(k).half(), torch.from_numpy(v).half()
    else:
        import mlx.core as mx

        kk, vv = mx.array(k).astype(mx.float16), mx.array(v).astype(mx.float16)
    store = LayerStore(CFG, 0, D)
    store.update(kk, vv)
    keys, values = store.update(kk[:, :, :2], vv[:, :, :2]).dense(kk.dtype, vv.dtype)
    assert keys.dtype == kk.dtype and values.dtype == vv.dtype
    assert tuple(keys.shape) == (B, H, 22, D)
    assert store.nbytes()["sinks"] == CFG.sinks * B * H * D * 2 * 2


def _dtype(lib: str, name: str):
    if lib == "numpy":
        return np.dtype(name)
    if lib == "torch":
        return getattr(torch, name)
    import mlx.core as mx

    return getattr(mx, name)


def _cast(lib: str, a: np.ndarray, name: str):
    """float32 numpy ``a`` as a ``lib`` array of dtype ``name``."""
    x = _to(lib, a)
    return x.to(_dtype(lib, name)) if lib == "torch" else x.astype(_dtype(lib, name))


# (input dtype, dtype the store holds sinks and window in) per backend: 16-bit inputs as they are,
# float32 in bfloat16 (numpy, which has no bfloat16: float16)
RESIDUAL_DTYPES = [
    pytest.param("numpy", "float32", "float16", id="numpy-float32"),
    pytest.param("numpy", "float16", "float16", id="numpy-float16"),
    pytest.param("torch", "float32", "bfloat16", id="torch-float32"),
    pytest.param("torch", "float16", "float16", id="torch-float16"),
    pytest.param("torch", "bfloat16", "bfloat16", id="torch-bfloat16"),
    *(pytest.param("mlx", dt, held, id=f"mlx-{dt}", marks=MLX.marks)
      for dt, held in (("float32", "bfloat16"), ("float16", "float16"), ("bfloat16", "bfloat16"))),
]


@pytest.mark.parametrize("lib, dtype, held", RESIDUAL_DTYPES)
def test_sinks_and_window_held_in_16_bits(lib, dtype, held):
    """Sinks and window are held in the input's dtype when it is 16-bit, else in bfloat16 (numpy:
    float16), and equal the inputs rounded to that dtype bit for bit; the call's own tokens stay at
    the input precision; ``View.dense`` returns whatever dtype it is asked for."""
    k, v = _data(20, 17)
    kk, vv = _cast(lib, k, dtype), _cast(lib, v, dtype)
    assert kk.dtype == _dtype(lib, dtype) and vv.dtype == _dtype(lib, dtype)
    store = LayerStore(CFG, 0, D)
    first = store.update(kk[:, :, :15], vv[:, :, :15])  # 4 sinks, 8 in the window, 3 encoded
    assert store.encoded_tokens == 3
    for name in ("sink_k", "sink_v", "win_k", "win_v"):
        assert getattr(store, name).dtype == _dtype(lib, held), name
    # held = the inputs rounded to ``held`` (exactly; for a 16-bit input, the inputs themselves)
    want_k, want_v = _np(kk).astype(np.float32), _np(vv).astype(np.float32)
    if held != dtype:
        want_k, want_v = _r16(lib, want_k), _r16(lib, want_v)
        assert np.any(want_k != _np(kk)), "rounding to 16 bits changed nothing: the test would prove nothing"
    np.testing.assert_array_equal(_np(store.sink_k).astype(np.float32), want_k[:, :, :4])
    np.testing.assert_array_equal(_np(store.sink_v).astype(np.float32), want_v[:, :, :4])
    np.testing.assert_array_equal(_np(store.win_k).astype(np.float32), want_k[:, :, 7:15])
    np.testing.assert_array_equal(_np(store.win_v).astype(np.float32), want_v[:, :, 7:15])
    # the first call's own tokens are attended as given (input precision, not rounded)
    assert first.new[0].dtype == kk.dtype and first.new[1].dtype == vv.dtype
    np.testing.assert_array_equal(_np(first.new[0]), _np(kk[:, :, :15]))
    np.testing.assert_array_equal(_np(first.new[1]), _np(vv[:, :, :15]))
    nk, nv = kk[:, :, 15:], vv[:, :, 15:]
    view = store.update(nk, nv)
    for ask_k, ask_v in ((dtype, dtype), ("float32", "float16"), (held, "float32")):
        keys, values = view.dense(_dtype(lib, ask_k), _dtype(lib, ask_v))
        assert keys.dtype == _dtype(lib, ask_k) and values.dtype == _dtype(lib, ask_v), (ask_k, ask_v)
        assert tuple(keys.shape) == tuple(values.shape) == (B, H, 20, D)
    # asked in float32, the held parts come back exactly as held and the new tokens as given
    keys, values = (_np(x) for x in view.dense(_dtype(lib, "float32"), _dtype(lib, "float32")))
    np.testing.assert_array_equal(keys[:, :, :4], want_k[:, :, :4])
    np.testing.assert_array_equal(values[:, :, 7:15], want_v[:, :, 7:15])
    np.testing.assert_array_equal(keys[:, :, 15:], _np(nk).astype(np.float32))
    np.testing.assert_array_equal(values[:, :, 15:], _np(nv).astype(np.float32))
    # 2 bytes per held element, whatever the input's width
    assert store.nbytes()["sinks"] == CFG.sinks * B * H * D * 2 * 2
    assert store.nbytes()["window"] == CFG.window * B * H * D * 2 * 2


# ----------------------------------------------------------------------------- preallocated history


def _count_encoded(codec) -> list:
    """Wrap ``codec.encode`` (this instance only): the list receives the token count of every call."""
    calls, original = [], codec.encode

    def encode(x):
        calls.append(int(x.shape[2]))
        return original(x)

    codec.encode = encode
    return calls


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_history_grows_by_blocks_without_reencoding(lib, method, monkeypatch):
    cfg = CFG.replace(method=method)
    k, v = _data(700, 12)
    store = LayerStore(cfg, 0, D)
    enc_k, enc_v = _count_encoded(store.codec_k), _count_encoded(store.codec_v)
    pair = kvstore.kernels.encode_pair_into  # a decode step's fused encode (keys and values in one call)

    def counted_pair(codec_k, codec_v, kk, vv, *args):
        done = pair(codec_k, codec_v, kk, vv, *args)
        if done:
            enc_k.append(int(kk.shape[2]))
            enc_v.append(int(vv.shape[2]))
        return done

    monkeypatch.setattr(kvstore.kernels, "encode_pair_into", counted_pair)
    per_token = B * H * (_vector_bytes(store.codec_k) + _vector_bytes(store.codec_v))
    chunks = [20, 1, 1, 200, 1, 40, 3, 180, 1, 1, 250, 2]
    assert sum(chunks) == 700
    capacities = []
    for _ in _feed(lib, store, k, v, chunks):
        cap, n = store.hist_k.capacity, store.hist_k.n
        assert cap % kvstore.BLOCK == 0 and cap >= n, (cap, n)
        assert store.hist_v.capacity == cap
        assert store.nbytes()["spare"] == (cap - n) * per_token
        if capacities and cap != capacities[-1]:  # it grew on this call: by at least 1/GROWTH ...
            assert cap >= capacities[-1] + capacities[-1] // kvstore.GROWTH
            assert cap - n < kvstore.BLOCK + capacities[-1] // kvstore.GROWTH  # ... and not much more
        capacities.append(cap)
    # a few times (688 tokens encoded: 256, 512, 768), not once per token or per call
    assert len(set(capacities)) <= -(-store.encoded_tokens // kvstore.BLOCK)
    assert capacities == sorted(capacities)
    # no re-encoding: every token was encoded exactly once, when it left the window
    assert sum(enc_k) == sum(enc_v) == store.encoded_tokens == 700 - cfg.sinks - cfg.window
    assert len(enc_k) <= len(chunks)


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_growth_keeps_the_codes_of_earlier_tokens(lib, method):
    """Codes held before the buffers grow are the very same bytes after (copied, not re-encoded),
    and the same as a store that never had to grow (reserved up front)."""
    cfg = CFG.replace(method=method)
    k, v = _data(600, 13)
    store = LayerStore(cfg, 0, D)
    reserved = LayerStore(cfg, 0, D)
    reserved.reserve(_to(lib, k[:, :, :1]), 600)
    start, checked = 0, 0
    for n in (250, 10, 1, 300, 39):
        before, cap = _stored(store), store.hist_k.capacity
        kk, vv = _to(lib, k[:, :, start:start + n]), _to(lib, v[:, :, start:start + n])
        store.update(kk, vv)
        reserved.update(kk, vv)
        start += n
        after = _stored(store)
        if store.hist_k.capacity != cap and before["hist_k.codes"] is not None:
            checked += 1
            for name, old in before.items():
                if name.startswith("hist_"):
                    assert after[name][:, :, :old.shape[2]].tobytes() == old.tobytes(), name
    assert checked >= 1  # the buffers did grow while holding tokens
    assert reserved.hist_k.capacity == 600 - cfg.sinks - cfg.window
    a, b = _stored(store), _stored(reserved)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_reserve_leaves_no_spare_once_full(lib, method):
    cfg = CFG.replace(method=method)
    n = 300
    k, v = _data(n + 1, 14)
    store = LayerStore(cfg, 0, D)
    per_token = B * H * (_vector_bytes(store.codec_k) + _vector_bytes(store.codec_v))
    like = _to(lib, k[:, :, :1])
    store.reserve(like, n)
    enc = n - cfg.sinks - cfg.window
    assert store.hist_k.capacity == store.hist_v.capacity == enc
    assert store.nbytes()["spare"] == enc * per_token  # reserved, not yet holding anything
    buffers = dict(store.hist_k.buffers)
    for _ in _feed(lib, store, k[:, :, :n], v[:, :, :n], [7, 1, 100, 1, 191]):
        assert store.hist_k.capacity == enc  # never grown while filling what was reserved
    assert all(store.hist_k.buffers[f] is buffers[f] for f in buffers)
    assert store.length == n and store.encoded_tokens == enc
    parts = store.nbytes()
    assert parts["spare"] == 0
    assert sum(parts.values()) == _held_bytes(store)
    # reserving again, or less, changes nothing; one token more grows by blocks
    store.reserve(like, n)
    store.reserve(like, 10)
    assert store.hist_k.capacity == enc
    store.update(_to(lib, k[:, :, n:]), _to(lib, v[:, :, n:]))
    assert store.hist_k.capacity % kvstore.BLOCK == 0 and store.hist_k.capacity > enc
    # a reservation that fits in sinks + window allocates no history
    small = LayerStore(cfg, 0, D)
    small.reserve(like, cfg.sinks + cfg.window)
    assert small.hist_k.capacity == 0 and small.nbytes()["spare"] == 0


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_view_taken_before_later_updates_reads_the_old_state(lib, method):
    cfg = CFG.replace(method=method)
    k, v = _data(700, 15)
    hq = 2 * H
    q = _to(lib, np.random.default_rng(16).standard_normal((B, hq, 5, D)).astype(np.float32))
    store = LayerStore(cfg, 0, D)
    for _ in _feed(lib, store, k, v, [40]):
        pass
    kk, vv = _to(lib, k[:, :, 40:45]), _to(lib, v[:, :, 40:45])
    view = store.update(kk, vv)
    keys, values = _dense(view, kk, vv)
    out = _np(view.attend(q, 0.125)).copy()
    cap = store.hist_k.capacity
    # writes past the view's length into the same buffers, then growth into new ones
    for _ in _feed(lib, store, k[:, :, 45:], v[:, :, 45:], [1, 3, 20, 600, 31]):
        pass
    assert store.hist_k.capacity > cap and store.length == 700
    keys2, values2 = _dense(view, kk, vv)
    np.testing.assert_array_equal(keys2, keys)
    np.testing.assert_array_equal(values2, values)
    np.testing.assert_array_equal(_np(view.attend(q, 0.125)), out)


# ----------------------------------------------------------------------------- attention over what is held


def _reference(q, keys, values, scale, visible):
    """float64 softmax attention: q (B, Hq, T, D), keys/values (B, H, N, D), visible (B|1, Hq|1, T, N)."""
    g = q.shape[1] // keys.shape[1]
    k, v = np.repeat(keys, g, axis=1), np.repeat(values, g, axis=1)  # query head h reads KV head h // g
    s = np.where(visible, q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    den = p.sum(-1, keepdims=True)
    return (p @ v) / np.where(den > 0, den, 1.0)


def _causal(n_keys: int, tq: int) -> np.ndarray:
    """(1, 1, T, N): the queries are the last T keys; row t sees keys 0 .. N - T + t."""
    return (np.arange(n_keys)[None, :] <= np.arange(tq)[:, None] + (n_keys - tq))[None, None]


def _filled_view(lib, cfg, held: int, tq: int, heads: int, seed: int):
    """A store holding ``held`` tokens, and the View of a call storing ``tq`` more."""
    k, v = _data(held + tq, seed, heads)
    store = LayerStore(cfg, 1, D)
    if held:
        store.update(_to(lib, k[:, :, :held]), _to(lib, v[:, :, :held]))
    kk, vv = _to(lib, k[:, :, held:]), _to(lib, v[:, :, held:])
    return store, store.update(kk, vv), kk, vv


# measured |attend - float64 reference over dense| <= 1.2e-6 (torch, numpy, mlx; values ~N(0, 1))
ATTEND_ATOL = 1e-5
LAYOUTS = [pytest.param((0, 0), id="s0w0"), pytest.param((4, 8), id="s4w8")]


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("held, tq", [(0, 1), (0, 5), (2, 5), (40, 1), (40, 5)])
def test_attend_matches_dense_reference(lib, method, groups, layout, held, tq):
    sinks, window = layout
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=sinks, window=window, method=method)
    heads = 2
    store, view, kk, vv = _filled_view(lib, cfg, held, tq, heads, seed=20 + held + tq)
    if held > sinks + window:
        assert view.history == held - sinks - window  # the history is really read
    rng = np.random.default_rng(21)
    q = rng.standard_normal((B, heads * groups, tq, D)).astype(np.float32)
    scale = D ** -0.5
    out = view.attend(_to(lib, q), scale)
    assert type(out) is type(kk) and tuple(out.shape) == q.shape and out.dtype == kk.dtype
    keys, values = (x.astype(np.float64) for x in _dense(view, kk, vv))
    assert keys.shape[2] == held + tq
    ref = _reference(q.astype(np.float64), keys, values, scale, _causal(held + tq, tq))
    np.testing.assert_allclose(_np(out), ref, rtol=0, atol=ATTEND_ATOL)


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", ["per-head", "per-batch", "shared"])
def test_attend_with_mask_matches_dense_reference(lib, method, groups, layout, kind, shape):
    """A host library's mask (B or 1, Hq or 1, T, N) over key positions in order: causal with random
    holes in every part (sinks, history, window, new), so a mask read at the wrong offset shows."""
    sinks, window = layout
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=sinks, window=window, method=method)
    heads, held, tq = 2, 40, 5
    store, view, kk, vv = _filled_view(lib, cfg, held, tq, heads, seed=30)
    hq, n = heads * groups, held + tq
    rng = np.random.default_rng(31)
    lead = {"per-head": (B, hq), "per-batch": (B, 1), "shared": (1, 1)}[shape]  # per-batch: transformers' sdpa mask
    visible = _causal(n, tq) & (rng.random(lead + (tq, n)) < 0.7)
    visible[..., 0] = True  # every row sees something (a fully hidden row: see the next test)
    if kind == "bool":
        mask = visible
    else:  # what transformers builds for eager attention: 0 to attend, the dtype's minimum not to
        mask = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)
    q = rng.standard_normal((B, hq, tq, D)).astype(np.float32)
    scale = D ** -0.5
    out = _np(view.attend(_to(lib, q), scale, mask=_to(lib, mask)))
    keys, values = (x.astype(np.float64) for x in _dense(view, kk, vv))
    ref = _reference(q.astype(np.float64), keys, values, scale, visible)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATTEND_ATOL)
    # and the mask mattered: without it the (causal) answer differs
    assert np.max(np.abs(_np(view.attend(_to(lib, q), scale)) - ref)) > 1e-2


def _half(lib, a: np.ndarray):
    x = _to(lib, a.astype(np.float32))
    if lib == "numpy":
        return x.astype(np.float16)
    if lib == "torch":
        return x.half()
    import mlx.core as mx

    return x.astype(mx.float16)


def _f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.double().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    import mlx.core as mx

    return np.array(x.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_attend_half_precision(lib, method):
    """fp16 K/V and queries (a host running in half precision): scores and softmax in float32, the
    output in q's dtype, within fp16 rounding of the output (measured 4.8e-4 at |out| <~ 1)."""
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=8, method=method)
    k, v = _data(45, 50, 2)
    store = LayerStore(cfg, 0, D)
    store.update(_half(lib, k[:, :, :40]), _half(lib, v[:, :, :40]))
    kk, vv = _half(lib, k[:, :, 40:]), _half(lib, v[:, :, 40:])
    view = store.update(kk, vv)
    q = _half(lib, np.random.default_rng(51).standard_normal((B, 6, 5, D)))
    out = view.attend(q, D ** -0.5)
    assert out.dtype == q.dtype and tuple(out.shape) == (B, 6, 5, D)
    keys, values = view.dense(kk.dtype, vv.dtype)
    assert keys.dtype == kk.dtype
    ref = _reference(_f64(q), _f64(keys), _f64(values), D ** -0.5, _causal(45, 5))
    np.testing.assert_allclose(_f64(out), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
def test_attend_fully_masked_row_is_zero_not_nan(lib, method):
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=8, method=method)
    store, view, kk, vv = _filled_view(lib, cfg, 40, 3, 3, seed=40)
    visible = np.broadcast_to(_causal(43, 3), (B, 3, 3, 43)).copy()
    visible[1, 2, 0] = False  # batch 1, head 2, row 0 sees nothing
    q = np.random.default_rng(41).standard_normal((B, 3, 3, D)).astype(np.float32)
    out = _np(view.attend(_to(lib, q), 0.125, mask=_to(lib, visible)))
    assert np.all(np.isfinite(out))
    assert np.all(out[1, 2, 0] == 0.0)
    keys, values = (x.astype(np.float64) for x in _dense(view, kk, vv))
    np.testing.assert_allclose(out, _reference(q.astype(np.float64), keys, values, 0.125, visible),
                               rtol=0, atol=ATTEND_ATOL)


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


# ----------------------------------------------------------------------------- sliding-window layers (span)
SPAN_CHUNKS = [[1] * 60, [5] * 12, [13, 1, 1, 30, 15], [60]]


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunks", SPAN_CHUNKS, ids=lambda c: f"chunks={len(c)}x{c[0]}")
def test_span_store_holds_what_a_full_store_holds_of_its_last_positions(lib, method, chunks):
    """A sliding-window layer (span 12) holds exactly the last span - 1 positions of what a
    full-attention store of the same config holds: the sinks while they are among them (16-bit),
    the same 16-bit window, the same codes for the encoded ones (tokens dropped before they were
    encoded never are); each call's view is those positions plus the call's own tokens."""
    span = 12
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=5, method=method)
    full, slide = LayerStore(cfg, 1, D), LayerStore(cfg, 1, D, span=span)
    k, v = _data(sum(chunks), 40)
    start = 0
    for n in chunks:
        kk, vv = _to(lib, k[:, :, start:start + n]), _to(lib, v[:, :, start:start + n])
        ref = _dense(full.update(kk, vv), kk, vv)
        got = _dense(slide.update(kk, vv), kk, vv)
        before = min(start, span - 1)  # what the sliding layer held before the call
        for r, g in zip(ref, got):
            assert g.shape[2] == before + n
            np.testing.assert_array_equal(g, r[:, :, r.shape[2] - before - n:])
        start += n
        sinks_held = max(0, 4 - max(0, start - (span - 1)))
        assert slide.held == min(start, span - 1)
        assert (0 if slide.sink_k is None else slide.sink_k.shape[2]) == min(start, sinks_held)
        assert slide.encoded_tokens == max(0, min(start, span - 1) - 5 - min(start, sinks_held))
    assert slide.length == start == full.length


@pytest.mark.parametrize("lib", ALL_LIBS)
def test_span_store_bytes_stay_bounded(lib):
    """Streaming many tokens one at a time: capacity stays within the held tokens and a block
    (the buffers are compacted, not grown), and bytes held do not grow with the length."""
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=8)
    store = LayerStore(cfg, 0, D, span=40)
    k, v = _data(700, 41)
    sizes = []
    for t in range(700):
        store.update(_to(lib, k[:, :, t:t + 1]), _to(lib, v[:, :, t:t + 1]))
        if t >= 400:
            sizes.append(sum(store.nbytes().values()) - store.nbytes()["spare"])
    assert store.held == 39 and store.encoded_tokens == 31 and store.sink_k is None  # the sinks left the span
    assert store.hist_k.capacity <= 31 + 2 * kvstore.BLOCK
    assert len(set(sizes)) == 1


@pytest.mark.parametrize("lib", ALL_LIBS)
@pytest.mark.parametrize("groups", [1, 3])
def test_span_store_attend_matches_dense_reference(lib, groups):
    """Decode steps over a sliding-window layer: attention over what it holds (no mask needed: it
    holds only the span) equals a float64 softmax over the last span positions."""
    span, heads = 20, 2
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=4, window=6)
    store = LayerStore(cfg, 1, D, span=span)
    k, v = _data(60, 42, heads)
    store.update(_to(lib, k[:, :, :50]), _to(lib, v[:, :, :50]))
    rng = np.random.default_rng(43)
    for t in range(50, 60):
        kk, vv = _to(lib, k[:, :, t:t + 1]), _to(lib, v[:, :, t:t + 1])
        view = store.update(kk, vv)
        assert view.history == span - 1 - 6
        q = rng.standard_normal((B, heads * groups, 1, D)).astype(np.float32)
        keys, values = (x.astype(np.float64) for x in _dense(view, kk, vv))
        assert keys.shape[2] == span
        ref = _reference(q.astype(np.float64), keys, values, D ** -0.5, _causal(span, 1))
        np.testing.assert_allclose(_np(view.attend(_to(lib, q), D ** -0.5)), ref, rtol=0, atol=ATTEND_ATOL)


def test_span_must_be_a_window():
    with pytest.raises(ValueError, match="span must be 0"):
        LayerStore(CFG, 0, D, span=1)
    with pytest.raises(ValueError, match="span must be a non-negative int"):
        LayerStore(CFG, 0, D, span=-3)


def test_span_store_keeps_left_padding_before_its_sinks():
    """A left-padded batch (``lead``) in a sliding-window layer: the sink region is the padding and then
    each row's first real tokens, as in a full-attention layer, until it leaves the span."""
    cfg = CacheConfig(bits_k=4, bits_v=2, sinks=2, window=3)
    store = LayerStore(cfg, 0, D, lead=2, span=20)
    k, v = _data(30, 44)
    store.update(_to("torch", k[:, :, :6]), _to("torch", v[:, :, :6]))
    assert store.sink_k.shape[2] == 4 and store.held == 6
    store.update(_to("torch", k[:, :, 6:]), _to("torch", v[:, :, 6:]))
    assert store.sink_k is None and store.held == 19
