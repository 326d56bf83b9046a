"""Lloyd-Max codebooks (tq_core/codebook.py) and the committed data in tq_core/codebooks/.

Regeneration is checked for ALL shipped dims and ALL bits (1..8): the whole set regenerates in
about 2 s. It is compared within the generator's real precision (``REGEN_ATOL``, below) rather than
byte for byte: the cell integrals come from scipy's incomplete beta and numpy's log1p/expm1, whose
last digits differ between CPUs, builds and versions. Byte determinism on one machine is tested
separately.
"""

import json

import numpy as np
import pytest
from scipy import special

from tq_core import codebook
from tq_core.codebook import SHIPPED_DIMS, Codebook, generate, load

ALL_BITS = range(1, 9)

# How far two correct generations of one codebook may lie apart. The generator stops when no
# centroid moves by more than codebook.TOL = 1e-13 in a Lloyd step and then takes one exact Lloyd
# step, so what is left is the rounding of the cell integrals (P and E[t 1{cell}]) propagated through
# the fixed point. Measured by regenerating every shipped codebook with those integrals perturbed by
# a random relative error of 1e-15 (about 4 ulp, the accuracy scipy documents for betainc): centroids
# moved by up to 2.3e-13 (d=32, 8 bits); at 1e-14 relative, by up to 1.7e-12 (d=64, 8 bits). One
# machine with another CPU, same numpy/scipy, differed by 2.7e-14. 1e-11 therefore admits integral
# errors up to ~5e-14 relative and is still 5000x below the float32 resolution (6e-8) at which the
# codec compares coordinates with boundaries, so nothing it decides depends on the difference.
REGEN_ATOL = 1e-11
# D_mse is stationary at a Lloyd optimum (first order insensitive to the centroids) and summed from
# non-negative terms, so only its own rounding is left: measured 1.8e-15 relative under the 1e-15
# perturbation above.
REGEN_MSE_REL = 1e-12


@pytest.fixture
def fresh_memo():
    """Clear the in-process memo around a test that changes where codebooks come from."""
    codebook._load_dim.cache_clear()
    yield
    codebook._load_dim.cache_clear()


# ----------------------------------------------------------------------------- committed data


@pytest.mark.parametrize("dim", SHIPPED_DIMS)
def test_regeneration_matches_committed_files(dim):
    path = codebook.DATA_DIR / f"d{dim}.json"
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["generated_by"] == codebook.GENERATED_BY
    assert obj["dim"] == dim
    assert sorted(obj["bits"], key=int) == [str(b) for b in ALL_BITS]
    rng = np.random.default_rng(dim)
    for bits in ALL_BITS:
        new, old = generate(dim, bits), load(dim, bits)
        np.testing.assert_allclose(new.centroids, old.centroids, rtol=0, atol=REGEN_ATOL)
        np.testing.assert_allclose(new.boundaries, old.boundaries, rtol=0, atol=REGEN_ATOL)
        assert new.mse == pytest.approx(old.mse, rel=REGEN_MSE_REL)
        # What matters downstream: every coordinate farther than the tolerance from a boundary gets
        # the same code from both (coordinates of random unit vectors, as the codec sees them).
        t = rng.standard_normal((4096, dim))
        t = (t / np.linalg.norm(t, axis=1, keepdims=True)).ravel()
        b = old.boundaries
        i = np.searchsorted(b, t)
        gap = np.minimum(np.abs(t - b[np.maximum(i - 1, 0)]), np.abs(t - b[np.minimum(i, b.size - 1)]))
        clear = gap > REGEN_ATOL
        assert clear.mean() > 0.999
        np.testing.assert_array_equal(np.searchsorted(new.boundaries, t[clear]),
                                      np.searchsorted(old.boundaries, t[clear]))


def test_rendering_is_deterministic():
    assert codebook._render(96) == codebook._render(96)


# ----------------------------------------------------------------------------- exact values

# Strings, so "0.1160" keeps its trailing zero: the check is to every decimal the reference gives.
REFERENCE_MSE = {
    64: ("0.3584", "0.11453", "0.03339", "0.00913"),
    128: ("0.3609", "0.1160", "0.03397", "0.00931"),
}


@pytest.mark.parametrize("dim", sorted(REFERENCE_MSE))
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_matches_reference(dim, bits):
    ref = REFERENCE_MSE[dim][bits - 1]
    decimals = len(ref.split(".")[1])
    assert f"{load(dim, bits).mse:.{decimals}f}" == ref


@pytest.mark.parametrize("bits", ALL_BITS)
def test_uniform_case_d3_is_exact(bits):
    # d = 3: t is uniform on [-1, 1] (Archimedes), so the optimum is the uniform quantizer.
    n = 2**bits
    cb = generate(3, bits)
    # Exact in exact arithmetic; what the generator returns carries its rounding (see REGEN_ATOL).
    np.testing.assert_allclose(cb.centroids, (2 * np.arange(n) + 1) / n - 1, rtol=0, atol=REGEN_ATOL)
    assert cb.mse == pytest.approx(3 * (2 / n) ** 2 / 12, rel=REGEN_MSE_REL)


# ----------------------------------------------------------------------------- structure


def _shipped():
    return [load(dim, bits) for dim in SHIPPED_DIMS for bits in ALL_BITS]


def test_centroids_sorted_symmetric_and_shaped():
    for cb in _shipped():
        n = 2**cb.bits
        assert isinstance(cb, Codebook)
        assert cb.centroids.dtype == np.float64 and cb.centroids.shape == (n,)
        assert cb.boundaries.dtype == np.float64 and cb.boundaries.shape == (n - 1,)
        assert np.all(np.diff(cb.centroids) > 0)
        assert -1 < cb.centroids[0] and cb.centroids[-1] < 1
        np.testing.assert_array_equal(cb.centroids, -cb.centroids[::-1])


