"""Results that survive their run: measurements stream to disk as they are taken, assembled at the end.

While a run measures, each pytest process (the run itself, or each pytest-xdist worker) appends to
its own partial file in the target's results folder::

    <results>/<target>/<stem>.<run id>.<who>.partial.jsonl     who: "main", or the xdist worker id

``<stem>`` is the results file's name to be (``<UTC start>_<commit>``). One JSON object per line,
flushed and fsync'd as it is written:

    {"kind": "start", ...}                       format, run id, who, pid, host, provenance so far
    {"kind": "begin", "test": id}                a test started
    {"kind": "record", "record": {...}}          one measurement, as in the results file
    {"kind": "test", "test": id, "outcome": o}   a test's outcome
    {"kind": "timing", "test": id, "timing": {}} the spread of the rounds pytest-benchmark timed in a test
    {"kind": "run", "run": {...}}                run facts a test added (e.g. weights_sha256)
    {"kind": "end", "exitstatus": n, "incomplete": reason or null}   the process's session ended

Each writer holds an exclusive ``flock`` on its file for as long as it lives; the operating system
drops the lock when the process dies, however it dies. At session end the run assembles every
partial file of its run id into ``<stem>[_n].json`` (written atomically, never overwritten) and
deletes them. A partial file that no process holds is an orphan (SIGKILL, a crash, a lost machine):
``recover``, called at the next run's start and by every reader (``tq report``,
``python -m reports.render``), assembles it into a results file marked incomplete.

A results file's ``run`` gains: ``exitstatus`` (the session's exit status, None when it never
ended), ``incomplete`` (why the run is not whole: "interrupted: KeyboardInterrupt", "interrupted:
SIGTERM", "killed: no session end", ...; absent for a whole run), ``unfinished_tests`` (tests
that started and have no outcome) and, for a recovered file, ``recovered_from``. A results file
whose tests used pytest-benchmark also carries ``timings``: {test id: {rounds, min, q1, median,
q3, max, stddev}} in seconds per round (the spread the regression rules use as noise).

Pure standard library: imported by the pytest plugin and by the readers.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): orphans are told by the writer's pid instead
    fcntl = None

SCHEMA = 1  # the results file (reports.runs reads it)
FORMAT = 1  # the partial file
MAX_BYTES = 256 * 2 ** 20  # a results or partial file larger than this is not read
TARGET_RULE = "letters, digits, '-', '_' and '.', not starting with '.'"
_TARGET = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\Z")
_PARTIAL = re.compile(r"(?P<stem>[^.]+)\.(?P<run_id>[0-9a-f]+)\.(?P<who>[A-Za-z0-9_-]+)\.partial\.jsonl\Z")
SUFFIX = ".partial.jsonl"


# ---- names -------------------------------------------------------------------------------------
def is_target(name) -> bool:
    return isinstance(name, str) and _TARGET.match(name) is not None


def check_target(name) -> str:
    """``name`` if it may name a results folder (``TARGET_RULE``), else one clear ``ValueError``."""
    if not is_target(name):
        raise ValueError(f"results target {name!r} is not a folder name this harness writes: use {TARGET_RULE}")
    return name


def stem(run: dict) -> str:
    """``<UTC start, yyyymmddThhmmss>_<commit[:10]>``: the results file's name without suffix."""
    stamp = str(run.get("started") or "").replace(":", "").replace("-", "")[:15] or "nostart"
    return f"{stamp}_{(run.get('commit') or 'nocommit')[:10]}"


def partial_name(stem_: str, run_id: str, who: str) -> str:
    return f"{stem_}.{run_id}.{who}{SUFFIX}"


# ---- reading files safely ----------------------------------------------------------------------
def read_bytes(path: str | os.PathLike, limit: int = MAX_BYTES) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes; ``ValueError`` for anything else.

    Opened non-blocking and checked on the open descriptor, so a FIFO or a device named like a
    results file is refused at once instead of hanging or filling memory.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        return _read_fd(fd, limit)
    finally:
        os.close(fd)


def _read_fd(fd: int, limit: int = MAX_BYTES) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{st.st_size} bytes, more than the {limit} a results file may have")
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, size = [], 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        size += len(b)
        if size > limit:
            raise ValueError(f"more than the {limit} bytes a results file may have")
        chunks.append(b)
    return b"".join(chunks)


