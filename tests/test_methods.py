"""KV methods (tq_core/methods): the registry, the codec contract, the uniform method's codes, and a
third method registered from outside that works through ``LayerStore`` untouched.

The codec contract (``tq_core.methods``): ``fields()`` declares {name: (trailing shape, dtype name)}
held per vector; ``encode(x)`` returns exactly those arrays; ``decode(parts, dtype)`` is what
attention reads; ``query`` / ``values_space`` / ``output`` attend in the method's own space with
<query(q), values_space(p)> = <q, decode(p)> and output(w @ values_space(p)) = w @ decode(p).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from tq_core import METHODS, CacheConfig, packing
from tq_core.kvstore import LayerStore
from tq_core.methods import Codec, Method, get
from tq_core.methods.turboquant import TurboQuantCodec
from tq_core.methods.uniform import UniformCodec
from tq_core.ops import for_array
from tq_core.quantizer import TurboQuantizer
from tq_core.rotation import derive_seed

HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx.core") is not None
MLX = pytest.param("mlx", marks=[pytest.mark.mlx, pytest.mark.skipif(not HAVE_MLX, reason="mlx is not importable")])
LIBS = ["numpy", "torch", MLX]
D = 64


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
    """What an array holds, as numpy with the same bytes (bfloat16 as its uint16 bit patterns)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    import mlx.core as mx

    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def _r16(lib: str, a: np.ndarray) -> np.ndarray:
    """float32 ``a`` rounded to the 16-bit dtype ``LayerStore`` holds sinks and window of a float32
    input in (numpy: float16; torch, mlx: bfloat16, rounded here by torch), widened to float32."""
    if lib == "numpy":
        return a.astype(np.float16).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a)).bfloat16().float().numpy()


def _dtype_name(x) -> str:
    return for_array(x).dtype_name(x.dtype)


def _vector_bytes(codec) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in codec.fields().values())


# ----------------------------------------------------------------------------- registry


def test_registry():
    assert list(METHODS)[:2] == ["turboquant", "uniform"]  # the reference first, then the baseline
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name
        assert get(name) is method
    with pytest.raises(ValueError, match="method must be one of turboquant, uniform.*got 'nope'"):
        get("nope")
    with pytest.raises(ValueError, match="method must be one of"):
        get(["turboquant"])  # unhashable: still the one clear error


