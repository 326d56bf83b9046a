"""harness.blas: MLX on Linux CPU gets a system OpenBLAS, else scipy-openblas32 through a compiled cblas
shim; torch keeps its own BLAS."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from harness import blas

LINUX = sys.platform.startswith("linux")
ROOT = pathlib.Path(__file__).resolve().parents[1]  # harness/ is a folder of the repository, not installed


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**full, **env},
                          cwd=ROOT, timeout=120)


def _loaded_blas(path: str) -> str:
    """Prints the status, then whether ``path`` is mapped into the process."""
    real = os.path.realpath(path)
    return ("import harness.blas as b; s = b.use_openblas(); "
            f"print(s); print(any({real!r} in l for l in open('/proc/self/maps')))")


@pytest.mark.skipif(not LINUX, reason="the BLAS choice applies to Linux only")
def test_loads_system_openblas_when_present():
    path = blas._find()
    if path is None:
        pytest.skip("no system OpenBLAS here (apt-get install libopenblas0-pthread)")
    out = _run(_loaded_blas(path))
    assert out.returncode == 0, out.stderr
    status, mapped = out.stdout.strip().splitlines()
    assert status == f"openblas ({path})" and mapped == "True"


@pytest.mark.skipif(not LINUX, reason="the BLAS choice applies to Linux only")
def test_off_keeps_the_wheel_blas():
    path = blas._find()
    if path is None:
        pytest.skip("no system OpenBLAS here (apt-get install libopenblas0-pthread)")
    out = _run(_loaded_blas(path), TQ_MLX_BLAS="off")
    assert out.returncode == 0, out.stderr
    status, mapped = out.stdout.strip().splitlines()
    assert status == "mlx wheel default (TQ_MLX_BLAS=off)" and mapped == "False"


@pytest.mark.skipif(not LINUX, reason="the BLAS choice applies to Linux only")
def test_bad_path_is_one_clear_error():
    out = _run("import harness.blas as b; b.use_openblas()", TQ_MLX_BLAS="/nonexistent/libblas.so")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: TQ_MLX_BLAS='/nonexistent/libblas.so'") and "'off'" in last


@pytest.mark.skipif(not LINUX, reason="the BLAS choice applies to Linux only")
def test_too_late_once_mlx_is_imported():
    pytest.importorskip("mlx.core")
    out = _run("import mlx.core, harness.blas as b; print(b.use_openblas())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mlx wheel default (mlx imported before harness.blas)"


# ---------------------------------------------------------------- scipy-openblas32 through the cblas shim

HAVE_SHIM_PACKAGE = importlib.util.find_spec("scipy_openblas32") is not None
HAVE_CC = LINUX and blas._compiler() is not None
needs_shim = pytest.mark.skipif(
    not (LINUX and HAVE_SHIM_PACKAGE and HAVE_CC and importlib.util.find_spec("mlx") is not None),
    reason="the cblas shim needs Linux, mlx, scipy-openblas32 (pip install 'tq-core[mlx-cpu]') and a C compiler")
# What a machine without system packages sees: no candidate path exists, find_library finds nothing.
HIDE_SYSTEM = "import ctypes.util, harness.blas as b; b.CANDIDATES = (); ctypes.util.find_library = lambda name: None; "
# mx.matmul against numpy in float64 for each dtype MLX supports on CPU; GEMM calls through the shim.
GEMM = HIDE_SYSTEM + """
import json
s = b.use_openblas()
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
out = {"status": s, "builds": b.builds, "err": {}, "calls": {}}
for name in ("float32", "float64", "complex64"):
    x, y = rng.standard_normal((2, 256, 256))
    if name == "complex64":
        x, y = x + 1j * rng.standard_normal((256, 256)), y - 1j * rng.standard_normal((256, 256))
    n0 = b.shim_calls() or 0
    try:
        z = mx.matmul(mx.array(x, dtype=getattr(mx, name)), mx.array(y, dtype=getattr(mx, name)))
        mx.eval(z)
    except (ValueError, RuntimeError):  # a dtype this MLX does not multiply on CPU
        continue
    ref = x.astype(name).astype(complex) @ y.astype(name).astype(complex)
    out["err"][name] = float(np.abs(np.array(z) - ref).max() / np.abs(ref).max())
    out["calls"][name] = (b.shim_calls() or 0) - n0
