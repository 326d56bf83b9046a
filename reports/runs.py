"""Results files (written by ``reports.collect``) read back: one ``Run`` per file, records as a frame.

Pure JSON and pandas: importing this module imports neither torch nor mlx.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field

import pandas as pd

SCHEMA = 1  # the version reports.collect writes; other versions are refused, not guessed at
CORE = ("suite", "test", "metric", "value", "unit", "error")
DEFAULT_RESULTS = pathlib.Path(__file__).resolve().parent / "results"


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


def load(path: str | os.PathLike) -> Run:
    """Read one results file; a file of another schema version is an error."""
    path = pathlib.Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: results schema {data.get('schema')!r}, this renderer reads {SCHEMA}")
    return Run(path, data.get("run") or {}, data.get("records") or [], data.get("tests") or {})


def targets(root: pathlib.Path) -> list[str]:
    """Target folders under ``root`` that hold at least one results file (``_``/``.`` folders skipped)."""
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder at {root} (run the suites first: pytest suites/)")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] not in "._" and files(root, p.name))


def files(root: pathlib.Path, target: str) -> list[pathlib.Path]:
    """Results files of a target (not the ``.tmp-*`` files of a write in progress)."""
    folder = root / target
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else []


def scan(root: pathlib.Path, target: str) -> tuple[list[Run], list[tuple[pathlib.Path, str]]]:
    """(every readable run of a target in trend order, [(file, why it was skipped)])."""
    good, bad = [], []
    for p in files(root, target):
        try:
            good.append(load(p))
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            bad.append((p, f"{type(e).__name__}: {e}"))
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
