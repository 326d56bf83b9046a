"""Seeded Haar-random orthogonal rotations, built once in NumPy and shared by every backend.

How seeds are derived: a cache built with ``seed`` uses, for layer ``i``, the rotation seeded by
``derive_seed(seed, i, "k")`` for keys and ``derive_seed(seed, i, "v")`` for values, i.e.
``numpy.random.SeedSequence([seed, i, 0 | 1])``. A bare ``TurboQuantizer(dim, bits, seed)``
uses ``seed`` directly. The matrix is the Q factor of a standard Gaussian matrix with the signs
of R's diagonal folded in (Mezzadri 2007), which makes it exactly Haar-distributed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_KIND = {"k": 0, "v": 1}


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def derive_seed(seed: int, layer: int, kind: str) -> int:
    """Seed of the rotation used for layer ``layer`` and ``kind`` ("k" or "v") of a cache."""
    seed, layer = _check_int("seed", seed, 0), _check_int("layer", layer, 0)
    if kind not in _KIND:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    return int(np.random.SeedSequence([seed, layer, _KIND[kind]]).generate_state(1, np.uint64)[0])


def haar(dim: int, seed: int) -> np.ndarray:
    """(dim, dim) float64 orthogonal matrix, Haar-distributed, identical for identical arguments.

    Rows are the rotated basis: the rotated coordinates of ``x`` are ``x @ haar(dim, seed).T``.
    The returned array is read-only (it is shared through the cache).
    """
    return _haar(_check_int("dim", dim, 2), _check_int("seed", seed, 0))


@lru_cache(maxsize=256)
def _haar(dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))[None, :]
    q.setflags(write=False)
    return q
