"""pytest plugin: every measurement goes through the ``record`` fixture into one results file per run.

File: ``reports/results/<target>/<UTC start>_<commit>[_<n>].json`` (``$TQ_RESULTS_DIR`` instead of
``reports/results``; ``<target>`` from ``TQ_RESULTS_TARGET`` or the harness: letters, digits, '-',
'_', '.', not starting with '.'), written atomically at session end, never overwritten. Contents:
``{"schema", "run": provenance, "records": [...], "tests": {nodeid: outcome}}``. Each record: suite,
test (node id), metric, value, unit, error (± one SE or None), and labels (model, backend, config,
mode, protocol, ...).

Metrics are declared in ``reports/registry.py`` (unit, direction, meaning): ``record`` fails the
test on a metric that is not there, or on a unit other than the registered one, so the suites and
the reports read one list.

What the run covered is recorded at collection (``run.selection``): the items collected per suite,
the suites the checkout has, -k/-m expressions, deselected items, ``--benchmark-only`` and the
harness options that narrow the matrix (``--tq-config``, ``--tq-method``, ``--tq-model``,
``--tq-corpus``), so a report can tell a run of the whole default matrix from a partial one. A test
that used pytest-benchmark also leaves the spread of its timed rounds (``timings``).

Measurements survive the run (``reports/stream.py``): each record is appended to a partial file
the moment it is taken, so Ctrl-C, SIGTERM or SIGKILL keep what was measured; the results file
then carries ``run.incomplete`` (why) and ``run.exitstatus``. SIGTERM ends the session like Ctrl-C
(a second SIGTERM kills at once). The results folder is opened when the session starts (once
collection shows a test that records; an xdist controller at its start): an unwritable folder is a
usage error before anything is measured, and runs that died there earlier are recovered. Under
pytest-xdist each worker streams its own partial file and the controller assembles them at the end.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter

import pytest

from . import registry, stream

SCHEMA = stream.SCHEMA
ROOT = pathlib.Path(__file__).resolve().parent / "results"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the session ends as interrupted and keeps its results."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated("SIGTERM")


class _Interrupts:
    """Remembers why the session was interrupted (the hook gets the exception, not the config)."""

    def __init__(self, rec: "Recorder"):
        self.rec = rec

    def pytest_keyboard_interrupt(self, excinfo):
        self.rec.interrupt = _interrupt_reason(excinfo)


class Recorder:
    """The run's side of the plugin in one pytest process (the run itself, or one xdist worker)."""

    def __init__(self, run_id: str, who: str, started: str, disabled: bool, stem: str | None = None):
        self.run_id, self.who, self.started, self.disabled = run_id, who, started, disabled
        self.stem = stem  # the results file's name to be; an xdist worker gets its controller's
        self.writer: stream.Writer | None = None
        self.tests: dict[str, str] = {}
        self.run_seen: dict = {}
        self.interrupt: str | None = None

    def add(self, config, rec: dict) -> None:
        if self.disabled:
            return
        if self.writer is None:  # a test that asked for ``record`` without declaring it
            _open(config)
        self.writer.record(rec)


RECORDER = pytest.StashKey[Recorder]()  # this process's recorder
RUN_INFO = pytest.StashKey[dict]()  # run facts a harness adds to the provenance (target, tier, model, ...)
DESELECTED = pytest.StashKey[int]()  # items deselected (-k, -m, a plugin's pytest_deselected)
NARROWING_OPTIONS = ("--tq-config", "--tq-method", "--tq-model", "--tq-corpus")


def _labels_from(item) -> dict:
    """A test's parameters as labels; a parameter with a ``label`` (a cache config) is filed as
    ``config=<label>``, whatever the fixture is called."""
    labels = {}
    spec = getattr(item, "callspec", None)
    if spec is not None:
        for k, v in spec.params.items():
            if not (isinstance(v, (str, int, float, bool)) or v is None):
                if getattr(v, "label", None):
                    k, v = "config", v.label
                else:
                    v = getattr(v, "name", None) or str(v)
            labels[k] = v
    return labels