@pytest.mark.parametrize("method", ["turboquant", "uniform"])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_codec_per_layer_and_kind(method, kind):
    cfg = CacheConfig(bits_k=4, bits_v=2, method=method)
    codec = METHODS[method].codec(cfg, 3, kind, D)
    assert isinstance(codec, Codec)
    assert codec.dim == D and codec.bits == (4 if kind == "k" else 2)
    if method == "turboquant":
        assert isinstance(codec, TurboQuantCodec)
        assert codec.q.seed == derive_seed(cfg.seed, 3, kind) and codec.q.norm_correction
        assert codec.fields() == {"codes": ((D * codec.bits // 8,), "uint8"), "norms": ((), "float16")}
    else:
        assert isinstance(codec, UniformCodec)
        assert codec.fields() == {"codes": ((D * codec.bits // 8,), "uint8"), "scale": ((1,), "float16"),
                                  "zero": ((1,), "float16")}


# ----------------------------------------------------------------------------- the codec contract


CODECS = [
    pytest.param(lambda: METHODS["turboquant"].codec(CacheConfig(bits_k=3), 0, "k", D), id="turboquant-b3"),
    pytest.param(lambda: METHODS["turboquant"].codec(CacheConfig(bits_v=2, norm_correction=False), 1, "v", D),
                 id="turboquant-b2-nc0"),
    pytest.param(lambda: UniformCodec(D, 4, 0), id="uniform-b4"),
    pytest.param(lambda: UniformCodec(D, 2, 16), id="uniform-b2-g16"),
    pytest.param(lambda: UniformCodec(D, 8, 8), id="uniform-b8-g8"),
]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("make", CODECS)
def test_codec_contract(lib, make):
    codec = make()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, D)).astype(np.float32)
    parts = codec.encode(_to(lib, x))
    fields = codec.fields()
    assert set(parts) == set(fields)
    for name, (trailing, dtype) in fields.items():
        assert tuple(parts[name].shape) == (2, 3, 7) + tuple(trailing), name
        assert _dtype_name(parts[name]) == dtype, name
    assert sum(_np(p).nbytes for p in parts.values()) == 2 * 3 * 7 * _vector_bytes(codec)
    x_hat = codec.decode(parts, _to(lib, x).dtype)
    assert type(x_hat) is type(_to(lib, x)) and tuple(x_hat.shape) == x.shape
    rel = np.linalg.norm(_np(x_hat) - x) / np.linalg.norm(x)
    assert 0 < rel < 0.8  # a reconstruction, not noise (and not a copy)
    # attention in the method's space is attention over the decoded vectors
    q = rng.standard_normal((2, 3, 5, D)).astype(np.float32)
    w = rng.random((2, 3, 5, 7)).astype(np.float32)
    space = codec.values_space(parts, _to(lib, x).dtype)
    scores = _np(codec.query(_to(lib, q))) @ np.swapaxes(_np(space), -1, -2)
    np.testing.assert_allclose(scores, q @ np.swapaxes(_np(x_hat), -1, -2), rtol=0, atol=1e-4)
    out = _np(codec.output(_to(lib, w) @ space))
    np.testing.assert_allclose(out, w @ _np(x_hat), rtol=0, atol=1e-4)


@pytest.mark.parametrize("lib", LIBS)
def test_turboquant_codec_is_the_quantizer(lib):
    codec = METHODS["turboquant"].codec(CacheConfig(), 2, "k", D)
    x = _to(lib, np.random.default_rng(1).standard_normal((4, D)).astype(np.float32))
    enc = TurboQuantizer(D, 4, derive_seed(0, 2, "k")).encode(x)
    parts = codec.encode(x)
    assert _np(parts["codes"]).tobytes() == _np(enc.codes).tobytes()
    assert _np(parts["norms"]).tobytes() == _np(enc.norms).tobytes()


# ----------------------------------------------------------------------------- uniform


def _uniform_reference(x: np.ndarray, bits: int, group: int):
    """Per group of ``group`` channels: fp16 zero = min, fp16 scale = (max - min) / (2^b - 1), both
    rounded *before* the codes are chosen against them, in float32 as the codec computes."""
    g = x.astype(np.float32).reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    levels = (1 << bits) - 1
    zero = g.min(-1).astype(np.float16)
    scale = ((g.max(-1) - g.min(-1)) / np.float32(levels)).astype(np.float16)
    z32, s32 = zero.astype(np.float32), scale.astype(np.float32)
    codes = np.clip(np.round((g - z32[..., None]) / np.maximum(s32, np.float32(1e-30))[..., None]), 0, levels)
    return codes.astype(np.uint8).reshape(x.shape), scale, zero


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 16])
def test_uniform_scale_and_zero_are_chosen_before_the_codes(lib, bits, group):
    x = np.random.default_rng(bits + group).standard_normal((3, 5, D)).astype(np.float32) * 3 + 0.5
    codec = UniformCodec(D, bits, group)
    parts = {k: _np(v) for k, v in codec.encode(_to(lib, x)).items()}
    codes = np.asarray(packing.unpack(parts["codes"], bits, D))
    ref_codes, ref_scale, ref_zero = _uniform_reference(x, bits, group or D)
    assert parts["scale"].dtype == parts["zero"].dtype == np.float16
    np.testing.assert_array_equal(parts["scale"], ref_scale)
    np.testing.assert_array_equal(parts["zero"], ref_zero)
    np.testing.assert_array_equal(codes, ref_codes)
    # decode reads exactly the stored numbers: x_hat = code * scale + zero
    groups = (group or D)
    expect = (codes.reshape(3, 5, D // groups, groups).astype(np.float32)
              * ref_scale.astype(np.float32)[..., None] + ref_zero.astype(np.float32)[..., None]).reshape(x.shape)
    x_hat = _np(codec.decode(codec.encode(_to(lib, x)), _to(lib, x).dtype))
    np.testing.assert_array_equal(x_hat, expect)
    # codes chosen against the stored scale: every value within half a stored step, but for the top
    # of the range, which the fp16 rounding of the scale may leave up to levels * (scale ulp) above
    s = ref_scale.astype(np.float32).repeat(groups, -1).reshape(x.shape)
    slack = ((1 << bits) - 1) * s * 2.0**-10
    assert np.all(np.abs(x_hat - x) <= s / 2 + slack + 1e-6)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group", [0, 8])
def test_uniform_exact_on_its_grid(lib, bits, group):
    """Values on a grid zero + code * scale with fp16 zero and scale (min and max in every group)
    come back exactly, with exactly those codes, scale and zero."""
    rng = np.random.default_rng(100 + bits)
    n_groups, size, levels = D // (group or D), group or D, (1 << bits) - 1
    codes = rng.integers(0, levels + 1, (4, n_groups, size))
    codes[..., 0], codes[..., -1] = 0, levels  # the grid's ends are in every group
    scale = (rng.integers(1, 9, (4, n_groups)) * 0.125).astype(np.float16)
    zero = (rng.integers(-64, 64, (4, n_groups)) * 0.25).astype(np.float16)
    x = (codes * scale[..., None].astype(np.float32) + zero[..., None].astype(np.float32)).astype(np.float32)
    x = x.reshape(4, D)
    codec = UniformCodec(D, bits, group)
    parts = codec.encode(_to(lib, x))
    np.testing.assert_array_equal(_np(codec.decode(parts, _to(lib, x).dtype)), x)
    np.testing.assert_array_equal(np.asarray(packing.unpack(_np(parts["codes"]), bits, D)), codes.reshape(4, D))
    np.testing.assert_array_equal(_np(parts["scale"]), scale)
    np.testing.assert_array_equal(_np(parts["zero"]), zero)


@pytest.mark.parametrize("lib", LIBS)
def test_uniform_constant_groups(lib):
    """max == min: scale 0, the constant comes back exactly (no division by zero, no NaN)."""
    x = np.zeros((3, D), np.float32)
    x[1] = 1.25
    x[2, :32], x[2, 32:] = -0.5, 3.0
    codec = UniformCodec(D, 4, 32)
    parts = codec.encode(_to(lib, x))
    np.testing.assert_array_equal(_np(codec.decode(parts, _to(lib, x).dtype)), x)


@pytest.mark.parametrize("bits, group, expected", [
    (4, 0, 32 + 2 + 2), (2, 0, 16 + 4), (3, 0, 24 + 4), (8, 0, 64 + 4),
    (4, 16, 32 + 4 * (2 + 2)), (2, 8, 16 + 8 * 4), (1, 64, 8 + 4),
])
def test_uniform_bytes_per_vector_from_its_fields(bits, group, expected):
    codec = UniformCodec(D, bits, group)
    assert _vector_bytes(codec) == expected
    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    assert sum(p.nbytes for p in codec.encode(x).values()) == 5 * expected


def test_uniform_group_must_divide_head_dim():
    with pytest.raises(ValueError, match="group_size must divide head_dim 64, got 48"):
        UniformCodec(D, 4, 48)
    cfg = CacheConfig.parse("uniform:K4V2+s0w0+g=48")  # head_dim is not known to a config ...
    with pytest.raises(ValueError, match="group_size must divide head_dim 64"):
        LayerStore(cfg, 0, D)  # ... the store refuses it when it is


@pytest.mark.parametrize("lib", LIBS)
def test_uniform_through_the_store(lib):
    cfg = CacheConfig.parse("uniform:K4V2+s2w4+g=16")
    store = LayerStore(cfg, 0, D)
    x = np.random.default_rng(3).standard_normal((2, 3, 30, D)).astype(np.float32)
    store.update(_to(lib, x), _to(lib, x))
    e = 30 - 2 - 4
    parts = store.nbytes()
    assert store.encoded_tokens == e
    assert parts["codes"] == e * 2 * 3 * (32 + 16)
    assert parts["scale"] == parts["zero"] == e * 2 * 3 * 4 * 2 * 2  # 4 groups, fp16, K and V
    # sinks and window held in 16 bits (2 bytes per element) for this float32 input, K and V
    assert parts["sinks"] == 2 * 2 * 3 * D * 2 * 2 and parts["window"] == 4 * 2 * 3 * D * 2 * 2
    assert sum(parts.values()) == sum(
        _raw(a).nbytes for a in (store.sink_k, store.sink_v, store.win_k, store.win_v)) + sum(
        _raw(b).nbytes for h in (store.hist_k, store.hist_v) for b in h.buffers.values())


# ----------------------------------------------------------------------------- a third method


class SignCodec(Codec):
    """1 bit per channel (the sign) and one fp16 RMS per vector: x_hat = sign(x) * rms(x)."""

    def __init__(self, dim: int):
        self.dim, self.bits = dim, 1

    def fields(self) -> dict:
        return {"codes": ((packing.packed_size(self.dim, 1),), "uint8"), "rms": ((), "float16")}

    def encode(self, x) -> dict:
        ops = for_array(x)
        x32 = ops.astype(x, ops.float32)
        return {"codes": packing.pack(ops.astype(x32 > 0, ops.uint8), 1),
                "rms": ops.astype(ops.norm(x32) / math.sqrt(self.dim), ops.float16)}

    def decode(self, parts: dict, dtype=None):
        codes = parts["codes"]
        ops = for_array(codes)
        sign = ops.astype(packing.unpack(codes, 1, self.dim), ops.float32) * 2 - 1
        x = sign * ops.astype(parts["rms"], ops.float32)[..., None]
        return ops.astype(x, ops.float32 if dtype is None else dtype)


class Sign(Method):
    name = "sign"

    def check_config(self, config) -> None:
        super().check_config(config)
        if (config.bits_k, config.bits_v) != (1, 1):
            raise ValueError(f"method 'sign' holds 1 bit per channel, got K{config.bits_k}V{config.bits_v}")

    def codec(self, config, layer: int, kind: str, dim: int) -> SignCodec:
        return SignCodec(dim)


@pytest.fixture
def sign_method():
    """The method registered for the test (the public seam: ``METHODS``), removed after."""
    before = dict(METHODS)
    METHODS["sign"] = Sign()
    try:
        yield METHODS["sign"]
    finally:
        del METHODS["sign"]
    assert METHODS == before


def test_third_method_config_and_label(sign_method):
    c = CacheConfig.parse("sign:K1V1+s2w4")
    assert c == CacheConfig(bits_k=1, bits_v=1, sinks=2, window=4, method="sign")
    assert c.label == "sign:K1V1+s2w4" and CacheConfig.parse(c.label) == c
    assert CacheConfig.parse("sign:K1V1+s0w0+seed=4").seed == 4
    with pytest.raises(ValueError, match="config label 'sign:K2V1': method 'sign' holds 1 bit per channel"):
        CacheConfig.parse("sign:K2V1")
    with pytest.raises(ValueError, match="unknown option 'nc' for method 'sign'"):
        CacheConfig.parse("sign:K1V1+nc=0")
    with pytest.raises(ValueError, match="norm_correction is not an option of method 'sign'"):
        CacheConfig(bits_k=1, bits_v=1, method="sign", norm_correction=False)


def test_third_method_is_gone_after_the_test():
    assert "sign" not in METHODS
    with pytest.raises(ValueError, match="unknown method 'sign'"):
        CacheConfig.parse("sign:K1V1")


@pytest.mark.parametrize("lib", LIBS)
def test_third_method_through_the_store(lib, sign_method):
    cfg = CacheConfig.parse("sign:K1V1+s2w4")
    b, h, hq = 2, 2, 6
    rng = np.random.default_rng(7)
    k, v = (rng.standard_normal((b, h, 40, D)).astype(np.float32) for _ in range(2))
    store = LayerStore(cfg, 0, D)
    assert isinstance(store.codec_k, SignCodec) and isinstance(store.codec_v, SignCodec)
    store.update(_to(lib, k[:, :, :20]), _to(lib, v[:, :, :20]))
    store.update(_to(lib, k[:, :, 20:35]), _to(lib, v[:, :, 20:35]))
    kk, vv = _to(lib, k[:, :, 35:]), _to(lib, v[:, :, 35:])
    view = store.update(kk, vv)
    # what is held: the sign codec's fields for every token that left the window, nothing else
    e = 40 - 2 - 4
    assert store.encoded_tokens == e and store.length == 40
    parts = store.nbytes()
    assert parts["codes"] == e * b * h * 8 * 2 and parts["rms"] == e * b * h * 2 * 2
    assert parts["other"] == 0 and set(parts) == {"codes", "rms", "spare", "sinks", "window", "other"}
    # (sinks and window are held in 16 bits; tokens leaving the window are encoded from those)
    k16 = _r16(lib, k)
    held = store.hist_k.parts()
    np.testing.assert_array_equal(_np(held["codes"]), _np(packing.pack((k16[:, :, 2:2 + e] > 0).astype(np.uint8), 1)))
    # the reference path decodes the codec's fields ...
    keys, values = (_np(a) for a in view.dense(kk.dtype, vv.dtype))
    assert keys.shape == (b, h, 40, D)
    np.testing.assert_array_equal(keys[:, :, 35:], k[:, :, 35:])  # this call's own: as given
    np.testing.assert_array_equal(keys[:, :, :2], k16[:, :, :2])  # sinks: rounded to 16 bits, exactly
    np.testing.assert_array_equal(keys[:, :, 31:35], k16[:, :, 31:35])  # window: likewise
    rms = np.sqrt(np.mean(k16[:, :, 2:31].astype(np.float64) ** 2, -1, keepdims=True))
    np.testing.assert_allclose(keys[:, :, 2:31], np.where(k[:, :, 2:31] > 0, 1, -1) * rms, rtol=1e-3)
    # ... and attention over it (the decoded space the Codec base class gives) agrees with it
    q = rng.standard_normal((b, hq, 5, D)).astype(np.float32)
    out = _np(view.attend(_to(lib, q), 0.125))
    kr, vr = np.repeat(keys.astype(np.float64), 3, 1), np.repeat(values.astype(np.float64), 3, 1)
    s = q.astype(np.float64) @ np.swapaxes(kr, -1, -2) * 0.125
    s = np.where(np.arange(40)[None, :] <= np.arange(5)[:, None] + 35, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out, (p @ vr) / p.sum(-1, keepdims=True), rtol=0, atol=1e-5)
