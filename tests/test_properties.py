"""Property-based tests (hypothesis): invariants that must hold for every input, not just the examples.

1. Packing: ``unpack(pack(codes, b), b, n) == codes`` for every b in 1..8, odd code counts and
   leading shapes, on numpy, torch and mlx; the packed array is uint8 of ``packed_size(n, b)`` bytes.
2. The codec: decode(encode(x)) keeps x's shape, dtype and backend, is finite, and with norm
   correction keeps every vector's norm (to the fp16 storage of the norm and the output dtype's
   rounding); zero vectors decode to zero.
3. The layer store: random sequences of cache operations — prefills of any size, decode steps,
   batch reorder/select (beam search, repeat-interleave), reset — against an uncompressed
   reference at 8 bits. After every operation the store holds exactly the reference's tokens:
   sinks and window equal to their 16-bit values bit for bit, the history decoded within 8-bit
   tolerance, and attention over the codes (``View.attend``) equals softmax attention over the
   decoded K/V.

Budgets: ``max_examples`` and no per-example deadline (the first call of a backend compiles or
loads kernels); the whole file runs in well under a minute on 2 CPU cores. No example database is
written (``database=None``): failures print their reproducing example.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tq_core import CacheConfig, TurboQuantizer, packing  # noqa: E402
from tq_core.kvstore import LayerStore  # noqa: E402


def _have(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


BACKENDS = ["numpy"] + (["torch"] if _have("torch") else []) + (["mlx"] if _have("mlx") and _have("mlx.core") else [])
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- backends: numpy in, numpy out --------------------------------------------------------------
def to_backend(a: np.ndarray, backend: str, dtype: str = None):
    """``a`` as an array of ``backend`` in ``dtype`` (a name; default: a's own)."""
    dtype = dtype or a.dtype.name
    if backend == "numpy":
        return a.astype(dtype)
    if backend == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype))
    import mlx.core as mx

    return mx.array(a.astype(np.float32) if dtype == "bfloat16" else a.astype(dtype), dtype=getattr(mx, dtype))


def to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        return (x.float() if x.dtype == torch.bfloat16 else x).detach().cpu().numpy()
    import mlx.core as mx

    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def dtype_name(x) -> str:
    return str(x.dtype).replace("torch.", "").replace("mlx.core.", "")


# ==== 1. packing ======================================================================================
@settings(max_examples=200, **SETTINGS)
@given(bits=st.integers(1, 8), n=st.integers(1, 70), lead=st.lists(st.integers(1, 4), max_size=3),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, n, lead, backend, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(*lead, n), dtype=np.uint8)
    packed = packing.pack(to_backend(codes, backend), bits)
    assert tuple(packed.shape) == (*lead, packing.packed_size(n, bits))
    assert dtype_name(packed) == "uint8"
    if n % 8 == 0:
        assert packed.shape[-1] * 8 == n * bits  # exactly b bits per code
    back = packing.unpack(packed, bits, n)
    np.testing.assert_array_equal(to_numpy(back), codes)


# ==== 2. the codec ====================================================================================
DIMS = [32, 48, 64, 80, 96, 128]  # shipped codebooks: nothing is generated
# Norm tolerance: the fp16 stored norm (2^-11 relative) plus the output dtype's rounding.
NORM_RTOL = {"float64": 2e-3, "float32": 2e-3, "float16": 3e-3, "bfloat16": 1.5e-2}


def _dtypes(backend):
    if backend == "numpy":
        return ["float32", "float16", "float64"]
    return ["float32", "float16", "bfloat16", "float64"]


@st.composite
def codec_case(draw):
    backend = draw(st.sampled_from(BACKENDS))
    return dict(backend=backend, dtype=draw(st.sampled_from(_dtypes(backend))), dim=draw(st.sampled_from(DIMS)),
                bits=draw(st.integers(1, 8)), lead=draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)),
                log_scale=draw(st.floats(-2, 2)), zero_row=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                norm_correction=draw(st.booleans()))


@settings(max_examples=150, **SETTINGS)
@given(c=codec_case())
def test_encode_decode_invariants(c):
    rng = np.random.default_rng(c["seed"])
    x = rng.standard_normal((*c["lead"], c["dim"])) * 10.0 ** c["log_scale"]
    if c["zero_row"]:
        x.reshape(-1, c["dim"])[0] = 0
    xb = to_backend(x, c["backend"], c["dtype"])
    q = TurboQuantizer(c["dim"], c["bits"], seed=c["seed"] % 7, norm_correction=c["norm_correction"])
    enc = q.encode(xb)
    out = q.decode(enc)
    assert type(out) is type(xb)
    assert tuple(out.shape) == tuple(xb.shape) and dtype_name(out) == c["dtype"]
    assert enc.nbytes == int(np.prod(c["lead"])) * (packing.packed_size(c["dim"], c["bits"]) + 2)
    y, xr = to_numpy(out).astype(np.float64), to_numpy(xb).astype(np.float64)
    assert np.isfinite(y).all()
    n_in, n_out = np.linalg.norm(xr, axis=-1), np.linalg.norm(y, axis=-1)
    zero = n_in == 0
    assert (n_out[zero] == 0).all(), "a zero vector did not decode to zero"
    if c["norm_correction"]:
        np.testing.assert_allclose(n_out[~zero], n_in[~zero], rtol=NORM_RTOL[c["dtype"]])
    else:  # without correction the decoded norm is |x| |c[code]|: shorter, never longer by much
        assert (n_out[~zero] <= n_in[~zero] * 1.05).all()


# ==== 3. the layer store against an uncompressed reference ===========================================
HEAD_DIM = 64
ROUND = {"numpy": "float16", "torch": "bfloat16", "mlx": "bfloat16"}  # what sinks and window are held in


