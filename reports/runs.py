"""Results files (written by ``reports.collect``) read back: one ``Run`` per file, records as a frame.

Only regular files of sane size that hold the schema ``reports.collect`` writes are read; any other
file is passed over with one warning line saying what is wrong, never fatal for the rest. Before a
target is listed, the partial files of runs that died are turned into results files marked
incomplete (``reports.stream.recover``). Pure JSON and pandas: importing this module imports
neither torch nor mlx.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from dataclasses import dataclass, field

import pandas as pd

from . import registry, stream

SCHEMA = stream.SCHEMA  # the version reports.collect writes; other versions are refused, not guessed at
CORE = ("suite", "test", "metric", "value", "unit", "error")
DEFAULT_RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RUN_TEXT = ("target", "tier", "started", "commit", "commit_time", "model", "incomplete")  # strings or null


def warn(msg: str) -> None:
    """One line on stderr: what a reader passed over, and why."""
    print(f"reports: warning: {msg}", file=sys.stderr)


def results_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The results folder: ``path``, else ``$TQ_RESULTS_DIR``, else ``reports/results``."""
    return pathlib.Path(path or os.environ.get("TQ_RESULTS_DIR") or DEFAULT_RESULTS)


@dataclass(eq=False)  # runs compare by identity
class Run:
    """One results file: provenance (``run``), measurements (``records``), test outcomes (``tests``)."""

    path: pathlib.Path
    run: dict
    records: list[dict]
    tests: dict[str, str]
    _frame: pd.DataFrame | None = field(default=None, repr=False)
    timings: dict = field(default_factory=dict)  # {test id: {rounds, min, q1, median, q3, max, stddev}}

    @property
    def target(self) -> str:
        return self.run.get("target") or self.path.parent.name

    @property
    def started(self) -> str:
        return self.run.get("started") or ""

    @property
    def commit(self) -> str | None:
        return self.run.get("commit")

    @property
    def commit_time(self) -> str | None:
        return self.run.get("commit_time")

    @property
    def dirty(self) -> bool | None:
        return self.run.get("dirty")

    @property
    def model(self) -> str | None:
        return self.run.get("model")

    @property
    def corpus_sha(self) -> str | None:
        return (self.run.get("corpus") or {}).get("sha256")

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def order_key(self) -> tuple:
        """Trend order: commit time, then run start, then file name."""
        return (self.commit_time or self.started, self.started, self.path.name)

    def frame(self) -> pd.DataFrame:
        """Records as rows: the core fields plus one column per label (``label.<name>`` on a clash)."""
        if self._frame is None:
            self._frame = frame(self.records)
        return self._frame


def frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {k: r.get(k) for k in CORE}
        for k, v in (r.get("labels") or {}).items():
            row[f"label.{k}" if k in CORE else k] = v
        rows.append(row)
    # object dtype keeps label values as written (4 stays 4, not 4.0 beside a missing value)
    df = pd.DataFrame(rows, columns=None if rows else list(CORE), dtype=object)
    for k in CORE:
        if k not in df:
            df[k] = None
    df["value"] = df["value"].astype(float)
    df["error"] = pd.to_numeric(df["error"], errors="coerce").astype(float)
    return df


def label_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in CORE and not str(c).startswith("_")]  # "_x": scratch columns


def _kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _label(v):
    """Label values as written; a nested value (array, object) as its JSON text."""
    return v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True)