def test_lloyd_fixed_point_conditions():
    """Boundaries are midpoints; each centroid is its cell's mean, recomputed independently of
    the generator with the Beta form E[u 1{u<x}] = 1/2 I_x(a+1, a), u = (t+1)/2 ~ Beta(a, a)."""
    for cb in _shipped():
        c = cb.centroids
        np.testing.assert_array_equal(cb.boundaries, 0.5 * (c[:-1] + c[1:]))
        a = (cb.dim - 1) / 2
        x = (np.concatenate(([-1.0], cb.boundaries, [1.0])) + 1) / 2  # cell edges in u
        p = np.diff(special.betainc(a, a, x))
        eu = 0.5 * np.diff(special.betainc(a + 1, a, x))
        # This form subtracts nearly equal numbers (~1e-11 lost at 8 bits), hence the atol.
        np.testing.assert_allclose((2 * eu - p) / p, c, rtol=0, atol=1e-10)


def test_mse_matches_closed_form_second_moments():
    # E[t^2 1{...}] = 4 E[u^2 1] - 4 E[u 1] + P with E[u^2 1{u<x}] = a(a+1)/(2a(2a+1)) I_x(a+2, a).
    for cb in _shipped():
        a, c = (cb.dim - 1) / 2, cb.centroids
        x = (np.concatenate(([-1.0], cb.boundaries, [1.0])) + 1) / 2
        p = np.diff(special.betainc(a, a, x))
        eu = 0.5 * np.diff(special.betainc(a + 1, a, x))
        eu2 = (a + 1) / (2 * (2 * a + 1)) * np.diff(special.betainc(a + 2, a, x))
        et, et2 = 2 * eu - p, 4 * eu2 - 4 * eu + p
        mse = cb.dim * np.sum(et2 - 2 * c * et + c * c * p)
        assert cb.mse == pytest.approx(mse, rel=1e-8)  # the moment form cancels ~5 digits


def test_more_bits_lower_mse_and_larger_dim_approaches_gaussian():
    for dim in SHIPPED_DIMS:
        mses = [load(dim, b).mse for b in ALL_BITS]
        assert all(m1 > m2 for m1, m2 in zip(mses, mses[1:]))
    # Lloyd-Max for N(0, 1), 1 bit: 1 - 2/pi; a coordinate times sqrt(d) tends to N(0, 1).
    assert generate(10**6, 1).mse == pytest.approx(1 - 2 / np.pi, rel=1e-5)


def test_codebook_arrays_are_read_only():
    cb = load(64, 2)
    with pytest.raises(ValueError):
        cb.centroids[0] = 0.0
    assert load(64, 2) is cb  # memoized


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_monte_carlo_mse(bits):
    dim, n = 128, 20_000
    cb = load(dim, bits)
    x = np.random.default_rng(1234).standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # uniform on the sphere; no rotation needed
    x_hat = cb.centroids[np.searchsorted(cb.boundaries, x)]
    d_mc = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    assert d_mc == pytest.approx(cb.mse, rel=0.02)


# ----------------------------------------------------------------------------- non-shipped dims


def test_non_shipped_dim_is_generated_cached_and_reloaded(tmp_path, monkeypatch, fresh_memo):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    assert 72 not in SHIPPED_DIMS
    first = load(72, 3)
    path = tmp_path / "codebooks" / "d72.json"
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["d72.json"]  # no temp file left behind
    ref = generate(72, 3)
    np.testing.assert_array_equal(first.centroids, ref.centroids)
    assert first.mse == ref.mse

    # A new process (memo cleared) must read the file, not regenerate.
    codebook._load_dim.cache_clear()

    def no_generation(*args):
        raise AssertionError("cached codebook was regenerated")

    monkeypatch.setattr(codebook, "generate", no_generation)
    for bits in ALL_BITS:
        again = load(72, bits)
        assert (again.dim, again.bits) == (72, bits)
    again = load(72, 3)
    np.testing.assert_array_equal(again.centroids, first.centroids)
    np.testing.assert_array_equal(again.boundaries, first.boundaries)
    assert again.mse == first.mse


def test_stale_cache_file_is_regenerated(tmp_path, monkeypatch, fresh_memo):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    path = tmp_path / "codebooks" / "d40.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"generated_by": "an older generator", "dim": 40}')
    cb = load(40, 2)
    np.testing.assert_array_equal(cb.centroids, generate(40, 2).centroids)
    assert json.loads(path.read_text(encoding="utf-8"))["generated_by"] == codebook.GENERATED_BY


def test_write_data_writes_every_shipped_dim(tmp_path):
    paths = codebook.write_data(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"d{d}.json" for d in SHIPPED_DIMS)
    assert paths[0] == tmp_path / f"d{SHIPPED_DIMS[0]}.json"


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fn", [generate, load])
@pytest.mark.parametrize("dim", [1, 0, -64, 64.0, "64", True, None])
def test_bad_dim(fn, dim):
    with pytest.raises(ValueError, match=r"dim must be an int >= 2"):
        fn(dim, 2)


@pytest.mark.parametrize("fn", [generate, load])
@pytest.mark.parametrize("bits", [2.0, "2", True, None])
def test_bits_not_int(fn, bits):
    with pytest.raises(TypeError, match=r"bits must be an int in 1\.\.8"):
        fn(64, bits)


@pytest.mark.parametrize("fn", [generate, load])
@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(fn, bits):
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8"):
        fn(64, bits)


def test_numpy_integers_are_accepted():
    cb = load(np.int64(64), np.int32(3))
    assert (cb.dim, cb.bits) == (64, 3) and type(cb.dim) is int