def _round(a: np.ndarray, backend: str) -> np.ndarray:
    """``a`` as the store holds full-precision tokens (float32 input -> 16 bits), back in float64."""
    return to_numpy(to_backend(a.astype(np.float32), backend, ROUND[backend])).astype(np.float64)


@st.composite
def store_ops(draw):
    """(backend, config, ops): ops are ("add", tokens) | ("select", row indices) | ("reset",)."""
    backend = draw(st.sampled_from(BACKENDS))
    sinks, window = draw(st.integers(0, 4)), draw(st.integers(0, 8))
    ops, batch = [], draw(st.integers(1, 3))
    ops.append(("start", batch))
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["prefill", "decode", "decode", "select", "reset"]))
        if kind == "prefill":
            ops.append(("add", draw(st.integers(1, 24))))
        elif kind == "decode":
            ops.append(("add", 1))
        elif kind == "select":
            idx = draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=4))
            ops.append(("select", idx))
            batch = len(idx)
        else:
            batch = draw(st.integers(1, 3))
            ops.append(("reset", batch))
    return backend, CacheConfig(bits_k=8, bits_v=8, sinks=sinks, window=window, seed=draw(st.integers(0, 3))), ops


def _check_store(store, ref_k, ref_v, backend, config, rng):
    """The store holds exactly the reference: sinks and window bit for bit, history within 8 bits."""
    if ref_k is None:
        assert store.length == 0
        return
    b, h, t, d = ref_k.shape
    assert store.length == t and store.batch_size == b
    view = store.snapshot()
    k, v = (to_numpy(a).astype(np.float64) for a in view.dense(*(_f32(backend),) * 2))
    assert k.shape == (b, h, t, d)
    s = min(store.sinks, t)
    w = min(config.window, t - s)
    exact = np.r_[0:s, t - w:t]
    coded = np.r_[s:t - w]
    assert store.encoded_tokens == len(coded)
    for got, ref in ((k, ref_k), (v, ref_v)):
        r16 = _round(ref, backend)
        np.testing.assert_array_equal(got[:, :, exact], r16[:, :, exact])  # sinks and window: exact
        if len(coded):
            err = np.linalg.norm(got[:, :, coded] - r16[:, :, coded], axis=-1)
            rel = err / np.maximum(np.linalg.norm(r16[:, :, coded], axis=-1), 1e-12)
            assert rel.max() < 0.03, f"8-bit history decoded {rel.max():.3g} off (relative)"
    # Attention over the codes = softmax attention over the decoded K/V (one query per head pair).
    q = rng.standard_normal((b, 2 * h, 1, d)).astype(np.float32)
    out = to_numpy(view.attend(to_backend(q, backend), d ** -0.5)).astype(np.float64)
    kk, vv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    sc = q.astype(np.float64) @ kk.transpose(0, 1, 3, 2) * d ** -0.5
    p = np.exp(sc - sc.max(-1, keepdims=True))
    expect = (p / p.sum(-1, keepdims=True)) @ vv
    np.testing.assert_allclose(out, expect, rtol=2e-3, atol=2e-3)


def _f32(backend):
    if backend == "numpy":
        return np.float32
    if backend == "torch":
        import torch

        return torch.float32
    import mlx.core as mx

    return mx.float32


@settings(max_examples=150, **SETTINGS)
@given(case=store_ops(), seed=st.integers(0, 2**16))
def test_store_operations_match_uncompressed_reference(case, seed):
    backend, config, ops = case
    rng = np.random.default_rng(seed)
    heads = 2
    store = ref_k = ref_v = None
    batch = 0
    for op in ops:
        if op[0] in ("start", "reset"):
            batch = op[1]
            store, ref_k, ref_v = LayerStore(config, layer=1, head_dim=HEAD_DIM, attention="ops"), None, None
        elif op[0] == "add":
            k = rng.standard_normal((batch, heads, op[1], HEAD_DIM)).astype(np.float32)
            v = rng.standard_normal((batch, heads, op[1], HEAD_DIM)).astype(np.float32)
            view = store.update(to_backend(k, backend), to_backend(v, backend))
            # what this call attends to: everything held before it, plus its own tokens as given
            assert view.new is not None and tuple(view.new[0].shape) == k.shape
            ref_k = k.astype(np.float64) if ref_k is None else np.concatenate([ref_k, k], 2)
            ref_v = v.astype(np.float64) if ref_v is None else np.concatenate([ref_v, v], 2)
        elif op[0] == "select":
            idx = np.asarray(op[1])
            batch = len(idx)
            if ref_k is not None:
                store.select_batch(to_backend(idx.astype(np.int64), backend))
                ref_k, ref_v = ref_k[idx], ref_v[idx]
        _check_store(store, ref_k, ref_v, backend, config, rng)


@settings(max_examples=30, **SETTINGS)
@given(tokens=st.integers(1, 40), sinks=st.integers(1, 4), window=st.integers(0, 8), lead=st.integers(0, 5))
def test_store_lead_keeps_the_sinks_after_the_padding(tokens, sinks, window, lead):
    """Left padding (``lead``): the first ``lead + sinks`` positions are held exactly, then the window."""
    config = CacheConfig(bits_k=8, bits_v=8, sinks=sinks, window=window)
    store = LayerStore(config, 0, HEAD_DIM, lead=lead)
    k = np.random.default_rng(tokens).standard_normal((2, 1, tokens, HEAD_DIM)).astype(np.float32)
    store.update(k, k)
    held = min(tokens, lead + sinks)
    assert store.sink_k.shape[2] == held
    assert store.encoded_tokens == max(0, tokens - lead - sinks - window)
    np.testing.assert_array_equal(store.sink_k, k[:, :, :held].astype(np.float16))
