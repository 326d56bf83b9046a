"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector in R^d.

After a random rotation, every coordinate ``t`` of a unit vector has density

    f(t) = c_d (1 - t^2)^((d-3)/2) on [-1, 1],   c_d = 1 / B(1/2, (d-1)/2),

i.e. ``(t + 1)/2 ~ Beta((d-1)/2, (d-1)/2)`` and ``t^2 ~ Beta(1/2, (d-1)/2)``. A ``b``-bit codebook
is the MSE-optimal scalar quantizer with ``2**b`` levels for ``f``: centroids are the conditional
means of their cells, boundaries the midpoints between neighbouring centroids.

Every cell quantity is closed form, which is what makes the optimum exact rather than sampled:

* ``P(lo < t < hi)`` from the regularized incomplete beta ``I_{t^2}(1/2, (d-1)/2)``;
* ``E[t 1{lo < t < hi}] = c_d / (d-1) * [(1-lo^2)^((d-1)/2) - (1-hi^2)^((d-1)/2)]``, the exact
  antiderivative of ``t f(t)``. It equals the Beta form ``2 E[u 1{...}] - P`` with
  ``E[u 1{u < x}] = 1/2 I_x(a+1, a)`` but does not subtract two nearly equal numbers;
* ``E[t^2 1{|t| < x}] = I_{x^2}(3/2, (d-1)/2) / d``.

The reported ``mse`` is summed cell by cell from non-negative terms (Gauss-Legendre in
``theta = arcsin t``, where the density becomes ``cos(theta)^(d-2)`` and is smooth for every
d >= 2), so it keeps full relative precision even at 8 bits where ``E[t^2] - sum c_i^2 P_i``
would cancel away ~5 digits. The tests cross-check it against the Beta second moments.

Plain Lloyd needs ~N^2 iterations for N levels (millions at 8 bits), so ``generate`` starts from
the asymptotically optimal compander (point density ∝ f^(1/3), again a Beta law) and takes
Newton steps on the Lloyd fixed point, whose Jacobian is tridiagonal.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHIPPED_DIMS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 256)
MAX_BITS = 8
TOL = 1e-13  # stop when no centroid moves by more than this in a Lloyd step
_MAX_ITER = 200  # Newton converges in < 10 steps; the cap only guards against a bug
_GL_NODES = 128  # per cell; the integrand is entire in theta, this is exact to rounding
_CUT = 80.0  # quadrature drops the part of a cell where the density is < e^-80 of its peak

GENERATED_BY = (
    "python -m tq_core.codebook (tq_core/codebook.py: Lloyd-Max for f(t) ∝ (1-t^2)^((d-3)/2), "
    f"closed-form Beta moments, Newton-accelerated Lloyd, tol {TOL:g})"
)
DATA_DIR = Path(__file__).resolve().parent / "codebooks"


@dataclass(frozen=True)
class Codebook:
    """MSE-optimal scalar quantizer for one rotated coordinate of a unit vector in R^dim.

    centroids:  (2**bits,) float64, sorted ascending, ``centroids == -centroids[::-1]``.
    boundaries: (2**bits - 1,) float64, midpoints of consecutive centroids; value ``t`` maps to
                ``centroids[searchsorted(boundaries, t)]``.
    mse:        D_mse = dim * E[(t - Q(t))^2] = E||x - x_hat||^2 for a unit vector x quantized
                coordinate-wise in the rotated basis, i.e. ``TurboQuantizer(norm_correction=False)``.
                With norm correction (the default) the decoded vector is rescaled to |x|: the error
                is 2 - 2 sqrt(1 - D) to first order (+11 % at b=1) and falls below D at b >= 3
                (the radial part of the error is removed).
    The arrays are read-only: codebooks are memoized and shared.
    """

    dim: int
    bits: int
    centroids: np.ndarray
    boundaries: np.ndarray
    mse: float


# ----------------------------------------------------------------------------- validation


def _check_dim(dim) -> int:
    # Integral (not just int) so numpy integers work; bool is an int subclass but never a dim.
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim < 2:
        raise ValueError(f"dim must be an int >= 2, got {dim!r}")
    return int(dim)


