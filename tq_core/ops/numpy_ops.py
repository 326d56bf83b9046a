"""numpy primitives for the codec (reference and tools; no accelerator)."""

from __future__ import annotations

import numpy as np

NAME = "numpy"
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))
float32, float16, uint8, int64 = np.float32, np.float16, np.uint8, np.int64
float64 = np.float64


def max_all(x) -> float:
    return float(np.max(x))


def device_key(x):
    return "cpu"


def const(arr: np.ndarray, like, dtype):
    return np.asarray(arr, dtype=dtype)


def is_float(x):
    return x.dtype in FLOAT_DTYPES


def astype(x, dtype):
    return x.astype(dtype, copy=False)


def all_finite(x):
    return bool(np.isfinite(x).all())


def sum_sq(x):
    return np.sum(x * x, axis=-1)


def sqrt(x):
    return np.sqrt(x)


def maximum(x, v: float):
    return np.maximum(x, v)


def matmul(a, b):
    return a @ b


def bucketize(y, boundaries):
    """Code = number of boundaries strictly below y (same rule on every backend)."""
    return np.searchsorted(boundaries, y, side="left")


def take(table, idx):
    return table[idx]


def reshape(x, shape):
    return x.reshape(shape)


def concat(xs, axis):
    return np.concatenate(xs, axis=axis)


def pad_last(x, n: int):
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n)])


def zeros(shape, dtype, like):
    return np.zeros(shape, dtype=dtype)


def arange(n: int, dtype, like):
    return np.arange(n, dtype=dtype)


def sum_last(x):
    return np.sum(x, axis=-1)


def stack_last(xs):
    return np.stack(xs, axis=-1)


def shift_left(x, s):
    return np.left_shift(x, s)


def shift_right(x, s):
    return np.right_shift(x, s)


def bit_and(x, m):
    return np.bitwise_and(x, m)


def bit_or(x, y):
    return np.bitwise_or(x, y)


def norm(x):
    return np.sqrt(np.sum(x * x, axis=-1))


def take_rows(table, idx):
    return table[idx]


def nbytes(x) -> int:
    return int(x.nbytes)


def to_numpy(x):
    return np.asarray(x)


def select_batch(x, idx):
    return np.take(x, np.asarray(idx), axis=0)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def quiet():
    """Silence floating-point warnings (NaN/Inf input is reported by the caller instead)."""
    return np.errstate(all="ignore")


def empty(shape, dtype, like):
    return np.empty(shape, dtype=dtype)


def swap_last2(x):
    return np.swapaxes(x, -1, -2)


def exp(x):
    return np.exp(x)


def amax_last(x):
    """Max over the last axis, kept as a length-1 axis."""
    return np.max(x, axis=-1, keepdims=True)


def maximum2(a, b):
    return np.maximum(a, b)


def where(cond, a, b):
    return np.where(cond, a, b)


def min_last(x):
    return np.min(x, axis=-1)


def max_last(x):
    return np.max(x, axis=-1)


def clip(x, lo, hi):
    return np.clip(x, lo, hi)


def round(x):
    return np.round(x)


def is_bool(x) -> bool:
    return x.dtype == np.bool_


def log(x):
    return np.log(x)


def attention_kernel(like):
    """No fused history-attention kernel module for this backend yet: array ops are used (see ``tq_core.kernels``)."""
    return None


def encode_kernel(like):
    """No fused encode kernel for this backend: array ops are used."""
    return None


def residual_dtype(dtype):
    """The 16-bit dtype a cache holds full-precision tokens (sinks, window) of ``dtype`` in."""
    return np.dtype(np.float16)  # numpy has no bfloat16
