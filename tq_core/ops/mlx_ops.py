"""mlx primitives for the codec (Metal on Apple silicon, CPU elsewhere)."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np

NAME = "mlx"
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16, mx.float64)  # float64: CPU only (mlx)
float32, float16, uint8, int64 = mx.float32, mx.float16, mx.uint8, mx.int64
float64 = mx.float64


def max_all(x) -> float:
    return float(mx.max(x).item())


def device_key(x):
    return str(mx.default_device())


def const(arr: np.ndarray, like, dtype):
    """``arr`` as an mlx array of ``dtype`` (a new array: callers keep what they reuse)."""
    return mx.array(np.ascontiguousarray(arr), dtype=dtype)


def is_float(x):
    return x.dtype in FLOAT_DTYPES


def astype(x, dtype):
    return x.astype(dtype)


def all_finite(x):
    return bool(mx.all(mx.isfinite(x)).item())


def sum_sq(x):
    return mx.sum(x * x, axis=-1)


def sqrt(x):
    return mx.sqrt(x)


def maximum(x, v: float):
    return mx.maximum(x, v)


def matmul(a, b):
    return a @ b


def bucketize(y, boundaries):
    """Code = number of boundaries strictly below y (same rule on every backend)."""
    return mx.searchsorted(boundaries, y, side="left")


def take(table, idx):
    return mx.take(table, idx)


def reshape(x, shape):
    return x.reshape(shape)


def concat(xs, axis):
    return mx.concatenate(xs, axis=axis)


def pad_last(x, n: int):
    widths = [(0, 0)] * (x.ndim - 1) + [(0, n)]
    return mx.pad(x, widths)


def zeros(shape, dtype, like):
    return mx.zeros(shape, dtype=dtype)


def arange(n: int, dtype, like):
    return mx.arange(n, dtype=dtype)


def sum_last(x):
    return mx.sum(x, axis=-1)


def stack_last(xs):
    return mx.stack(xs, axis=-1)


def shift_left(x, s):
    return mx.left_shift(x, s)


def shift_right(x, s):
    return mx.right_shift(x, s)


def bit_and(x, m):
    return mx.bitwise_and(x, m)


def bit_or(x, y):
    return mx.bitwise_or(x, y)


def norm(x):
    return mx.sqrt(mx.sum(x * x, axis=-1))


def take_rows(table, idx):
    return mx.take(table, idx.astype(mx.uint32))


def nbytes(x) -> int:
    return x.nbytes


def to_numpy(x):
    return np.array(x)


def select_batch(x, idx):
    return mx.take(x, idx, axis=0)


def dtype_name(dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def quiet():
    return contextlib.nullcontext()


def empty(shape, dtype, like):
    return mx.zeros(shape, dtype=dtype)


def swap_last2(x):
    return mx.swapaxes(x, -1, -2)


def exp(x):
    return mx.exp(x)


def amax_last(x):
    """Max over the last axis, kept as a length-1 axis."""
    return mx.max(x, axis=-1, keepdims=True)


def maximum2(a, b):
    return mx.maximum(a, b)


def where(cond, a, b):
    return mx.where(cond, a, b)


def min_last(x):
    return mx.min(x, axis=-1)


def max_last(x):
    return mx.max(x, axis=-1)


def clip(x, lo, hi):
    return mx.clip(x, lo, hi)


def round(x):
    return mx.round(x)


def is_bool(x) -> bool:
    return x.dtype == mx.bool_


def log(x):
    return mx.log(x)


def attention_kernel(like):
    """No fused history-attention kernel module for this backend yet: array ops are used (see ``tq_core.kernels``)."""
    return None


def encode_kernel(like):
    """No fused encode kernel for this backend: array ops are used."""
    return None


def residual_dtype(dtype):
    """The 16-bit dtype a cache holds full-precision tokens (sinks, window) of ``dtype`` in."""
    return dtype if dtype in (mx.float16, mx.bfloat16) else mx.bfloat16