@pytest.fixture
def record(request):
    """``record(metric, value, unit=None, error=None, **labels)`` stores one measurement; returns the value.

    ``metric`` must be in ``reports/registry.py``; the unit written is the registered one, and a
    ``unit`` given must equal it. ``error``: one standard error, or None (a non-finite error is None).
    """
    rec: Recorder = request.config.stash[RECORDER]
    suite = request.node.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    base = _labels_from(request.node)

    def _record(metric: str, value, unit: str | None = None, error=None, **labels):
        try:
            unit = registry.unit_of(metric, unit)
        except (registry.UnknownMetric, registry.UnitMismatch) as e:
            pytest.fail(str(e), pytrace=False)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"record: value of {metric!r} must be finite, got {value}")
        err = None if error is None else float(error)
        rec.add(request.config, {
            "suite": suite, "test": request.node.nodeid, "metric": metric, "value": value, "unit": unit,
            "error": err if err is not None and math.isfinite(err) else None,
            "labels": {**base, **labels},
        })
        return value

    return _record


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=ROOT.parent.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU, OS, GPU (name, driver, CUDA) or Apple chip, as far as this machine tells."""
    info = {"os": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["gpu_driver"] = _nvidia_driver()
    if "mlx.core" in sys.modules:
        mx = sys.modules["mlx.core"]
        info["mlx_device"] = str(mx.default_device())
        try:
            info["mlx_device_info"] = {k: str(v) for k, v in mx.device_info().items()}
        except Exception:  # older mlx: no device_info
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(config) -> dict:
    dirty = None if os.environ.get("TQ_COMMIT") else _git("status", "--porcelain", "--untracked-files=no")
    if dirty is None and os.environ.get("TQ_DIRTY") in ("0", "1"):
        dirty = "dirty" if os.environ["TQ_DIRTY"] == "1" else ""
    run = {
        "started": config.stash[RECORDER].started,
        # TQ_COMMIT names the commit of a copied tree (e.g. on a remote GPU machine), whose .git, if
        # any, may not be the one the tree came from: it wins over git when set.
        "commit": os.environ.get("TQ_COMMIT") or _git("rev-parse", "HEAD"),
        "commit_time": _git("show", "-s", "--format=%cI", "HEAD"),
        "dirty": None if dirty is None else bool(dirty),
        "versions": {d: _version(d) for d in ("tq-core", "numpy", "torch", "transformers", "mlx", "mlx-lm",
                                                 "llama-cpp-python")},
        "machine": machine_info(),
    }
    run.update(config.stash.get(RUN_INFO, {}))
    return run


def results_root() -> pathlib.Path:
    """``$TQ_RESULTS_DIR``, else ``reports/results``."""
    return pathlib.Path(os.environ.get("TQ_RESULTS_DIR") or ROOT)


def target_of(config) -> str:
    return config.stash.get(RUN_INFO, {}).get("target") or os.environ.get("TQ_RESULTS_TARGET") or "cpu"


def _say(config, msg: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"tq results: {msg}")
    else:
        print(f"tq results: {msg}", file=sys.stderr)


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _open(config) -> None:
    """Open this process's partial file in the target's results folder (``pytest.UsageError`` if it cannot)."""
    rec: Recorder = config.stash[RECORDER]
    if rec.writer is not None or rec.disabled:
        return
    target = target_of(config)
    try:
        stream.check_target(target)
    except ValueError as e:
        raise pytest.UsageError(f"{e} (set TQ_RESULTS_TARGET to such a name)") from None
    folder = results_root() / target
    run = provenance(config)
    try:
        rec.writer = stream.Writer(folder, rec.stem or stream.stem(run), rec.run_id, rec.who, run, target)
    except OSError as e:
        raise pytest.UsageError(f"results folder {folder} is not writable ({e.strerror or e}): set TQ_RESULTS_DIR "
                                "to a writable folder, or pass --tq-no-results") from None
    rec.run_seen = dict(config.stash.get(RUN_INFO, {}))
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
        except (AttributeError, ValueError, OSError):  # no SIGTERM here, or not the main interpreter
            pass
    if not _is_worker(config):
        stream.recover(folder, warn=lambda m: _say(config, m))


def _note_run(config, rec: Recorder) -> None:
    """Stream the run facts a test added (e.g. the weights hash set when a model is first loaded)."""
    now = dict(config.stash.get(RUN_INFO, {}))
    if now != rec.run_seen:
        rec.writer.write({"kind": "run", "run": now})
        rec.run_seen = now


def _suite(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("test_")


def selection(session) -> dict:
    """What this session selected: items per suite, the suites the checkout has, and everything that
    narrowed the selection (expressions, deselection, ``--benchmark-only``, matrix options)."""
    config = session.config
    root = pathlib.Path(str(config.rootpath))
    available = sorted(p.stem.removeprefix("test_") for p in (root / "suites").glob("test_*.py"))
    args = []
    for a in config.args:
        try:
            a = str(pathlib.Path(a.split("::")[0]).resolve().relative_to(root)) + (
                "::" + a.split("::", 1)[1] if "::" in a else "")
        except ValueError:
            pass
        args.append(a)
    opts = {}
    for name in NARROWING_OPTIONS:
        v = config.getoption(name, default=None)
        if v:
            opts[name] = v
    per_suite = Counter(_suite(i.nodeid) for i in session.items)
    return {"items": len(session.items), "suites": dict(sorted(per_suite.items())),
            "available_suites": available, "args": args, "keyword": config.getoption("keyword", default="") or None,
            "markexpr": config.getoption("markexpr", default="") or None,
            "deselected": config.stash.get(DESELECTED, 0),
            "benchmark_only": bool(config.getoption("benchmark_only", default=False)),
            "benchmark_disabled": bool(config.getoption("benchmark_disable", default=False)),
            "options": opts}


def _timing(item) -> dict | None:
    """The spread of the rounds pytest-benchmark timed in ``item`` (seconds per round), or None."""
    bench = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(bench, "stats", None)
    st = getattr(meta, "stats", None)
    if st is None or not getattr(st, "rounds", 0):
        return None
    try:
        out = {"rounds": int(st.rounds)}
        for k in ("min", "q1", "median", "q3", "max", "stddev"):
            v = float(getattr(st, k))
            out[k] = v if math.isfinite(v) else None
        return out
    except (TypeError, ValueError, ZeroDivisionError):  # a stats object of another shape: no spread
        return None


# ---- hooks -------------------------------------------------------------------------------------
def pytest_configure(config):
    win = getattr(config, "workerinput", None) or {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    config.stash[RECORDER] = Recorder(win.get("tq_run_id") or uuid.uuid4().hex[:12], win.get("workerid", "main"),
                                   win.get("tq_started") or now,
                                   bool(config.getoption("--tq-no-results", default=False)), win.get("tq_stem"))
    config.pluginmanager.register(_Interrupts(config.stash[RECORDER]), "tq-interrupts")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller: workers stream into partial files of this run (same run id and start)."""
    rec: Recorder = node.config.stash[RECORDER]
    node.workerinput["tq_run_id"] = rec.run_id
    node.workerinput["tq_started"] = rec.started
    if rec.writer is not None:
        node.workerinput["tq_stem"] = rec.writer.stem


