"""Harness wiring: options, parametrization from the registries, seeding, shared fixtures.

Options:
  --tq-target   auto | comma list of torch-cpu, torch-cuda, mlx, llama-cpp   (default auto)
  --tq-tier     default | nightly                                 (default default)
  --tq-config   a config label, e.g. K3V4+s0w0 (repeatable)        (default: the tier's matrix)
  --tq-method   the matrix through another KV method, e.g. uniform or uniform+g=32
  --tq-model    HF id, local folder or .gguf file of the real model (default: SmolLM2-135M offline);
                every suite measures it, and the run records its id, geometry, layer types and
                weights sha256 (``model``, ``model_info``, ``weights_sha256``)
  --tq-corpus   text file to score                                (default: pydoc_data.topics)

Harness state lives in ``config.stash`` (``HARNESS``): the resolved backends, the config matrix,
the corpus, the run's provenance, loaded models and captures. Nothing is kept in module globals.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from fixtures import configs as config_registry
from fixtures import models as model_registry
from fixtures import targets
from fixtures import text as corpus_registry
from harness import blas, hosts, identity
from harness.hosts import peer_method
from tq_core import methods
from tq_core.methods.peer import NO_CODEC

pytest_plugins = ["reports.collect"]

SEED = 0


@dataclass
class Harness:
    backends: list
    skipped: dict
    matrix: list
    corpus: object
    run: dict
    loaded: dict = field(default_factory=dict)  # backend -> hosts.Model
    memo: dict = field(default_factory=dict)  # session-wide results shared by suites (captures, ...)


HARNESS = pytest.StashKey[Harness]()


def pytest_addoption(parser):
    g = parser.getgroup("tq", "TurboQuant harness")
    g.addoption("--tq-target", default="auto", help="auto, or a comma list of torch-cpu, torch-cuda, mlx, llama-cpp")
    g.addoption("--tq-tier", default="default", choices=["default", "nightly"], help="default or nightly")
    g.addoption("--tq-config", action="append", default=None, metavar="LABEL",
                help="run this cache config instead of the tier's matrix, e.g. K3V4+s0w0 (repeatable)")
    g.addoption("--tq-method", default=None, metavar="METHOD",
                help="run the configs through this KV method, e.g. uniform or uniform+g=32")
    g.addoption("--tq-model", default=None,
                help="HF model id, local folder or local .gguf file (default: SmolLM2-135M-Instruct)")
    g.addoption("--tq-corpus", default=None, help="UTF-8 text file to score (default: pydoc_data.topics)")
    g.addoption("--tq-no-results", action="store_true", help="do not write a results file")


def pytest_configure(config):
    # Under pytest-xdist each worker takes one GPU, round-robin (before anything starts CUDA):
    # `nox -s cuda -- -n <workers>` spreads the suites over every GPU of the machine.
    gpu = hosts.pin_worker_to_gpu(getattr(config, "workerinput", {}).get("workerid"))
    blas.use_openblas()  # before anything imports mlx.core (Linux CPU: see harness/blas.py)
    try:
        backends, reasons = targets.resolve(config.getoption("--tq-target"))
        matrix = config_registry.matrix(config.getoption("--tq-tier"), config.getoption("--tq-config"),
                                        config.getoption("--tq-method"))
        model_registry.check(config.getoption("--tq-model"))  # a bad path or GGUF: one usage error line
    except (RuntimeError, ValueError, TypeError) as e:
        raise pytest.UsageError(str(e)) from None
    try:
        corpus = corpus_registry.load(config.getoption("--tq-corpus"))
    except (OSError, UnicodeDecodeError) as e:
        raise pytest.UsageError(str(e) if isinstance(e, FileNotFoundError) else
                                f"--tq-corpus must be a readable UTF-8 text file: {e}") from None
    run = {
        "target": os.environ.get("TQ_RESULTS_TARGET") or targets.results_target(backends, reasons),
        "backends": [b for b in backends if b not in reasons],
        "skipped_backends": reasons,
        "tier": config.getoption("--tq-tier"),
        "configs": [c.label for c in matrix],
        # configs of other projects' caches: measured and reported, never gated (reports.summary)
        "peers": [c.label for c in matrix if methods.get(c.method).peer],
        "seed": SEED,
        "corpus": {"source": corpus.source, "sha256": corpus.sha256, "chars": len(corpus.text)},
        # The model's id (``harness.identity.model_id``: what records label ``model`` and what
        # calibration tables are named by); ``model_info`` (geometry, layer types, source) and
        # ``weights_sha256`` are added when a suite first asks for the model (``model_info`` fixture).
        "model": identity.model_id(config.getoption("--tq-model")),
        # Which BLAS MLX used on CPU: the wheel's reference BLAS is ~20x slower than OpenBLAS.
        "mlx_blas": blas.status(),
    }
    if gpu is not None:
        run["gpu_of_worker"] = gpu
    if config.getoption("numprocesses", default=None) or getattr(config, "workerinput", None) is not None:
        # pytest-benchmark turns itself off under xdist: the report says speed was not measured.
        run["speed"] = "not measured: the speed suites skip under pytest-xdist (time them in a serial pass)"
    config.stash[HARNESS] = Harness(backends, reasons, matrix, corpus, run)
    from reports import collect  # loaded as this conftest's plugin (pytest_plugins), imported here after

    config.stash[collect.RUN_INFO] = run  # the results file's provenance


def _ids(name):
    return lambda v: f"{name}={getattr(v, 'label', v)}"


def pytest_generate_tests(metafunc):
    h = metafunc.config.stash[HARNESS]
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [
            pytest.param(b, marks=pytest.mark.skip(reason=h.skipped[b])) if b in h.skipped else b
            for b in h.backends], ids=_ids("backend"))
    if "cache_config" in metafunc.fixturenames:
        metafunc.parametrize("cache_config", h.matrix, ids=_ids("config"))


SPEED_MODULES = ("test_speed.py", "test_speed_attention.py", "test_speed_graph.py")  # reports.coverage.SPEED_SUITES
XDIST_SPEED_SKIP = ("speed suites are timed in a serial pass: pytest-benchmark is off under pytest-xdist, and "
                    "parallel workers would contend for the device's memory and time (run them without -n)")


def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist nothing can be timed, and the speed suites' largest cases (a 40 GiB budget,
    # 32 layers at 32k) would share one device with every other worker: they skip, and say so.
    xdist = getattr(config, "workerinput", None) is not None
    nightly = config.getoption("--tq-tier") == "nightly"
    skip_nightly = pytest.mark.skip(reason="nightly tier only: run with --tq-tier nightly")
    skip_speed = pytest.mark.skip(reason=XDIST_SPEED_SKIP)
    for item in items:
        if xdist and item.path.name in SPEED_MODULES:
            item.add_marker(skip_speed)
        elif not nightly and "nightly" in item.keywords:
            item.add_marker(skip_nightly)
        reason = _where_config_runs(config, item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def _where_config_runs(config, item) -> str | None:
    """Why ``item`` cannot measure its cache config: the config's method does not run in the
    backend's host library, or a library it needs is missing (``fixtures.configs.runs_on``); or the
    test measures a codec (marker ``codec``) and the config is a peer's cache, which has none. The
    config is the item's ``cache_config``, else the run's first (``headline``) when it uses that."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    cache_config = params.get("cache_config")
    if cache_config is None and "headline" in getattr(item, "fixturenames", ()):
        cache_config = config.stash[HARNESS].matrix[0]
    if cache_config is None:
        return None
    if "codec" in item.keywords and peer_method(cache_config) is not None:
        return NO_CODEC
    backend = params.get("backend")
    if backend in hosts.LIBS:
        return config_registry.runs_on(cache_config, hosts.LIBS[backend])
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _skip_unsupported():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _skip_unsupported():
        return (yield)


