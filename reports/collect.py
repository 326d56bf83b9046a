"""pytest plugin: every measurement goes through the ``record`` fixture into one results file per run.

File: ``reports/results/<target>/<UTC date>_<commit>[_<n>].json``, written atomically, never
overwritten. Contents: ``{"schema", "run": provenance, "records": [...], "tests": {nodeid: outcome}}``.
Each record: suite, test (node id), metric, value, unit, error (± one SE or None), and labels
(model, backend, config, mode, protocol, ...). Under pytest-xdist, workers send their records to
the controller, which writes the one file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

import pytest

SCHEMA = 1
ROOT = pathlib.Path(__file__).resolve().parent / "results"


class Recorder:
    def __init__(self):
        self.records: list[dict] = []
        self.tests: dict[str, str] = {}
        self.run: dict = {}


def _labels_from(item) -> dict:
    labels = {}
    spec = getattr(item, "callspec", None)
    if spec is not None:
        for k, v in spec.params.items():
            if not (isinstance(v, (str, int, float, bool)) or v is None):
                v = getattr(v, "label", None) or getattr(v, "name", None) or str(v)
            labels[k] = v
    return labels


@pytest.fixture
def record(request):
    """``record(metric, value, unit="", error=None, **labels)`` stores one measurement."""
    rec: Recorder = request.config._tq_recorder
    suite = request.node.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    base = _labels_from(request.node)

    def _record(metric: str, value, unit: str = "", error=None, **labels):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"record: value of {metric!r} must be finite, got {value}")
        rec.records.append({
            "suite": suite, "test": request.node.nodeid, "metric": metric, "value": value,
            "unit": unit, "error": None if error is None else float(error),
            "labels": {**base, **{k: v for k, v in labels.items()}},
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
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if dirty is None and os.environ.get("TQ_DIRTY") in ("0", "1"):
        dirty = "dirty" if os.environ["TQ_DIRTY"] == "1" else ""
    run = {
        "started": config._tq_started,
        # TQ_COMMIT names the commit of a copied tree that has no .git (e.g. a remote GPU box).
        "commit": _git("rev-parse", "HEAD") or os.environ.get("TQ_COMMIT"),
        "commit_time": _git("show", "-s", "--format=%cI", "HEAD"),
        "dirty": None if dirty is None else bool(dirty),
        "versions": {d: _version(d) for d in ("tq-core", "numpy", "torch", "transformers", "mlx", "mlx-lm")},
        "machine": machine_info(),
    }
    run.update(getattr(config, "_tq_run", {}))
    return run


def _out_path(target: str, run: dict) -> pathlib.Path:
    folder = pathlib.Path(os.environ.get("TQ_RESULTS_DIR", ROOT)) / target
    folder.mkdir(parents=True, exist_ok=True)
    stamp = run["started"].replace(":", "").replace("-", "")[:15]
    stem = f"{stamp}_{(run.get('commit') or 'nocommit')[:10]}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.json"
    return path


def write(path: pathlib.Path, data: dict) -> None:
    """Atomic write that never replaces an existing file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.link(tmp, path)  # fails if path exists: results are never overwritten
    finally:
        os.unlink(tmp)


# ---- hooks -------------------------------------------------------------------------------------
def pytest_configure(config):
    config._tq_recorder = Recorder()
    config._tq_started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    rec: Recorder = item.config._tq_recorder
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        rec.tests[item.nodeid] = "xfailed" if hasattr(rep, "wasxfail") and rep.skipped else rep.outcome


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's JSON carries the same GPU/accelerator facts as the results file."""
    machine_info["tq"] = globals()["machine_info"]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: merge what a worker recorded."""
    out = getattr(node, "workeroutput", {}).get("tq_results")
    if out:
        data = json.loads(out)
        rec: Recorder = node.config._tq_recorder
        rec.records.extend(data["records"])
        rec.tests.update(data["tests"])
        rec.run.update(data["run"])


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rec: Recorder = config._tq_recorder
    worker = hasattr(config, "workeroutput")
    if worker:
        config.workeroutput["tq_results"] = json.dumps(
            {"records": rec.records, "tests": rec.tests, "run": getattr(config, "_tq_run", {})})
        return
    if not rec.records or config.getoption("--tq-no-results", default=False):
        return
    run = provenance(config)
    run.update(rec.run)
    target = run.get("target", "cpu")
    path = _out_path(target, run)
    write(path, {"schema": SCHEMA, "run": run, "records": rec.records, "tests": rec.tests})
    config._tq_results_path = path
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"tq results: {path} ({len(rec.records)} measurements)")
