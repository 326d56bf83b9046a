"""MSE: reconstruction error of the codec vs the exact optimum, and the inner-product error it causes.

Random vectors: ``N_VECTORS`` seeded uniform unit vectors per dim (the same vectors on every
backend, handed to it through its host: ``host.from_numpy``), encoded and decoded by
``TurboQuantizer`` on the backend, errors computed in float64 (``hosts.to_numpy``).

* ``d_mse``: E||x - x_hat||^2 (± SE), vs ``codebook.mse`` (the exact Lloyd-Max optimum of the
  rotated-coordinate density), the paper's rounded values and the Shannon lower bound 4^-b.
* Norm correction on (what the cache stores): decoded vectors keep |x|; the codes are the same
  as with it off, only the stored scale differs, so x_hat_on = x_hat_off * fp16(1 / |x_hat_off|)
  for unit x. The suite checks that identity on the same vectors and bounds D_on / D_off.
  Measured: D_on ~ (2 - 2 sqrt(1 - D)) (1 - kappa/d), kappa 0 at b = 1, ~1 at b = 2, ~2.7 at
  b >= 5 (limit 3): below the scalar optimum D for b >= 3 at every shipped dim, because fixing the
  norm removes the radial part of the error. D + D^2/4 is only its large-d, small-D limit, and
  is exceeded at b = 1 (D_on = 2 - 2 sqrt(1 - D) exactly there: +2 %).
* Inner products with an independent random unit query per vector: the multiplicative bias is
  the regression slope of <q, x_hat> on <q, x> (expected exactly 1 - D with norm correction off,
  1 - D_on / 2 with it on), and the spread is std(<q, x_hat> - <q, x>) in units of rms <q, x>
  (expected sqrt(D)), recorded raw and with the bias removed.

Real K/V: the model's own post-RoPE keys and values (``harness.capture``, the ``captured_qkv``
fixture; the run's ``--tq-model``), per full-attention layer -- the layers every host's cache
encodes; layers of other types (sliding window, linear attention) are kept as the host library
keeps them and are excluded by type (label ``layers=<measured>/<total>`` when some are) -- with
the quantizers a cache uses for that layer (``rotation.derive_seed``): D_mse of the
unit-normalized vectors and the relative error of the raw ones, as a ratio to the optimum. Gated
against the model's calibration table (``gates.check_real_mse``; ``gate_calibrated`` recorded). Real vectors are far
from uniform on the sphere; only the rotation makes the codebook fit, and one fixed rotation per
layer averages over few directions when keys are concentrated, so per-layer ratios spread more
than sampling noise would say while their mean over layers stays at 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import configs as config_registry
from harness import hosts
from suites import gates
from tq_core import TurboQuantizer
from tq_core.codebook import SHIPPED_DIMS
from tq_core.rotation import derive_seed

N_VECTORS = 20_000
DIMS = {"default": [64, 128], "nightly": list(SHIPPED_DIMS)}
BITS = {"default": [1, 2, 3, 4], "nightly": list(range(1, 9))}
# TurboQuant paper (Zandieh et al. 2025), D_mse of the MSE quantizer for b = 1..4 (rounded, d -> inf).
PAPER = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
QUANTIZER_SEED = 0


def pytest_generate_tests(metafunc):
    tier = metafunc.config.getoption("--tq-tier")
    if "dim" in metafunc.fixturenames:
        metafunc.parametrize("dim", DIMS[tier], ids=lambda v: f"dim={v}")
    if "bits" in metafunc.fixturenames:
        metafunc.parametrize("bits", BITS[tier], ids=lambda v: f"bits={v}")


@pytest.fixture(autouse=True)
def _one_torch_thread(host):
    # Small elementwise ops: torch's thread pool only adds barrier overhead (5-20x on a loaded box).
    with host.threads(1):
        yield


def unit_vectors(dim: int, n: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([20250, dim, stream])
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def roundtrip(q: TurboQuantizer, x: np.ndarray, host):
    """(decoded float64, codes as numpy) of float32 ``x`` through the codec on ``host``'s arrays."""
    enc = q.encode(host.from_numpy(x.astype(np.float32)))
    return hosts.to_numpy(q.decode(enc)), hosts.to_numpy(enc.codes)