@contextlib.contextmanager
def _skip_unsupported():
    """A test (or a fixture of it) that needs what its backend's host cannot do (``hosts.Unsupported``,
    e.g. K/V capture or TurboQuant codecs in llama.cpp) is skipped with the host's own reason."""
    try:
        yield
    except (hosts.Unsupported, methods.Unsupported) as e:  # the latter: a method's cache for this model
        pytest.skip(str(e))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed on every backend (of those loaded)."""
    random.seed(SEED)
    np.random.seed(SEED)
    for host in hosts.loaded():
        host.seed(SEED)


@pytest.fixture(scope="session")
def harness(request) -> Harness:
    return request.config.stash[HARNESS]


@pytest.fixture(scope="session")
def corpus(harness):
    return harness.corpus


@pytest.fixture(scope="session")
def tier(request) -> str:
    return request.config.getoption("--tq-tier")


@pytest.fixture(scope="session")
def real_spec(request):
    return model_registry.real_spec(request.config.getoption("--tq-model"))


@pytest.fixture(scope="session")
def model_info(request, harness, real_spec) -> dict:
    """The real model as the results name it: ``id``, ``weights_sha256`` (None when its weights are
    not on this machine), geometry and layer types (``ModelSpec.describe``). Added to the run's
    provenance once; suites pass it to the gates (``suites.gates.table_for``)."""
    key = ("model_info", real_spec.name, real_spec.source)
    if key not in harness.memo:
        from tq_core import models

        source = request.config.getoption("--tq-model")
        try:
            local = models.ensure_local(source)
            sha = identity.weights_sha256(local if not isinstance(local, str) else identity._hub_snapshot(local))
        except (FileNotFoundError, TypeError):
            sha = None
        info = {**real_spec.describe(), "weights_sha256": sha}
        harness.run["model_info"] = {k: v for k, v in info.items() if k != "weights_sha256"}
        if sha is not None:
            harness.run["weights_sha256"] = sha
        harness.memo[key] = info
    return harness.memo[key]


@pytest.fixture(scope="session")
def headline(harness):
    """The run's first config: the default matrix's K4V2+s4w128, or the first --tq-config /
    --tq-method config; the suites that measure one config (memory, speed) measure this one."""
    return harness.matrix[0]


@pytest.fixture
def host(backend):
    """The host of the test's backend (``harness.hosts``)."""
    return hosts.get(backend)


