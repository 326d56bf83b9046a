"""Harness wiring: options, parametrization from the registries, seeding, shared fixtures.

Options:
  --tq-target   auto | comma list of torch-cpu, torch-cuda, mlx   (default auto)
  --tq-tier     default | nightly                                 (default default)
  --tq-model    HF id or local path of the real model             (default: SmolLM2-135M offline)
  --tq-corpus   text file to score                                (default: pydoc_data.topics)
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from fixtures import configs as config_registry
from fixtures import models as model_registry
from fixtures import targets
from fixtures import text as corpus_registry
from tq_core import blas

pytest_plugins = ["reports.collect"]

SEED = 0


def pytest_addoption(parser):
    g = parser.getgroup("tq", "TurboQuant harness")
    g.addoption("--tq-target", default="auto", help="auto, or a comma list of torch-cpu, torch-cuda, mlx")
    g.addoption("--tq-tier", default="default", choices=["default", "nightly"], help="default or nightly")
    g.addoption("--tq-model", default=None, help="HF model id or local path (default: SmolLM2-135M-Instruct)")
    g.addoption("--tq-corpus", default=None, help="UTF-8 text file to score (default: pydoc_data.topics)")
    g.addoption("--tq-no-results", action="store_true", help="do not write a results file")


def pytest_configure(config):
    blas.use_openblas()  # before anything imports mlx.core (Linux CPU: see tq_core/blas.py)
    try:
        backends, reasons = targets.resolve(config.getoption("--tq-target"))
    except (RuntimeError, ValueError) as e:
        raise pytest.UsageError(str(e)) from None
    config._tq_backends, config._tq_skip = backends, reasons
    corpus = corpus_registry.load(config.getoption("--tq-corpus"))
    config._tq_corpus = corpus
    config._tq_run = {
        "target": os.environ.get("TQ_RESULTS_TARGET") or targets.results_target(backends, reasons),
        "backends": [b for b in backends if b not in reasons],
        "skipped_backends": reasons,
        "tier": config.getoption("--tq-tier"),
        "seed": SEED,
        "corpus": {"source": corpus.source, "sha256": corpus.sha256, "chars": len(corpus.text)},
        "model": config.getoption("--tq-model") or model_registry.DEFAULT_REAL.name,
        # Which BLAS MLX used on CPU: the wheel's reference BLAS is ~20x slower than OpenBLAS.
        "mlx_blas": blas.status(),
    }


def _ids(name):
    return lambda v: f"{name}={v}"


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [
            pytest.param(b, marks=pytest.mark.skip(reason=cfg._tq_skip[b])) if b in cfg._tq_skip else b
            for b in cfg._tq_backends], ids=_ids("backend"))
    if "config_name" in metafunc.fixturenames:
        names = config_registry.for_tier(cfg.getoption("--tq-tier"))
        metafunc.parametrize("config_name", names, ids=_ids("config"))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--tq-tier") == "nightly":
        return
    skip = pytest.mark.skip(reason="nightly tier only: run with --tq-tier nightly")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed on every backend."""
    random.seed(SEED)
    np.random.seed(SEED)
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(SEED)
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].random.seed(SEED)


@pytest.fixture(scope="session")
def corpus(request):
    return request.config._tq_corpus


@pytest.fixture(scope="session")
def real_spec(request):
    return model_registry.real_spec(request.config.getoption("--tq-model"))


_LOADED: dict = {}


@pytest.fixture(scope="session")
def load_model(request):
    """``load_model(backend)`` -> (model, tokenizer) of the real model, loaded once per backend."""
    source = request.config.getoption("--tq-model")

    def _load(backend: str):
        if backend not in _LOADED:
            from tq_core import models

            if backend == "mlx":
                _LOADED[backend] = models.load_mlx(source)
            else:
                _LOADED[backend] = models.load_hf(source, device="cuda" if backend == "torch-cuda" else "cpu")
            request.config._tq_run.setdefault("weights_sha256", models.weights_sha256(models.ensure_local(source)))
        return _LOADED[backend]

    yield _load
    _LOADED.clear()
    import gc
    import sys

    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


@pytest.fixture
def cache_config(config_name):
    return config_registry.CONFIGS[config_name]