def validate(data) -> tuple[dict, list[dict], dict]:
    """(run, records, tests) of a parsed results file; ``ValueError`` naming the first thing that is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"the file is {_kind(data)}, not a results object")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"results schema {data.get('schema')!r}, this renderer reads {SCHEMA}")
    run, records, tests = data.get("run") or {}, data.get("records") or [], data.get("tests") or {}
    for name, v, want in (("run", run, dict), ("records", records, list), ("tests", tests, dict)):
        if not isinstance(v, want):
            raise ValueError(f"{name!r} is {_kind(v)}, not {_kind(want())}")
    for k in RUN_TEXT:
        if run.get(k) is not None and not isinstance(run[k], str):
            raise ValueError(f"run.{k} is {_kind(run[k])}, not a string")
    if run.get("corpus") is not None and not isinstance(run["corpus"], dict):
        raise ValueError(f"run.corpus is {_kind(run['corpus'])}, not an object")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"record {i} is {_kind(r)}, not an object")
        for k in ("suite", "test", "metric"):
            if not isinstance(r.get(k), str) or not r[k]:
                raise ValueError(f"record {i}: {k} {r.get(k)!r} is not a non-empty string")
        if not stream.finite(r.get("value")):
            raise ValueError(f"record {i} ({r['metric']}): value {r.get('value')!r} is not a finite number")
        err = r.get("error")
        if err is not None and (isinstance(err, bool) or not isinstance(err, (int, float))):
            raise ValueError(f"record {i} ({r['metric']}): error {err!r} is not a number")
        unit = r.get("unit")
        if unit is not None and not isinstance(unit, str):
            raise ValueError(f"record {i} ({r['metric']}): unit {unit!r} is not a string")
        labels = r.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"record {i} ({r['metric']}): labels are {_kind(labels)}, not an object")
        if unit is None:  # not written: the registered unit, where the metric is registered
            m = registry.get(r["metric"])
            unit = m.unit if m else ""
        out.append({**r, "unit": unit, "error": None if err is None or err != err else float(err),
                    "value": float(r["value"]), "labels": {str(k): _label(v) for k, v in labels.items()}})
    for k, v in tests.items():
        if not isinstance(v, str):
            raise ValueError(f"tests[{k!r}] is {_kind(v)}, not an outcome string")
    return run, out, tests


def load(path: str | os.PathLike) -> Run:
    """Read one results file: a regular file of sane size holding the schema ``reports.collect`` writes.

    Anything else (another schema version, JSON of another shape, a FIFO or device) is a ``ValueError``
    saying what is wrong.
    """
    path = pathlib.Path(path)
    try:
        data = json.loads(stream.read_bytes(path).decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    run, records, tests = validate(data)
    return Run(path, run, records, tests, timings=timings_of(data))


def timings_of(data: dict) -> dict:
    """The spread of each test's timed rounds (``run.timings``); entries of another shape are passed over
    (they only make the noise estimate less informed)."""
    raw = data.get("timings") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, dict)
            and all(stream.finite(v.get(q)) for q in ("q1", "median", "q3"))}


def targets(root: pathlib.Path, warn=warn) -> list[str]:
    """Target folders under ``root`` holding at least one results file (orphaned runs recovered first).

    Folder names that are not target names (``stream.TARGET_RULE``) are passed over with a warning.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder at {root} (run the suites first: pytest suites/)")
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not stream.is_target(p.name):
            warn(f"skipped folder {p.name!r} under {root}: not a target name ({stream.TARGET_RULE})")
            continue
        stream.recover(p, warn)
        if files(root, p.name):
            out.append(p.name)
    return out


def files(root: pathlib.Path, target: str) -> list[pathlib.Path]:
    """Results files of a target (not the ``.tmp-*`` files of a write in progress, not partial files)."""
    folder = root / stream.check_target(target)
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else []


def scan(root: pathlib.Path, target: str, warn=warn) -> tuple[list[Run], list[tuple[pathlib.Path, str]]]:
    """(every readable run of a target in trend order, [(file, why it was skipped)]).

    Orphaned partial files of the target are recovered into results files first (``stream.recover``);
    each file passed over is reported through ``warn``, one line naming it and what is wrong.
    """
    stream.recover(root / stream.check_target(target), warn)
    good, bad = [], []
    for p in files(root, target):
        try:
            good.append(load(p))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            bad.append((p, why))
            warn(f"skipped {p}: {why}")
    return sorted(good, key=lambda r: r.order_key), bad


def runs_of(root: pathlib.Path, target: str) -> list[Run]:
    """Every readable run of a target, in trend order (commit time, then run start)."""
    return scan(root, target)[0]


def newest(root: pathlib.Path, target: str) -> Run:
    """The run of ``target`` that started last (unreadable files are passed over, not fatal)."""
    good, bad = scan(root, target)
    if not good:
        why = f"; unreadable: {bad[-1][0].name} ({bad[-1][1]})" if bad else ""
        raise FileNotFoundError(f"no results for target {target!r} under {root} (run the suites with "
                                f"TQ_RESULTS_TARGET={target}, or pick another --target){why}")
    return max(good, key=lambda r: (r.started, r.path.name))


def suite_of(nodeid: str) -> str:
    """``suites/test_memory.py::test_x[...]`` -> ``memory``."""
    mod = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return mod.removesuffix(".py").removeprefix("test_")