@pytest.fixture(scope="session")
def load_model(request, harness, model_info):
    """``load_model(backend)`` -> ``hosts.Model`` of the real model, loaded once per backend (the
    run records which model: ``model_info``)."""
    source = request.config.getoption("--tq-model")

    def _load(backend: str):
        if backend not in harness.loaded:
            harness.loaded[backend] = hosts.get(backend).load(source)
        return harness.loaded[backend]

    yield _load
    harness.loaded.clear()
    for key in [k for k in harness.memo if not (isinstance(k, tuple) and k[0] == "model_info")]:
        del harness.memo[key]  # the model's identity outlives the loaded weights
    import gc

    gc.collect()
    for h in hosts.loaded():
        h.free()


@pytest.fixture(scope="session")
def captured_qkv(load_model, corpus, harness, request):
    """Q/K/V/attention output per layer of the real model over the first capture.TOKENS corpus tokens.

    Captured with the torch model on CPU (the reference numbers every backend's codec is fed).
    """
    from harness import capture

    reason = targets.missing_reason("torch-cpu")
    if reason:
        pytest.skip(f"capturing real Q/K/V needs the torch model: {reason}")
    key = ("capture", request.config.getoption("--tq-model"), corpus.sha256, capture.TOKENS)
    if key not in harness.memo:
        harness.memo[key] = capture.capture(hosts.get("torch-cpu"), load_model("torch-cpu"), corpus.text,
                                            capture.TOKENS)
    return harness.memo[key]