# ---- writing results files ---------------------------------------------------------------------
def _jsonable(o):
    """Labels of numpy scalar types and the like: their Python value, else their text."""
    item = getattr(o, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(o)


def dumps(obj, **kw) -> str:
    return json.dumps(obj, default=_jsonable, **kw)


def write_new(path: pathlib.Path, data: dict) -> None:
    """Atomic write that never replaces an existing file (``FileExistsError`` if ``path`` exists)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(data, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if path exists: results are never overwritten
    finally:
        os.unlink(tmp)


def write_results(folder: pathlib.Path, data: dict) -> pathlib.Path:
    """Write ``data`` as ``folder/<stem>[_n].json`` under the first free name; returns the path."""
    base = stem(data.get("run") or {})
    for n in range(1, 10_000):
        path = folder / (f"{base}.json" if n == 1 else f"{base}_{n}.json")
        if path.exists():
            continue
        try:
            write_new(path, data)
            return path
        except FileExistsError:  # another writer took the name in between: next one
            continue
    raise FileExistsError(f"no free results file name for {base} in {folder}")


# ---- locks -------------------------------------------------------------------------------------
def _lock(fd: int, wait: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


# ---- the writer --------------------------------------------------------------------------------
class Writer:
    """One process's partial file: created locked with its header, appended to line by line."""

    def __init__(self, folder: pathlib.Path, stem_: str, run_id: str, who: str, run: dict, target: str):
        self.folder, self.stem, self.run_id, self.who = folder, stem_, run_id, who
        # The code the run measures: the checkout at its start (a later commit is not what ran).
        self.run_start = {k: run[k] for k in ("commit", "commit_time", "dirty") if k in run}
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / partial_name(stem_, run_id, who)
        # Created under a temporary name and renamed once locked with its header: a reader never
        # sees a partial file that is not held by its writer.
        tmp = folder / f".tmp-{run_id}-{who}-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _lock(fd, wait=True)
            self._f = os.fdopen(fd, "a", encoding="utf-8")
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        try:
            self.write({"kind": "start", "format": FORMAT, "schema": SCHEMA, "run_id": run_id, "who": who,
                        "pid": os.getpid(), "host": socket.gethostname(), "target": target, "run": run})
            os.rename(tmp, self.path)
        except BaseException:
            self._f.close()
            os.unlink(tmp)
            raise
        self.records = 0

    def write(self, obj: dict) -> None:
        self._f.write(dumps(obj, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def record(self, rec: dict) -> None:
        self.write({"kind": "record", "record": rec})
        self.records += 1

    def end(self, exitstatus, incomplete: str | None) -> None:
        self.write({"kind": "end", "exitstatus": exitstatus, "incomplete": incomplete})

    def close(self) -> None:
        """Release the file (and its lock); what was written stays for the run or ``recover``."""
        if not self._f.closed:
            self._f.close()

    def assemble(self, run: dict, wait_s: float = 30.0) -> tuple[pathlib.Path | None, dict]:
        """Write the results file of this run from every partial file of its run id; delete them.

        Called by the run's own process after ``end``, with its lock still held. The other partial
        files (xdist workers, ended by now) are locked too, waiting up to ``wait_s`` for a reader
        that holds one for a moment; one still held after that is left for ``recover``.
        Returns (results file or None when nothing was measured, the data written).
        """
        held, left = [(self.path, None)], []
        try:
            for p in sorted(group(self.folder, self.stem, self.run_id)):
                if p == self.path:
                    continue
                fd = _open_locked(p, wait_s)
                if fd is None:
                    left.append(p.name)
                else:
                    held.append((p, fd))
            parts = []
            for p, fd in held:
                raw = read_bytes(p) if fd is None else _read_fd(fd)
                parts.append(parse(p, raw))
            data = assemble(parts, run)
            if left:
                why = f"partial files still held by a live process, left out: {', '.join(left)}"
                data["run"]["incomplete"] = "; ".join(filter(None, [data["run"].get("incomplete"), why]))
            out = write_results(self.folder, data) if data["records"] else None
            for p, _ in held:
                p.unlink(missing_ok=True)
            return out, data
        finally:
            for _, fd in held:
                if fd is not None:
                    os.close(fd)
            self.close()


def group(folder: pathlib.Path, stem_: str, run_id: str) -> list[pathlib.Path]:
    return [p for p in folder.glob(f"{stem_}.{run_id}.*{SUFFIX}") if _PARTIAL.match(p.name)]


def _open_locked(path: pathlib.Path, wait_s: float) -> int | None:
    """An fd of ``path`` holding its lock (waiting up to ``wait_s``), still linked there; else None."""
    deadline = time.monotonic() + wait_s
    while True:
        fd = _open_if_orphan(path)
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(0.05)


def _open_if_orphan(path: pathlib.Path) -> int | None:
    """An fd of ``path`` with its lock taken, when no live writer holds it and it is still linked."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _lock(fd, wait=False):
            os.close(fd)
            return None
        now = os.stat(path)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # assembled and unlinked meanwhile
            os.close(fd)
            return None
        if fcntl is None:  # no locks here: a writer on this host whose pid lives is not gone
            head = _first_line(fd)
            if head.get("host") == socket.gethostname() and _pid_alive(head.get("pid")):
                os.close(fd)
                return None
        return fd
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _first_line(fd: int) -> dict:
    try:
        line = _read_fd(fd).split(b"\n", 1)[0]
        obj = json.loads(line)
        return obj if isinstance(obj, dict) else {}
    except ValueError:
        return {}


# ---- reading partial files ---------------------------------------------------------------------
@dataclass
class Part:
    path: pathlib.Path
    who: str
    header: dict
    records: list = field(default_factory=list)
    tests: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # run facts added while it ran
    begun: list = field(default_factory=list)
    end: dict | None = None
    bad_lines: int = 0


def parse(path: pathlib.Path, raw: bytes) -> Part:
    """The lines of one partial file; a torn or unreadable line (a kill mid-write) is counted, not fatal."""
    m = _PARTIAL.match(path.name)
    part = Part(path, m["who"] if m else "main", {})
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            kind = obj["kind"]
        except (ValueError, TypeError, KeyError):
            part.bad_lines += 1
            continue
        if kind == "start" and isinstance(obj.get("run"), dict):
            part.header = obj
        elif kind == "record" and isinstance(obj.get("record"), dict):
            part.records.append(obj["record"])
        elif kind == "test" and isinstance(obj.get("test"), str):
            part.tests[obj["test"]] = str(obj.get("outcome"))
        elif kind == "timing" and isinstance(obj.get("test"), str) and isinstance(obj.get("timing"), dict):
            part.timings[obj["test"]] = obj["timing"]
        elif kind == "begin" and isinstance(obj.get("test"), str):
            part.begun.append(obj["test"])
        elif kind == "run" and isinstance(obj.get("run"), dict):
            part.run.update(obj["run"])
        elif kind == "end":
            part.end = obj
        else:
            part.bad_lines += 1
    return part


def _who_key(p: Part):
    digits = re.sub(r"\D", "", p.who)
    return (p.who != "main", re.sub(r"\d", "", p.who), int(digits) if digits else -1, p.who)


def assemble(parts: list[Part], run: dict | None = None) -> dict:
    """One results file's content from the partial files of one run (the run's own first, then workers).

    ``run``: the provenance to start from (the run's own, at its end); else the first header's.
    """
    parts = sorted(parts, key=_who_key)
    main = parts[0]
    out = dict(run) if run is not None else dict(main.header.get("run") or {})
    records, tests, timings, reasons, unfinished = [], {}, {}, [], []
    for p in parts:
        # facts a worker knew from its start that the run's own provenance lacks (e.g. what it selected:
        # an xdist controller collects nothing itself)
        out.update({k: v for k, v in (p.header.get("run") or {}).items() if k not in out})
        out.update(p.run)
        records += p.records
        tests.update(p.tests)
        timings.update(p.timings)
        unfinished += [t for t in dict.fromkeys(p.begun) if t not in p.tests]
        who = "" if p.who == "main" else f" (worker {p.who})"
        if p.end is None:
            reasons.append(f"killed: no session end{who}")
        elif p.end.get("incomplete"):
            reasons.append(f"{p.end['incomplete']}{who}")
    if main.who != "main":  # only workers' streams: the session's own end (and exit status) is unknown
        reasons.insert(0, "the run's own stream is missing (only worker streams were found)")
    out["exitstatus"] = main.end.get("exitstatus") if main.end and main.who == "main" else None
    if reasons:
        out["incomplete"] = "; ".join(dict.fromkeys(reasons))
    if unfinished:
        out["unfinished_tests"] = unfinished
    data = {"schema": SCHEMA, "run": out, "records": records, "tests": tests}
    if timings:
        data["timings"] = timings
    return data


# ---- orphans -----------------------------------------------------------------------------------
def _say(msg: str) -> None:
    import sys

    print(f"reports: {msg}", file=sys.stderr)


def recover(folder: str | os.PathLike, warn=None) -> list[pathlib.Path]:
    """Turn every orphaned run in ``folder`` (partial files no live process holds) into a results file.

    A run still being written (any of its partial files locked) is left alone. Each recovery is
    reported through ``warn`` (one line); a folder that cannot be written is reported, not fatal.
    Returns the results files written.
    """
    warn = warn or _say
    folder = pathlib.Path(folder)
    groups: dict[tuple, list[pathlib.Path]] = {}
    try:
        names = sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX))
    except OSError:
        return []
    for p in names:
        m = _PARTIAL.match(p.name)
        if m:
            groups.setdefault((m["stem"], m["run_id"]), []).append(p)
    written = []
    for (_, run_id), paths in groups.items():
        held: list[tuple[pathlib.Path, int]] = []
        try:
            for p in paths:
                fd = _open_if_orphan(p)
                if fd is None:
                    break
                held.append((p, fd))
            else:
                out = _recover_group(folder, held, warn)
                if out is not None:
                    written.append(out)
        except (OSError, ValueError) as e:
            warn(f"could not recover run {run_id} in {folder} ({', '.join(p.name for p in paths)}): {e}")
        finally:
            for _, fd in held:
                os.close(fd)
    return written


def _recover_group(folder: pathlib.Path, held: list, warn) -> pathlib.Path | None:
    parts = [parse(p, _read_fd(fd)) for p, fd in held]
    data = assemble(parts)
    names = [p.name for p, _ in held]
    data["run"]["recovered_from"] = names
    out = None
    if data["records"]:
        out = write_results(folder, data)
        warn(f"recovered {len(data['records'])} measurements of an unfinished run: {', '.join(names)} -> "
             f"{out.name} (incomplete: {data['run'].get('incomplete', 'no')})")
    else:
        warn(f"removed {', '.join(names)}: an unfinished run with no measurements")
    for p, _ in held:
        p.unlink(missing_ok=True)
    return out


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
