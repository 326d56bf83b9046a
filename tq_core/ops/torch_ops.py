"""torch primitives for the codec (CPU and CUDA)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

NAME = "torch"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
float32, float16, uint8, int64 = torch.float32, torch.float16, torch.uint8, torch.int64
float64 = torch.float64


def max_all(x) -> float:
    return float(x.max())


def device_key(x):
    return str(x.device)


def const(arr: np.ndarray, like, dtype):
    """``arr`` as a tensor of ``dtype`` on ``like``'s device (a new tensor: callers keep what they reuse)."""
    return torch.from_numpy(np.array(arr)).to(device=like.device, dtype=dtype)


def is_float(x):
    return x.dtype in FLOAT_DTYPES


def astype(x, dtype):
    return x.to(dtype)


def all_finite(x):
    return bool(torch.isfinite(x).all())


def sum_sq(x):
    return (x * x).sum(-1)


def sqrt(x):
    return torch.sqrt(x)


def maximum(x, v: float):
    return torch.clamp_min(x, v)


def matmul(a, b):
    return a @ b


def bucketize(y, boundaries):
    """Code = number of boundaries strictly below y (same rule on every backend).

    Up to 15 boundaries (4 bits) a compare-and-count loop in uint8 is ~3x faster on CPU than
    torch.bucketize's per-element binary search; both give the same codes.
    """
    if boundaries.numel() <= 15:
        acc = torch.gt(y, boundaries[0]).to(torch.uint8)
        for i in range(1, boundaries.numel()):
            acc += torch.gt(y, boundaries[i])
        return acc
    return torch.bucketize(y, boundaries, right=False, out_int32=True)


def take(table, idx):
    return table[idx]


def reshape(x, shape):
    return x.reshape(shape)


def concat(xs, axis):
    return torch.cat(xs, dim=axis)


def pad_last(x, n: int):
    return torch.nn.functional.pad(x, (0, n))


def zeros(shape, dtype, like):
    return torch.zeros(shape, dtype=dtype, device=like.device)


def arange(n: int, dtype, like):
    return torch.arange(n, dtype=dtype, device=like.device)


def sum_last(x):
    return x.sum(-1)


def stack_last(xs):
    return torch.stack(xs, dim=-1)


def shift_left(x, s):
    return torch.bitwise_left_shift(x, s)


def shift_right(x, s):
    return torch.bitwise_right_shift(x, s)


def bit_and(x, m):
    return torch.bitwise_and(x, m)


def bit_or(x, y):
    return torch.bitwise_or(x, y)


def norm(x):
    return torch.linalg.vector_norm(x, dim=-1)


def take_rows(table, idx):
    """table[idx] for a 1-D table and an integer index array of any shape."""
    return table.index_select(0, idx.reshape(-1).to(torch.int32)).reshape(idx.shape)


def nbytes(x) -> int:
    return x.numel() * x.element_size()


def to_numpy(x):
    return x.detach().cpu().numpy()


def select_batch(x, idx):
    return x.index_select(0, idx.to(x.device))


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def quiet():
    return contextlib.nullcontext()


def empty(shape, dtype, like):
    return torch.empty(shape, dtype=dtype, device=like.device)


def swap_last2(x):
    return x.transpose(-1, -2)


def exp(x):
    return torch.exp(x)


def amax_last(x):
    """Max over the last axis, kept as a length-1 axis."""
    return x.amax(-1, keepdim=True)


def maximum2(a, b):
    return torch.maximum(a, b)


def where(cond, a, b):
    return torch.where(cond, a, b)  # a Python scalar ``b`` stays on the host: no copy (CUDA graphs)


def min_last(x):
    return x.amin(-1)


def max_last(x):
    return x.amax(-1)


def clip(x, lo, hi):
    return torch.clamp(x, lo, hi)


def round(x):
    return torch.round(x)


def is_bool(x) -> bool:
    return x.dtype == torch.bool


def log(x):
    return torch.log(x)


def attention_kernel(like):
    """The module of the fused history-attention kernel for ``like``'s device (its ``attend_codes``),
    or None (see ``tq_core.kernels``): Triton on CUDA, the compiled C kernel on CPU; None when it is
    not installed or cannot build."""
    try:
        if like.is_cuda:
            from ..kernels import triton as kernel
        else:
            from ..kernels import cpu as kernel
    except ImportError:
        return None
    return kernel if kernel.available()[0] else None


def encode_kernel(like):
    """The module of the fused TurboQuant encode kernel for ``like``'s device (its ``encode_into``), or
    None: Triton on CUDA; on CPU the compiled C library, for a decode step's few rows (its
    ``ENCODE_MAX_ROWS``; more rows use array ops); None when it is not installed or cannot build."""
    try:
        if like.is_cuda:
            from ..kernels import triton as kernel
        else:
            from ..kernels import cpu as kernel
    except ImportError:
        return None
    return kernel if kernel.available()[0] else None


def residual_dtype(dtype):
    """The 16-bit dtype a cache holds full-precision tokens (sinks, window) of ``dtype`` in."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
