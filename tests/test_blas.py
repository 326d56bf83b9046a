"""harness.blas: MLX on Linux CPU gets a system OpenBLAS, torch keeps its own BLAS."""

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
