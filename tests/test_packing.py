"""Bit-plane packing (tq_core/packing.py): round trips, sizes, cross-backend bytes, the exact layout.

Layout under test (packing.py docstring): a b-bit code is split into planes of 4, 2 and 1 bits
(8 bits: one byte per code); a plane of width w packs 8/w codes per byte, lowest code in the lowest
bits; planes are concatenated along the last axis, widest first; n is zero-padded to a multiple of 8.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from tq_core import packing

HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx.core") is not None

BITS = range(1, 9)
NS = (1, 3, 7, 8, 9, 63, 64, 65, 130)
LEADS = ((), (2,), (2, 3, 4))

BACKENDS = [
    "numpy",
    "torch",
    pytest.param("mlx", marks=[pytest.mark.mlx,
                               pytest.mark.skipif(not HAVE_MLX, reason="mlx is not importable")]),
]


def _to(backend: str, a: np.ndarray):
    if backend == "numpy":
        return a
    if backend == "torch":
        return torch.from_numpy(np.ascontiguousarray(a))
    import mlx.core as mx

    return mx.array(a)


def _np(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        return x.numpy()
    return np.array(x)


def _is_uint8(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype == np.uint8
    if isinstance(x, torch.Tensor):
        return x.dtype == torch.uint8
    import mlx.core as mx

    return x.dtype == mx.uint8


def _codes(bits: int, lead: tuple, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**bits, size=lead + (n,), dtype=np.uint8)


def _seed(bits, n, lead):
    return 1000 * bits + 10 * n + len(lead)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("lib", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_all_shapes(lib, bits):
    for n in NS:
        for lead in LEADS:
            codes = _codes(bits, lead, n, _seed(bits, n, lead))
            packed = packing.pack(_to(lib, codes), bits)
            assert type(packed) is type(_to(lib, codes)), "pack must stay on the input's backend"
            assert _is_uint8(packed)
            assert tuple(packed.shape) == lead + (math.ceil(n / 8) * bits,), (n, lead)
            out = packing.unpack(packed, bits, n)
            assert _is_uint8(out)
            assert tuple(out.shape) == lead + (n,)
            np.testing.assert_array_equal(_np(out), codes, err_msg=f"bits={bits} n={n} lead={lead}")


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_round_trip(bits):
    # all zeros, all ones-bits (2**bits - 1) and alternating extremes: catch masking/shift errors
    top = 2**bits - 1
    for codes in (np.zeros(65, np.uint8), np.full(65, top, np.uint8),
                  np.array([0, top] * 32 + [top], np.uint8)):
        np.testing.assert_array_equal(packing.unpack(packing.pack(codes, bits), bits, 65), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", NS)
def test_packed_size(bits, n):
    assert packing.packed_size(n, bits) == math.ceil(n / 8) * bits
    assert packing.pack(_codes(bits, (), n, n), bits).nbytes == math.ceil(n / 8) * bits


# ----------------------------------------------------------------------------- cross-backend bytes


@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not importable")
@pytest.mark.mlx
@pytest.mark.parametrize("bits", BITS)
def test_packed_bytes_identical_numpy_torch_mlx(bits):
    for n in NS:
        for lead in LEADS:
            codes = _codes(bits, lead, n, _seed(bits, n, lead) + 7)
            ref = packing.pack(codes, bits)
            np.testing.assert_array_equal(_np(packing.pack(_to("torch", codes), bits)), ref)
            np.testing.assert_array_equal(_np(packing.pack(_to("mlx", codes), bits)), ref)


@pytest.mark.parametrize("bits", BITS)
def test_packed_bytes_identical_numpy_torch(bits):
    for n in NS:
        for lead in LEADS:
            codes = _codes(bits, lead, n, _seed(bits, n, lead) + 7)
            np.testing.assert_array_equal(_np(packing.pack(_to("torch", codes), bits)),
                                          packing.pack(codes, bits))


@pytest.mark.parametrize("lib", BACKENDS)
def test_pack_accepts_wider_integer_dtypes(lib):
    # the quantizer hands pack int64 (numpy), uint8/int32 (torch) or uint32 (mlx) codes
    codes = _codes(3, (2,), 13, 5)
    ref = packing.pack(codes, 3)
    for dt in (np.int32, np.int64):
        np.testing.assert_array_equal(_np(packing.pack(_to(lib, codes.astype(dt)), 3)), ref)


# ----------------------------------------------------------------------------- known answers


def test_known_answer_bits3():
    # bits=3 -> planes (2, 1). Codes 1..7,0:
    #   2-bit plane, low bits  [1,2,3,0,1,2,3,0], 4 per byte, lowest code lowest:
    #     byte0 = 1 | 2<<2 | 3<<4 | 0<<6 = 57, byte1 = 57
    #   1-bit plane, bit 2     [0,0,0,1,1,1,1,0] -> 1<<3 | 1<<4 | 1<<5 | 1<<6 = 120
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0], np.uint8)
    assert packing.pack(codes, 3).tolist() == [57, 57, 120]
    assert packing.pack(torch.from_numpy(codes), 3).tolist() == [57, 57, 120]


def test_known_answer_bits7_padding():
    # bits=7 -> planes (4, 2, 1); one code 0b1011011 = 91, padded to 8 codes with zeros:
    #   4-bit plane: low nibble 0b1011 = 11 in the low bits of byte0, the rest zero: [11, 0, 0, 0]
    #   2-bit plane: bits 4..5 = 0b01 = 1 -> [1, 0]
    #   1-bit plane: bit 6 = 1 -> [1]
    assert packing.pack(np.array([91], np.uint8), 7).tolist() == [11, 0, 0, 0, 1, 0, 1]


def test_known_answer_bits1_and_bits8():
    # 1 bit: 8 codes per byte, code i in bit i; 9 codes take 2 bytes
    assert packing.pack(np.array([1, 0, 1, 0, 0, 0, 0, 1, 1], np.uint8), 1).tolist() == [0b10000101, 1]
    # 8 bits: the codes themselves, no padding to a multiple of 8 beyond ceil(n/8)*8 bytes
    assert packing.pack(np.array([200, 3, 255], np.uint8), 8).tolist() == [200, 3, 255, 0, 0, 0, 0, 0]


def test_planes():
    assert [packing.planes(b) for b in BITS] == [(1,), (2,), (2, 1), (4,), (4, 1), (4, 2), (4, 2, 1), (8,)]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (9, ValueError), (-1, ValueError),
                                      (2.5, TypeError), (True, TypeError), ("4", TypeError),
                                      (None, TypeError)])
def test_bad_bits_raise(bad, exc):
    codes = np.zeros((2, 8), np.uint8)
    with pytest.raises(exc, match="bits"):
        packing.pack(codes, bad)
    with pytest.raises(exc, match="bits"):
        packing.unpack(np.zeros((2, 3), np.uint8), bad, 8)
    with pytest.raises(exc, match="bits"):
        packing.packed_size(8, bad)
