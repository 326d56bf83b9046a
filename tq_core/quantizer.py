"""TurboQuant codec: the only algorithm file.

encode(x):  n = |x|;  y = (x / n) @ R.T;  code_i = #{boundaries < y_i};  pack codes to ``bits`` bits;
            store n (or, with norm correction, n / |c[code]|) in fp16.
decode:     x_hat = s * (c[code] @ R)

R is a seeded Haar rotation (``rotation.haar``); c and the boundaries are the Lloyd-Max codebook of
the coordinate density of a random unit vector in R^dim (``codebook.load``), so no calibration
data is needed. Inputs containing NaN or Inf raise ``ValueError`` (they would poison the stored
norm silently otherwise), and so do vectors whose stored norm falls outside fp16's normal range
(above 65504, or nonzero below 2^-14 = 6.1e-05, which would decode too short or as zeros; zero
vectors are fine); the KV caches encode with ``check=False`` and propagate them instead.
Inputs may be float16, bfloat16 (torch, mlx), float32 or float64 on every backend; decoding gives
the input's dtype back. ``decode`` checks the arrays it is handed (backend, dtype, shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import codebook as _codebook
from . import packing, rotation
from .config import check_bits
from .ops import for_array

FP16_MAX = 65504.0
# The smallest normal fp16 number: a stored norm below it keeps fewer than fp16's 11 significant
# bits (subnormal) or becomes 0, and its vector would decode with a wrong length or as zeros.
FP16_TINY = 2.0 ** -14
_PRECISIONS = ("float32", "float64")


@dataclass
class Encoded:
    """Vectors as stored: packed codes and fp16 norms, nothing else.

    codes: (..., packed_size(dim, bits)) uint8;  norms: (...,) float16.
    ``nbytes`` is the memory these arrays actually hold.
    """

    codes: object
    norms: object
    dim: int
    bits: int
    dtype: object
    seed: int = 0
    norm_correction: bool = True

    @property
    def shape(self) -> tuple:
        """Shape of the decoded array, ``(..., dim)``."""
        return tuple(self.norms.shape) + (self.dim,)

    @property
    def nbytes(self) -> int:
        ops = for_array(self.codes)
        return ops.nbytes(self.codes) + ops.nbytes(self.norms)


class TurboQuantizer:
    """Data-oblivious vector quantizer for vectors of length ``dim`` at ``bits`` bits per channel.

    Args:
        dim: vector length (head_dim), >= 2.
        bits: code bits per channel, 1..8.
        seed: rotation seed (non-negative int).
        norm_correction: store ``|x| / |c[code]|`` instead of ``|x|`` so that decoded vectors keep
            the original norm.
        precision: "float32" (default) or "float64" for the rotation; float64 makes codes
            bit-identical across backends on CPU (float32 matmuls of different libraries can
            round a coordinate to the other side of a decision boundary).
    """

    def __init__(self, dim: int, bits: int, seed: int = 0, *, norm_correction: bool = True,
                 precision: str = "float32"):
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int >= 2, got {type(dim).__name__} {dim!r}")
        if dim < 2:
            raise ValueError(f"dim must be an int >= 2, got {dim}")
        check_bits("bits", bits)
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        self.dim, self.bits, self.seed = dim, bits, seed
        self.norm_correction = bool(norm_correction)
        self.precision = precision
        self.codebook = _codebook.load(dim, bits)
        r = rotation.haar(dim, seed)
        self._host = {  # the constants, as numpy; per backend/device/dtype copies live in self._consts
            "rot_t": np.ascontiguousarray(r.T), "rot": r,
            "centroids": self.codebook.centroids, "boundaries": self.codebook.boundaries.astype(np.float32),
        }
        self._consts: dict = {}  # owned by this quantizer: freed with it (no module-level cache)
        self.code_bytes = packing.packed_size(dim, bits)

    def __repr__(self) -> str:
        return (f"TurboQuantizer(dim={self.dim}, bits={self.bits}, seed={self.seed}, "
                f"norm_correction={self.norm_correction})")

    def const(self, name: str, like, dtype):
        """Constant ``name`` (rot_t, rot, centroids, boundaries) as an array of ``like``'s backend and
        device in ``dtype``, built once per (backend, device, dtype) and kept by this quantizer."""
        ops = for_array(like)
        key = (name, ops.NAME, ops.device_key(like), ops.dtype_name(dtype))
        hit = self._consts.get(key)
        if hit is None:
            hit = self._consts[key] = ops.const(self._host[name], like, dtype)
        return hit

    def derived(self, name: str, build):
        """``build(centroids)`` computed once from the codebook and kept by this quantizer (e.g. a
        kernel's lookup table)."""
        key = ("derived", name)
        if key not in self._consts:
            self._consts[key] = build(self.codebook.centroids)
        return self._consts[key]

    def bytes_per_vector(self) -> int:
        """Bytes one encoded vector holds: packed codes + one fp16 norm."""
        return self.code_bytes + 2

    def _check(self, x, ops):
        if not ops.is_float(x):
            allowed = ", ".join(ops.dtype_name(d) for d in ops.FLOAT_DTYPES)
            raise TypeError(f"x must have a floating dtype ({allowed}), got {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x.shape[-1] must equal dim={self.dim}, got shape {tuple(x.shape)}")
        if int(np.prod(x.shape)) == 0:
            raise ValueError(f"x must hold at least one vector, got shape {tuple(x.shape)}")

    def encode(self, x, *, check: bool = True) -> Encoded:
        """Encode x of shape ``(..., dim)`` (torch tensor, mlx array or numpy array).

        ``check=False`` skips the NaN/Inf and fp16-range check, which reads one value back to the
        host (a device sync per call). The KV caches use it: a NaN in a model's own K/V then
        propagates to its output, exactly as it would through an uncompressed cache.
        """
        ops = for_array(x)
        self._check(x, ops)
        with ops.quiet():  # NaN/Inf inputs are reported below, not as numpy warnings
            return self._encode(x, ops, check)

    def _encode(self, x, ops, check: bool) -> Encoded:
        wide = ops.float32 if self.precision == "float32" else ops.float64
        xf = ops.astype(x, wide)
        norms = ops.norm(xf)
        y = ops.matmul(xf, self.const("rot_t", x, wide)) / ops.maximum(norms, 1e-30)[..., None]
        codes = ops.bucketize(ops.astype(y, ops.float32), self.const("boundaries", x, ops.float32))
        stored = norms
        if self.norm_correction:
            stored = stored / ops.norm(ops.take_rows(self.const("centroids", x, wide), codes))
        if check:
            self._check_range(x, ops, ops.max_last(ops.maximum2(x, -x)), stored)  # |x_i| in its own dtype
        return Encoded(packing.pack(codes, self.bits), ops.astype(stored, ops.float16),
                       self.dim, self.bits, x.dtype, self.seed, self.norm_correction)

    @staticmethod
    def _check_range(x, ops, amax, stored) -> None:
        """Every stored norm in fp16's normal range (zero vectors aside: ``amax``, the largest
        ``|x_i|`` per vector, is 0), in one reduction (one host read): ``max(s / FP16_MAX,
        FP16_TINY / s)`` is >= 1 exactly for the norms fp16 cannot hold (a norm that underflowed to 0
        from nonzero coordinates included), and NaN/Inf anywhere in a vector makes it NaN/Inf."""
        ratio = ops.maximum2(stored / FP16_MAX, FP16_TINY / stored)
        if ops.max_all(ops.where(amax == 0, 0.0, ratio)) < 1.0:
            return
        if not ops.all_finite(x):
            raise ValueError("x must be finite: it contains NaN or Inf")
        if not ops.max_all(stored) < FP16_MAX:
            raise ValueError(f"x has a vector norm beyond the fp16 norm storage (>= {FP16_MAX})")
        raise ValueError(f"x has a nonzero vector norm below the fp16 norm storage's normal range "
                         f"(< {FP16_TINY:.3g}): it would decode too short or as zeros; scale x up "
                         f"(decoding is linear in the norm) or encode with check=False to accept that")

    def decode(self, enc: Encoded, dtype=None):
        """Decode to an array of shape ``enc.shape`` and the encoded input's dtype (or ``dtype``)."""
        if not isinstance(enc, Encoded):
            raise TypeError(f"enc must be an Encoded from TurboQuantizer.encode, got {type(enc).__name__}")
        mine = (self.dim, self.bits, self.seed, self.norm_correction)
        if (enc.dim, enc.bits, enc.seed, enc.norm_correction) != mine:
            raise ValueError(
                f"enc was encoded with dim={enc.dim}, bits={enc.bits}, seed={enc.seed}, "
                f"norm_correction={enc.norm_correction}; this quantizer has dim={self.dim}, "
                f"bits={self.bits}, seed={self.seed}, norm_correction={self.norm_correction}")
        return self.decode_parts(enc.codes, enc.norms, enc.dtype if dtype is None else dtype)

    def check_parts(self, codes, norms, dtype=None):
        """The ops of ``codes``, after checking that ``codes`` (..., code_bytes) uint8 and ``norms``
        (...,) float16 are arrays of one backend that this quantizer can have made, and that ``dtype``
        (if given) is a floating dtype of that backend; one clear error otherwise. Shapes and dtypes
        only: nothing is read back from a device."""
        ops = for_array(codes)
        if for_array(norms) is not ops:
            raise TypeError(f"codes and norms must be arrays of one backend, got {type(codes).__name__} "
                            f"and {type(norms).__name__}")
        if codes.dtype != ops.uint8:
            raise TypeError(f"codes must be uint8 (packed {self.bits}-bit codes), got {ops.dtype_name(codes.dtype)}")
        if norms.dtype != ops.float16:
            raise TypeError(f"norms must be float16, got {ops.dtype_name(norms.dtype)}")
        if codes.ndim < 1 or codes.shape[-1] != self.code_bytes:
            raise ValueError(f"codes.shape[-1] must be {self.code_bytes} (dim={self.dim} codes of "
                             f"{self.bits} bits, packed), got shape {tuple(codes.shape)}")
        if tuple(codes.shape[:-1]) != tuple(norms.shape):
            raise ValueError(f"codes and norms must hold the same vectors: codes.shape[:-1] must equal "
                             f"norms.shape, got {tuple(codes.shape)} and {tuple(norms.shape)}")
        if dtype is not None and dtype not in ops.FLOAT_DTYPES:
            allowed = ", ".join(ops.dtype_name(d) for d in ops.FLOAT_DTYPES)
            raise TypeError(f"dtype must be a floating dtype of {ops.NAME} ({allowed}), got {dtype!r}")
        return ops

    def decode_parts(self, codes, norms, dtype):
        """Decode packed ``codes`` (..., code_bytes) uint8 and ``norms`` (...,) fp16 to (..., dim) ``dtype``."""
        ops = self.check_parts(codes, norms, dtype)
        x = ops.matmul(self.centroid_values(codes, norms, ops.float32), self.const("rot", codes, ops.float32))
        return ops.astype(x, dtype)

    # ---- the rotated space: attention without rotating the history back ----------------------
    # A stored vector decodes to x_hat = s * (c[code] @ R), so <q, x_hat> = <q @ R.T, s * c[code]>:
    # rotate the query once, score every stored vector from its codes; a weighted sum of stored
    # vectors is (sum_j p_j s_j c[code_j]) @ R: accumulate in the rotated space, rotate once.
    def centroid_values(self, codes, norms, dtype):
        """s * c[code]: stored vectors in the rotated space, (..., dim) ``dtype`` (no rotation)."""
        ops = for_array(codes)
        c = ops.take_rows(self.const("centroids", codes, ops.float32), packing.unpack(codes, self.bits, self.dim))
        return ops.astype(c * ops.astype(norms, ops.float32)[..., None], dtype)

    def rotate(self, x):
        """``x @ R.T`` (..., dim), computed in float32, returned in ``x``'s dtype."""
        ops = for_array(x)
        return ops.astype(ops.matmul(ops.astype(x, ops.float32), self.const("rot_t", x, ops.float32)), x.dtype)

    def unrotate(self, y):
        """``y @ R`` (..., dim): the inverse of :meth:`rotate`, computed in float32, in ``y``'s dtype."""
        ops = for_array(y)
        return ops.astype(ops.matmul(ops.astype(y, ops.float32), self.const("rot", y, ops.float32)), y.dtype)