out["maps"] = open("/proc/self/maps").read()
print(json.dumps(out))
"""


def _cached(tmp_path) -> list[str]:
    folder = tmp_path / "kernels"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _gemm(tmp_path, **env) -> dict:
    import json

    out = _run(GEMM, TQ_CACHE_DIR=str(tmp_path), **env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_shim
def test_shim_is_built_and_chosen_without_a_system_openblas(tmp_path):
    import scipy_openblas32

    r = _gemm(tmp_path)
    assert r["status"] == f"scipy-openblas32 {scipy_openblas32.__version__} via cblas shim"
    assert r["builds"] == 1
    (shim,) = _cached(tmp_path)  # one library, no temporary file left
    assert shim.startswith("cblas-shim-") and shim.endswith(".so")
    assert str(tmp_path / "kernels" / shim) in r["maps"] and "libscipy_openblas.so" in r["maps"]
    assert "openblas-pthread" not in r["maps"]
    assert set(r["err"]) >= {"float32"}
    for name, err in r["err"].items():
        assert err < (1e-12 if name == "float64" else 1e-5), (name, err)
        assert r["calls"][name] >= 1, f"{name}: MLX's GEMM did not go through the shim"
    # The next process reuses the cached build.
    again = _gemm(tmp_path)
    assert again["status"] == r["status"] and again["builds"] == 0 and _cached(tmp_path) == [shim]


@needs_shim
def test_a_corrupted_cached_shim_is_rebuilt(tmp_path):
    _gemm(tmp_path)
    (shim,) = _cached(tmp_path)
    path = tmp_path / "kernels" / shim
    path.write_bytes(path.read_bytes()[:1000])  # a truncated file fails its SHA-256 trailer
    r = _gemm(tmp_path)
    assert r["status"].endswith("via cblas shim") and r["builds"] == 1 and r["err"]["float32"] < 1e-5
    assert _cached(tmp_path) == [shim]


@needs_shim
@pytest.mark.parametrize("mode", ["nosystem", "scipy"])
def test_env_forces_the_shim_over_a_system_openblas(tmp_path, mode):
    out = _run("import harness.blas as b; print(b.use_openblas()); import mlx.core; "
               "print('openblas-pthread' in open('/proc/self/maps').read())",
               TQ_MLX_BLAS=mode, TQ_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    status, system_mapped = out.stdout.strip().splitlines()
    assert status.startswith("scipy-openblas32 ") and status.endswith(f"via cblas shim (TQ_MLX_BLAS={mode})")
    assert system_mapped == "False"


def _no_compiler_env(tmp_path) -> dict:
    empty = tmp_path / "bin"
    empty.mkdir()
    return {"TQ_CACHE_DIR": str(tmp_path), "PATH": str(empty), "CC": ""}


@pytest.mark.skipif(not (LINUX and HAVE_SHIM_PACKAGE), reason="needs Linux and scipy-openblas32")
def test_falls_back_to_the_wheel_blas_without_a_compiler(tmp_path):
    env = _no_compiler_env(tmp_path)
    out = _run(HIDE_SYSTEM + "print(b.use_openblas())", **env)
    assert out.returncode == 0, out.stderr
    status = out.stdout.strip()
    assert status.startswith("mlx wheel default (no system OpenBLAS; scipy-openblas32 shim: no C compiler found")
    assert blas.HINT in status
    assert _cached(tmp_path) == []
    # Asked for explicitly, the shim fails loudly instead.
    out = _run("import harness.blas as b; b.use_openblas()", TQ_MLX_BLAS="scipy", **env)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: TQ_MLX_BLAS=scipy: the scipy-openblas32 cblas shim is unusable: no C compiler")


@pytest.mark.skipif(not (LINUX and HAVE_SHIM_PACKAGE), reason="needs Linux and scipy-openblas32")
def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path):
    cc = tmp_path / "fakecc"  # answers --version, writes half an output file, then fails
    cc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo fakecc 1.0; exit 0; }\n'
                  'while [ $# -gt 0 ]; do [ "$1" = -o ] && { shift; echo partial > "$1"; }; shift; done\n'
                  'echo "fakecc: error" >&2; exit 1\n')
    cc.chmod(0o755)
    out = _run(HIDE_SYSTEM + "print(b.use_openblas())", TQ_CACHE_DIR=str(tmp_path), CC=str(cc))
    assert out.returncode == 0, out.stderr
    status = out.stdout.strip()
    assert status.startswith("mlx wheel default (no system OpenBLAS; scipy-openblas32 shim: ")
    assert "exited with 1" in status and "fakecc: error" in status
    assert _cached(tmp_path) == []


@pytest.mark.skipif(not LINUX, reason="the BLAS choice applies to Linux only")
def test_falls_back_without_the_package(tmp_path):
    out = _run("import sys; sys.modules['scipy_openblas32'] = None; " + HIDE_SYSTEM + "print(b.use_openblas())",
               TQ_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(
        "mlx wheel default (no system OpenBLAS; scipy-openblas32 shim: scipy-openblas32 is not installed "
        "(pip install scipy-openblas32)")
    assert _cached(tmp_path) == []