def mean_se(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def inner_product_error(x, xh, q):
    """Slope ± SE, and spread^2, debiased spread^2 (each ± SE), of <q, x_hat> against <q, x>.

    Spreads are mean squares in units of mean <q, x>^2 (= 1/d in expectation); their SE is taken
    from the sample, not from a Gaussian formula: at b >= 7 the per-vector error is heavy-tailed
    (the outermost Lloyd-Max cells are wide; max/mean ~100 at d = 256, b = 8).
    """
    a, ah = (q * x).sum(1), (q * xh).sum(1)
    n = a.size
    slope = float((a * ah).sum() / (a * a).sum())
    resid = ah - slope * a
    slope_se = float(np.sqrt((resid ** 2).sum() / (n - 1) / (a * a).sum()))
    unit = float((a * a).mean())
    spread2 = mean_se((ah - a) ** 2 / unit)
    resid2 = mean_se(resid ** 2 / unit)
    return (slope, slope_se), spread2, resid2


def test_random_unit_vectors(host, dim, bits, record):
    x = unit_vectors(dim, N_VECTORS, 0)
    q = unit_vectors(dim, N_VECTORS, 1)
    q_off = TurboQuantizer(dim, bits, QUANTIZER_SEED, norm_correction=False)
    q_on = TurboQuantizer(dim, bits, QUANTIZER_SEED, norm_correction=True)
    opt = q_off.codebook.mse
    record("d_mse_optimum", opt)
    record("shannon_lower_bound", 4.0 ** -bits)
    if bits in PAPER:
        record("d_mse_paper", PAPER[bits])
        record("optimum_vs_paper", opt / PAPER[bits], "x")

    xh_off, codes_off = roundtrip(q_off, x, host)
    xh_on, codes_on = roundtrip(q_on, x, host)
    # Norm correction changes the stored scale only, never the codes.
    assert np.array_equal(codes_off, codes_on), "norm correction changed the codes"

    results = {}
    for nc, xh in ((False, xh_off), (True, xh_on)):
        lab = dict(norm_correction=nc)
        d, d_se = mean_se(((x - xh) ** 2).sum(1))
        record("d_mse", d, error=d_se, **lab)
        record("d_mse_vs_optimum", d / opt, "x", error=d_se / opt, **lab)
        record("d_mse_vs_shannon", d / 4.0 ** -bits, "x", error=d_se / 4.0 ** -bits, **lab)
        if bits in PAPER:
            record("d_mse_vs_paper", d / PAPER[bits], "x", error=d_se / PAPER[bits], **lab)
        (slope, slope_se), (sp2, sp2_se), (rs2, rs2_se) = inner_product_error(x, xh, q)
        record("ip_shrink", slope, "x", error=slope_se, **lab)
        record("ip_rel_bias", slope - 1, "", error=slope_se, **lab)
        # std of <q, x_hat> - <q, x> in units of rms <q, x>; expected sqrt(D_mse)
        record("ip_spread", np.sqrt(sp2), "rms<q,x>", error=sp2_se / (2 * np.sqrt(sp2)), **lab)
        record("ip_spread_debiased", np.sqrt(rs2), "rms<q,x>", error=rs2_se / (2 * np.sqrt(rs2)), **lab)
        record("ip_spread2_vs_d_mse", sp2 / d, "x", error=sp2_se / d, **lab)
        results[nc] = dict(d=d, d_se=d_se, slope=slope, slope_se=slope_se, spread2=sp2, spread2_se=sp2_se)

    # What norm correction must give on these very vectors: x_hat_off rescaled to unit norm, the
    # scale rounded to fp16 as stored (|x| = 1 is exact in fp16 with it off).
    scale = (1 / np.linalg.norm(xh_off, axis=1)).astype(np.float16).astype(np.float64)
    d_identity = float((((x - xh_off * scale[:, None]) ** 2).sum(1)).mean())
    record("d_mse_nc_identity", d_identity, norm_correction=True)
    # Same vectors, same codes: the ratio on/off is free of sampling noise to first order.
    record("d_mse_nc_on_vs_off", results[True]["d"] / results[False]["d"], "x")
    record("expected_ip_shrink", 1 - opt, "x", norm_correction=False)
    record("expected_ip_shrink", 1 - results[True]["d"] / 2, "x", norm_correction=True)
    gates.check_random_mse(dim, bits, opt, results, d_identity)


# ---- real K and V -----------------------------------------------------------------------------
def real_bits(tier: str) -> list[tuple[str, int]]:
    """(kind, bits) pairs to measure: the default config's, or every config's in the nightly tier."""
    configs = config_registry.for_tier("nightly") if tier == "nightly" else [config_registry.DEFAULT]
    pairs = {("k", c.bits_k) for c in configs} | {("v", c.bits_v) for c in configs}
    return sorted(pairs)


@pytest.mark.model
@pytest.mark.parametrize("norm_correction", [False, True], ids=lambda v: f"norm_correction={v}")
def test_real_kv(host, captured_qkv, norm_correction, tier, real_spec, model_info, record):
    """Per layer: D_mse of the model's own K/V with that layer's cache quantizers, vs the optimum.

    Reference ("optimum"): ``codebook.mse`` with norm correction off; with it on, the D_mse the
    same codec reaches on uniform unit vectors (measured here on N_VECTORS of them), since the
    scalar optimum is not what a norm-corrected codec converges to (see the module docstring).
    """
    cap = captured_qkv
    assert cap.layers == real_spec.layers, f"captured {cap.layers} layers, {real_spec.name} has {real_spec.layers}"
    layers = real_spec.full_layers
    if not layers:
        pytest.skip(f"{real_spec.name} has no full-attention layer ({real_spec.describe()['layer_types']}): "
                    "no layer's K/V is held as codes")
    mlabels = dict(model=real_spec.name, **({"layers": f"{len(layers)}/{cap.layers}"} if real_spec.mixed else {}))
    seed = config_registry.DEFAULT.seed  # the rotations a default cache uses
    for kind, bits in real_bits(tier):
        arrays = cap.k if kind == "k" else cap.v
        opt = TurboQuantizer(cap.head_dim, bits, seed).codebook.mse
        ref, ref_se = opt, 0.0
        if norm_correction:
            u = unit_vectors(cap.head_dim, N_VECTORS, 0)
            uq = TurboQuantizer(cap.head_dim, bits, seed, norm_correction=True)
            ref, ref_se = mean_se(((u - roundtrip(uq, u, host)[0]) ** 2).sum(1))
        lab = dict(kind=kind, bits=bits, **mlabels)
        record("uniform_reference_d_mse", ref, error=ref_se, **lab)
        ratios = []
        for layer in layers:
            arr = arrays[layer]
            x = arr.reshape(-1, cap.head_dim).astype(np.float64)
            norms = np.linalg.norm(x, axis=1)
            u = x / norms[:, None]
            qz = TurboQuantizer(cap.head_dim, bits, derive_seed(seed, layer, kind), norm_correction=norm_correction)
            both, _ = roundtrip(qz, np.concatenate([u, x]), host)  # one codec call: unit, then raw
            uh, xh = both[: len(u)], both[len(u):]
            d, d_se = mean_se(((u - uh) ** 2).sum(1))
            rel, rel_se = mean_se(((x - xh) ** 2).sum(1) / norms ** 2)
            energy = float(((x - xh) ** 2).sum() / (x ** 2).sum())
            llab = dict(lab, layer=layer)
            record("real_d_mse_unit", d, error=d_se, **llab)
            record("real_d_mse_unit_vs_optimum", d / opt, "x", error=d_se / opt, **llab)
            record("real_d_mse_unit_vs_reference", d / ref, "x", error=d_se / ref, **llab)
            record("real_rel_mse_raw", rel, error=rel_se, **llab)
            record("real_rel_mse_raw_vs_reference", rel / ref, "x", error=rel_se / ref, **llab)
            record("real_energy_rel_mse_raw", energy, **llab)
            ratios.append(d / ref)
        r = np.array(ratios)
        se = r.std(ddof=1) / np.sqrt(r.size) if r.size > 1 else None
        record("real_d_mse_unit_vs_reference_mean", r.mean(), "x", error=se, **lab)
        record("real_d_mse_unit_vs_reference_min", r.min(), "x", **lab)
        record("real_d_mse_unit_vs_reference_max", r.max(), "x", **lab)
        status = gates.check_real_mse(kind, bits, norm_correction, r, model_info, backend=host.backend,
                                      tokens=cap.tokens)
        record("gate_calibrated", float(status == "calibrated"), "bool", gate="real_mse",
               calibration=gates.calibration(model_info), **lab)