def _check_bits(bits) -> int:
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int in 1..{MAX_BITS}, got {type(bits).__name__} {bits!r}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


# ----------------------------------------------------------------------------- the density


class _Density:
    """Closed-form cell integrals of f on the half line t >= 0 (the codebook is symmetric)."""

    def __init__(self, dim: int):
        from scipy import special  # lazy: only generation needs scipy

        self._sp = special
        self.dim = dim
        self.m = (dim - 1) / 2  # t^2 ~ Beta(1/2, m)
        self.log_c = -special.betaln(0.5, self.m)  # log c_d

    def pdf(self, t: np.ndarray) -> np.ndarray:
        """f(t) for |t| < 1."""
        return np.exp(self.log_c + (self.m - 1) * np.log1p(-t * t))

    def prob(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """P(lo < t < hi) for 0 <= lo < hi <= 1, elementwise."""
        sp = self._sp
        # P(0 < t < x) = I_{x^2}(1/2, m) / 2. Differencing the lower CDF in the body and the
        # upper one in the tail keeps the cancellation bounded by 0.5 / P.
        lower = 0.5 * (sp.betainc(0.5, self.m, hi * hi) - sp.betainc(0.5, self.m, lo * lo))
        upper = 0.5 * (sp.betaincc(0.5, self.m, lo * lo) - sp.betaincc(0.5, self.m, hi * hi))
        return np.where(sp.betainc(0.5, self.m, lo * lo) < 0.5, lower, upper)

    def first_moment(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """E[t 1{lo < t < hi}] for 0 <= lo < hi <= 1, elementwise."""
        # c/(d-1) [g(lo) - g(hi)], g(t) = (1-t^2)^m, written as g(lo) * (1 - g(hi)/g(lo)) with
        # expm1 so neighbouring cells near t = 0 (g ~ 1) keep their relative precision.
        with np.errstate(divide="ignore"):  # log1p(-1) = -inf at hi = 1 is exact: g(1) = 0
            log_lo, log_hi = np.log1p(-lo * lo), np.log1p(-hi * hi)
        g_lo = np.exp(self.log_c + self.m * log_lo)
        return g_lo * -np.expm1(self.m * (log_hi - log_lo)) / (self.dim - 1)

    def mean(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(conditional mean E[t | lo < t < hi], cell probability), elementwise."""
        p = self.prob(lo, hi)
        return self.first_moment(lo, hi) / p, p

    def sq_error(self, lo: np.ndarray, hi: np.ndarray, c: np.ndarray) -> np.ndarray:
        """E[(t - c)^2 1{lo < t < hi}] per cell by Gauss-Legendre in theta = arcsin t."""
        x, w = np.polynomial.legendre.leggauss(_GL_NODES)
        a, b = np.arcsin(lo), np.arcsin(hi)
        if self.dim > 2:
            # For large d the density is a narrow bump: integrate each cell only until it has
            # fallen by e^-_CUT below its value at the cell's inner edge (log-concave, so the
            # rest is < e^-_CUT of the cell), else the nodes would straddle nothing but zeros.
            # cos^2(cut) = cos^2(a) e^(-2 _CUT/(d-2)), solved through sin^2 to stay accurate.
            sin2 = np.sin(a) ** 2 - np.cos(a) ** 2 * np.expm1(-2 * _CUT / (self.dim - 2))
            b = np.minimum(b, np.arcsin(np.sqrt(np.minimum(sin2, 1.0))))
        a, b = a[:, None], b[:, None]
        theta = 0.5 * (b - a) * x + 0.5 * (b + a)  # (cells, nodes)
        # f(t) dt = c_d cos(theta)^(d-2) dtheta: smooth even for d = 2 (arcsine law).
        # log cos = log1p(-sin^2)/2: log(cos) of a rounded cosine near 1 is off by eps * d.
        dens = np.exp(self.log_c + 0.5 * (self.dim - 2) * np.log1p(-np.sin(theta) ** 2))
        vals = (np.sin(theta) - c[:, None]) ** 2 * dens
        return 0.5 * (b - a)[:, 0] * (vals @ w)


# ----------------------------------------------------------------------------- generation


def _cells(c_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges (lo, hi) on t >= 0 for positive centroids c_pos (K,): 0, midpoints, 1."""
    mid = 0.5 * (c_pos[:-1] + c_pos[1:])
    return np.concatenate(([0.0], mid)), np.concatenate((mid, [1.0]))


def _lloyd_residual(dens: _Density, c_pos: np.ndarray) -> np.ndarray:
    lo, hi = _cells(c_pos)
    return dens.mean(lo, hi)[0] - c_pos


def _valid(c_pos: np.ndarray) -> bool:
    return bool(c_pos[0] > 0 and c_pos[-1] < 1 and np.all(np.diff(c_pos) > 0))


def _solve_half(dens: _Density, levels: int) -> np.ndarray:
    """Positive half (levels/2,) of the Lloyd-Max centroids, ascending."""
    from scipy import linalg, special

    k = levels // 2
    # Compander start: centroid density ∝ f^(1/3) ∝ (1-t^2)^((d-3)/6): (t+1)/2 ~ Beta(s, s).
    s = (dens.dim + 3) / 6
    c = 2 * special.betaincinv(s, s, (np.arange(k, levels) + 0.5) / levels) - 1
    if k == 1:  # one cell [0, 1]: the mean is the answer, no iteration
        return c + _lloyd_residual(dens, c)

    for _ in range(_MAX_ITER):
        lo, hi = _cells(c)
        mean, p = dens.mean(lo, hi)
        r = mean - c
        if np.max(np.abs(r)) < TOL:
            # Finish with a plain Lloyd step so centroids are exactly the cell means.
            return mean
        # Lloyd map T(c)_j = M(lo_j, hi_j) with lo_j = (c_{j-1}+c_j)/2, hi_j = (c_j+c_{j+1})/2;
        # dM/dlo = f(lo)(M-lo)/P and dM/dhi = f(hi)(hi-M)/P. Interior edges only: 0 and 1 are fixed.
        d_lo = np.where(lo > 0, dens.pdf(lo) * (mean - lo) / p, 0.0)
        # (t = 1 is masked before pdf: f(1) is 0 or, for d = 2, infinite.)
        d_hi = np.where(hi < 1, dens.pdf(np.where(hi < 1, hi, 0.0)) * (hi - mean) / p, 0.0)
        band = np.zeros((3, k))
        band[0, 1:] = 0.5 * d_hi[:-1]  # dT_j/dc_{j+1}
        band[1] = 0.5 * (d_lo + d_hi) - 1.0  # dT_j/dc_j - 1
        band[2, :-1] = 0.5 * d_lo[1:]  # dT_{j+1}/dc_j
        step = linalg.solve_banded((1, 1), band, -r)
        # Halve the Newton step until it keeps the order and shrinks the residual; Lloyd's own
        # step is the fallback (it always decreases the distortion).
        t, norm = 1.0, np.max(np.abs(r))
        while t > 1e-3:
            cand = c + t * step
            if _valid(cand) and np.max(np.abs(_lloyd_residual(dens, cand))) < norm:
                break
            t *= 0.5
        else:
            cand = mean
        c = cand
    raise RuntimeError(f"Lloyd-Max did not converge for dim={dens.dim}, levels={levels}")


def generate(dim: int, bits: int) -> Codebook:
    """Exact Lloyd-Max codebook with 2**bits levels for f(t) ∝ (1-t^2)^((dim-3)/2)."""
    dim, bits = _check_dim(dim), _check_bits(bits)
    dens = _Density(dim)
    c_pos = _solve_half(dens, 2**bits)
    lo, hi = _cells(c_pos)
    # Symmetric quantizer: the negative half mirrors the positive one, so D = 2 * half.
    mse = float(2 * dim * np.sum(dens.sq_error(lo, hi, c_pos)))
    centroids = np.concatenate((-c_pos[::-1], c_pos))
    return _freeze(dim, bits, centroids, mse)


def _freeze(dim: int, bits: int, centroids, mse: float) -> Codebook:
    centroids = np.array(centroids, dtype=np.float64)
    boundaries = 0.5 * (centroids[:-1] + centroids[1:])
    centroids.flags.writeable = False
    boundaries.flags.writeable = False
    return Codebook(dim, bits, centroids, boundaries, float(mse))


# ----------------------------------------------------------------------------- data files


def _render(dim: int) -> str:
    """The JSON text of one dim's data file: all bits, floats via repr (round-trip exact)."""
    lines = ["{", f'  "generated_by": {json.dumps(GENERATED_BY, ensure_ascii=False)},',
             f'  "dim": {dim},', '  "bits": {']
    for bits in range(1, MAX_BITS + 1):
        cb = generate(dim, bits)
        # One array per line: files stay diffable without a line per float.
        lines += [f'    "{bits}": {{',
                  f'      "centroids": {json.dumps(cb.centroids.tolist())},',
                  f'      "boundaries": {json.dumps(cb.boundaries.tolist())},',
                  f'      "mse": {json.dumps(cb.mse)}',
                  "    }" + ("," if bits < MAX_BITS else "")]
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    # Temp file in the same folder + os.replace: readers see the old file or the new, never half.
    # A unique name opened with "x" (not mkstemp) so the file gets the umask's mode, not 0600.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _parse(path: Path, dim: int) -> dict[int, Codebook]:
    obj = json.loads(path.read_text(encoding="utf-8"))
    if obj["dim"] != dim:
        raise ValueError(f"{path} holds dim {obj['dim']}, expected {dim}")
    out = {}
    for bits in range(1, MAX_BITS + 1):
        entry = obj["bits"][str(bits)]
        cb = _freeze(dim, bits, entry["centroids"], entry["mse"])
        # Boundaries are recomputed, not trusted; a file that disagrees is corrupt, not stale.
        if cb.centroids.shape != (2**bits,) or entry["boundaries"] != cb.boundaries.tolist():
            raise ValueError(f"{path}: bits {bits} is not a valid {2**bits}-level codebook")
        out[bits] = cb
    return out


def cache_dir() -> Path:
    """Folder for generated non-shipped dims: $TQ_CACHE_DIR or ~/.cache/tq-core, + codebooks/."""
    from .models import cache_dir as root  # one place reads (and checks) TQ_CACHE_DIR

    return root() / "codebooks"


@functools.lru_cache(maxsize=None)
def _load_dim(dim: int) -> dict[int, Codebook]:
    if dim in SHIPPED_DIMS:
        path = DATA_DIR / f"d{dim}.json"
        if not path.is_file():  # a packaging bug; regenerate with `python -m tq_core.codebook`
            raise FileNotFoundError(f"shipped codebook data missing: {path}")
        return _parse(path, dim)
    path = cache_dir() / f"d{dim}.json"
    try:
        # A file from another generator version is stale: regenerate rather than trust it.
        if json.loads(path.read_text(encoding="utf-8")).get("generated_by") == GENERATED_BY:
            return _parse(path, dim)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable cache entry: regenerate it below
    _write_atomic(path, _render(dim))
    return _parse(path, dim)


def load(dim: int, bits: int) -> Codebook:
    """Codebook for (dim, bits): committed data for SHIPPED_DIMS, else generated once and cached
    under cache_dir(). Exact for every dim; nothing is interpolated."""
    # Validate before the lru_cache: it would treat True as 1 and 64.0 as 64.
    dim, bits = _check_dim(dim), _check_bits(bits)
    return _load_dim(dim)[bits]


def write_data(out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Regenerate every shipped dim into out_dir (default: the package's codebooks/ folder)."""
    out = Path(out_dir) if out_dir is not None else DATA_DIR
    paths = []
    for dim in SHIPPED_DIMS:
        path = out / f"d{dim}.json"
        _write_atomic(path, _render(dim))
        paths.append(path)
    return paths


def main() -> None:
    start = time.perf_counter()
    for path in write_data():
        print(path)
    print(f"regenerated {len(SHIPPED_DIMS)} dims x {MAX_BITS} bits "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