def pytest_sessionstart(session):
    # An xdist controller collects nothing itself: it opens its results folder here.
    if not _is_worker(session.config) and session.config.pluginmanager.hasplugin("dsession"):
        _open(session.config)


def pytest_deselected(items):
    if items:
        config = items[0].config
        config.stash[DESELECTED] = config.stash.get(DESELECTED, 0) + len(items)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any("record" in getattr(item, "fixturenames", ()) for item in session.items):
        info = session.config.stash.get(RUN_INFO, None)
        if info is None:
            info = session.config.stash[RUN_INFO] = {}
        info["selection"] = selection(session)  # in the partial file's header: a worker's or a killed run's keeps it
        _open(session.config)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    rec: Recorder = item.config.stash[RECORDER]
    if rec.writer is not None:
        rec.writer.write({"kind": "begin", "test": item.nodeid})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    rec: Recorder = item.config.stash[RECORDER]
    outcome = None
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        outcome = "xfailed" if hasattr(rep, "wasxfail") and rep.skipped else rep.outcome
    elif rep.when == "teardown" and rep.failed and rec.tests.get(item.nodeid) != "failed":
        outcome = "error"
    if outcome is not None:
        rec.tests[item.nodeid] = outcome
        if rec.writer is not None:
            rec.writer.write({"kind": "test", "test": item.nodeid, "outcome": outcome})
    if rep.when == "call" and rec.writer is not None:
        spread = _timing(item)
        if spread is not None:
            rec.writer.write({"kind": "timing", "test": item.nodeid, "timing": spread})
    if rec.writer is not None and rep.when == "teardown":
        _note_run(item.config, rec)
    return rep


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's JSON carries the same GPU/accelerator facts as the results file."""
    machine_info["tq"] = globals()["machine_info"]()


def _interrupt_reason(excinfo) -> str:
    v = excinfo.value
    if isinstance(v, Terminated):
        return f"interrupted: {v.args[0] if v.args else 'SIGTERM'}"
    if isinstance(v, pytest.exit.Exception):
        return f"interrupted: pytest.exit: {v.msg}"
    msg = str(v).strip()
    return f"interrupted: {excinfo.typename}" + (f": {msg}" if msg and excinfo.typename != "KeyboardInterrupt" else "")


def _incomplete(session, exitstatus, rec: Recorder) -> str | None:
    code = int(exitstatus)
    if rec.interrupt:
        return rec.interrupt
    if code == pytest.ExitCode.INTERRUPTED:
        return f"interrupted (exit status {code})"
    if code == pytest.ExitCode.INTERNAL_ERROR:
        return f"internal error (exit status {code})"
    if code == pytest.ExitCode.USAGE_ERROR:
        return f"usage error (exit status {code})"
    stop = session.shouldfail or session.shouldstop
    if stop:
        return f"stopped early: {stop}"
    return None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rec: Recorder = config.stash[RECORDER]
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (AttributeError, ValueError, OSError):
        pass
    if rec.writer is None:
        return
    try:
        _note_run(config, rec)
        rec.writer.end(int(exitstatus), _incomplete(session, exitstatus, rec))
        if _is_worker(config):
            rec.writer.close()
            return
        # Commit and dirty state as they were when the run started: a commit made during a long run
        # is not the code it measured.
        path, data = rec.writer.assemble({**provenance(config), **rec.writer.run_start})
    except (OSError, ValueError) as e:  # the partial files stay: the next run or reader recovers them
        rec.writer.close()
        _say(config, f"could not write the results file ({e}); the measurements stay in "
                     f"{rec.writer.folder}/*{stream.SUFFIX} for the next run or tq report to recover")
        return
    if path is None:
        return
    run = data["run"]
    _say(config, f"{path} ({len(data['records'])} measurements)")
    if run.get("incomplete"):
        _say(config, f"run marked incomplete: {run['incomplete']} (exit status {run.get('exitstatus')})")
