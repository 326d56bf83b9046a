"""The results plugin (reports/collect.py, reports/stream.py) in real pytest sessions, run in subprocesses.

Each session runs a small test file that records through the ``record`` fixture (its conftest:
``pytest_plugins = ["reports.collect"]``) into a temporary results folder. Measurements stream to
disk as they are taken, survive SIGTERM, Ctrl-C and SIGKILL, and the results file says why a run
is incomplete and with which exit status; the site never shows such a run as PASS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reports import runs, site, stream, summary

ROOT = Path(__file__).resolve().parents[1]

DEMO = '''
import os, pathlib, time


def test_a(record):
    record("bytes_held", 1024, "B", config="K4V2+s4w128")
    record("kld_mean", 0.04, error=0.003, config="K4V2+s4w128")


def test_b(record):
    record("decode_tokens_per_s", 42.0, cache="baseline")
    mark = os.environ.get("TQ_TEST_MARK")
    if mark:  # tell the driver we are mid-run, then keep measuring until a signal comes
        pathlib.Path(mark).write_text("measuring")
        time.sleep(120)


def test_c():
    pass
'''
A_ID, B_ID = "test_demo.py::test_a", "test_demo.py::test_b"


def _env(tmp_path: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_") and k != "PYTEST_ADDOPTS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TQ_RESULTS_DIR=str(tmp_path / "results"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.update(extra)
    return env


def _files(tmp_path: Path, src: str) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "conftest.py").write_text('pytest_plugins = ["reports.collect"]\n')
    (proj / "test_demo.py").write_text(src)
    return proj


def start(tmp_path: Path, src: str = DEMO, *args: str, **env) -> subprocess.Popen:
    """A pytest session in ``tmp_path/proj`` writing into ``tmp_path/results``; SIGINT at its default."""
    proj = _files(tmp_path, src)
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=proj,
                            env=_env(tmp_path, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run(tmp_path: Path, src: str = DEMO, *args: str, **env) -> tuple[int, str]:
    p = start(tmp_path, src, *args, **env)
    out, _ = p.communicate(timeout=180)
    return p.returncode, out


def mid_run(tmp_path: Path) -> subprocess.Popen:
    """A session stopped in ``test_b`` after its record, ``test_a`` done."""
    mark = tmp_path / "mark"
    p = start(tmp_path, TQ_TEST_MARK=str(mark))
    deadline = time.monotonic() + 120
    while not mark.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the session did not reach test_b: {p.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return p


def folder(tmp_path: Path) -> Path:
    return tmp_path / "results" / "cpu"


def results_files(tmp_path: Path) -> list[Path]:
    return sorted(folder(tmp_path).glob("*.json"))


def partials(tmp_path: Path) -> list[Path]:
    return sorted(folder(tmp_path).glob("*" + stream.SUFFIX))


def only_run(tmp_path: Path) -> runs.Run:
    files = results_files(tmp_path)
    assert len(files) == 1, files
    return runs.load(files[0])


# ---- streaming and kills (review finding 2) -----------------------------------------------------
def test_records_stream_to_disk_and_survive_sigkill(tmp_path, capsys):
    p = mid_run(tmp_path)
    try:
        [part] = partials(tmp_path)  # one partial file for this process, written as it measured
        assert part.name.endswith(".main.partial.jsonl") and not results_files(tmp_path)
        lines = [json.loads(line) for line in part.read_text().splitlines()]
        assert [x["kind"] for x in lines] == ["start", "begin", "record", "record", "test", "begin", "record"]
        assert [x["record"]["metric"] for x in lines if x["kind"] == "record"] == [
            "bytes_held", "kld_mean", "decode_tokens_per_s"]
        # A reader leaves a run in progress alone: its partial file is held by the live session.
        assert runs.scan(tmp_path / "results", "cpu") == ([], []) and partials(tmp_path) == [part]
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    assert partials(tmp_path) == [part] and not results_files(tmp_path)  # nothing ran at its end

    # The next reader turns the orphan into a results file marked incomplete, with what was measured.
    [run_] = runs.runs_of(tmp_path / "results", "cpu")
    assert "recovered 3 measurements" in capsys.readouterr().err
    assert not partials(tmp_path)
    assert run_.run["incomplete"] == "killed: no session end" and run_.run["exitstatus"] is None
    assert run_.run["unfinished_tests"] == [B_ID] and run_.tests == {A_ID: "passed"}
    assert [r["metric"] for r in run_.records] == ["bytes_held", "kld_mean", "decode_tokens_per_s"]
    assert run_.records[1]["unit"] == "nats" and run_.run["recovered_from"] == [part.name]
    assert summary.status(run_) == "INCOMPLETE"
    site.build(tmp_path / "results", tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert '<span class="badge incomplete">INCOMPLETE</span>' in index and "badge pass" not in index


def test_sigterm_ends_the_session_and_keeps_its_results(tmp_path):
    p = mid_run(tmp_path)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2, out
    run_ = only_run(tmp_path)
    assert run_.run["incomplete"] == "interrupted: SIGTERM" and run_.run["exitstatus"] == 2
    assert len(run_.records) == 3 and run_.tests == {A_ID: "passed"} and run_.run["unfinished_tests"] == [B_ID]
    assert not partials(tmp_path) and "run marked incomplete: interrupted: SIGTERM" in out
    assert summary.status(run_) == "INCOMPLETE"


def test_ctrl_c_keeps_results_with_the_exit_status_and_never_shows_pass(tmp_path):
    """Before, Ctrl-C wrote the partial results without an exit status and the site showed them as PASS."""
    p = mid_run(tmp_path)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2, out
    run_ = only_run(tmp_path)
    assert run_.run["incomplete"] == "interrupted: KeyboardInterrupt" and run_.run["exitstatus"] == 2
    assert len(run_.records) == 3 and not partials(tmp_path)
    assert summary.status(run_) == "INCOMPLETE"


def test_the_next_run_recovers_an_orphan_when_it_starts(tmp_path):
    p = mid_run(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    rc, out = run(tmp_path)
    assert rc == 0, out
    assert "recovered 3 measurements of an unfinished run" in out and not partials(tmp_path)
    loaded = [runs.load(f) for f in results_files(tmp_path)]
    assert sorted(r.run.get("incomplete", "") for r in loaded) == ["", "killed: no session end"]


def test_the_exit_status_of_a_whole_run_is_recorded(tmp_path):
    rc, out = run(tmp_path)
    assert rc == 0, out
    run_ = only_run(tmp_path)
    assert run_.run["exitstatus"] == 0 and "incomplete" not in run_.run and summary.status(run_) == "PASS"
    assert run_.tests == {A_ID: "passed", B_ID: "passed", "test_demo.py::test_c": "passed"}
    assert not partials(tmp_path)

    rc, out = run(tmp_path / "failing", DEMO + "\n\ndef test_d(record):\n    record('bytes_held', 1, 'B')\n"
                                               "    assert False\n")
    assert rc == 1, out
    run_ = only_run(tmp_path / "failing")
    assert run_.run["exitstatus"] == 1 and "incomplete" not in run_.run and summary.status(run_) == "FAIL"


# ---- the results folder is checked before anything is measured ---------------------------------
MARKED = '''
import os, pathlib


def test_a(record):
    pathlib.Path(os.environ["TQ_TEST_RAN"]).write_text("ran")
    record("bytes_held", 1, "B")
'''


def test_an_unwritable_results_folder_fails_at_session_start(tmp_path):
    """Before, the test ran and the session failed at its end, after everything was measured."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should be")
    ran = tmp_path / "ran"
    rc, out = run(tmp_path, MARKED, TQ_RESULTS_DIR=str(blocker / "results"), TQ_TEST_RAN=str(ran))
    assert rc == 4, out
    lines = [line for line in out.splitlines() if "not writable" in line]
    assert len(lines) == 1 and str(blocker / "results" / "cpu") in lines[0] and "TQ_RESULTS_DIR" in lines[0], out
    assert not ran.exists()


@pytest.mark.parametrize("target", ["../../x", "/tmp/x", ".hidden", "javascript:alert(1)"])
def test_a_results_target_that_is_not_a_folder_name_is_refused(tmp_path, target):
    """``TQ_RESULTS_TARGET=../../x`` wrote its results outside the results folder."""
    results = tmp_path / "results" / "nested"
    rc, out = run(tmp_path, TQ_RESULTS_DIR=str(results), TQ_RESULTS_TARGET=target)
    assert rc == 4 and f"results target {target!r} is not a folder name" in out, out
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("*.json"))


# ---- the registry at the recording side ---------------------------------------------------------
UNREGISTERED = '''
def test_unknown(record):
    record("no_such_metric", 1.0)


def test_wrong_unit(record):
    record("kld_mean", 0.1, "bits")


def test_registered(record):
    record("kld_mean", 0.1)
    record("bytes_held", 10, "B")
'''


def test_an_unregistered_metric_or_a_wrong_unit_fails_the_test_with_one_line(tmp_path):
    rc, out = run(tmp_path, UNREGISTERED)
    assert rc == 1, out
    assert ("\nmetric 'no_such_metric' is not in reports/registry.py: add it with its unit, direction and "
            "meaning\n") in out
    assert "\nmetric 'kld_mean' recorded with unit 'bits', registered with 'nats' in reports/registry.py" in out
    assert "def test_unknown" not in out and "def test_wrong_unit" not in out  # one line each, no traceback
    run_ = only_run(tmp_path)
    assert [(r["metric"], r["unit"]) for r in run_.records] == [("kld_mean", "nats"), ("bytes_held", "B")]


# ---- pytest-xdist ------------------------------------------------------------------------------
def test_xdist_workers_stream_their_own_partial_files_and_the_controller_assembles_them(tmp_path):
    pytest.importorskip("xdist")
    rc, out = run(tmp_path, DEMO, "-p", "xdist.plugin", "-n", "2")
    assert rc == 0, out
    run_ = only_run(tmp_path)
    assert sorted(r["metric"] for r in run_.records) == ["bytes_held", "decode_tokens_per_s", "kld_mean"]
    assert set(run_.tests) == {A_ID, B_ID, "test_demo.py::test_c"} and run_.run["exitstatus"] == 0
    assert "incomplete" not in run_.run and not partials(tmp_path)


def test_worker_streams_without_the_runs_own_are_never_complete(tmp_path):
    """Partial files of xdist workers alone (the controller's lost): recovered as incomplete, no exit status."""
    from reports import stream

    run = {"target": "cuda", "started": "2026-11-30T21:08:18+00:00", "commit": "a" * 40}
    for who in ("gw0", "gw1"):
        lines = [{"kind": "start", "format": 1, "run": run},
                 {"kind": "record", "record": {"suite": "mse", "test": f"t_{who}", "metric": "d_mse", "value": 0.1,
                                               "unit": "", "error": None, "labels": {}}},
                 {"kind": "test", "test": f"t_{who}", "outcome": "passed"},
                 {"kind": "end", "exitstatus": 0}]
        path = tmp_path / stream.partial_name("20261130T210818_aaaaaaaaaa", "ab12", who)
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = stream.recover(tmp_path, warn=lambda m: None)
    data = json.loads(out[0].read_text())
    assert data["run"]["exitstatus"] is None
    assert "own stream is missing" in data["run"]["incomplete"]
    assert len(data["records"]) == 2


def test_the_commit_is_the_one_the_run_started_on(tmp_path):
    """A commit made while a long run measures (here: TQ_COMMIT changed mid-run) is not the code it
    measured: the results file keeps the commit of the session's start, in its name and its run."""
    src = DEMO.replace("def test_c():\n    pass", "def test_c():\n    os.environ['TQ_COMMIT'] = 'b' * 40")
    code, out = run(tmp_path, src, TQ_COMMIT="a" * 40, TQ_DIRTY="0")
    assert code == 0, out
    files = sorted((tmp_path / "results" / "cpu").glob("*.json"))
    assert len(files) == 1 and "aaaaaaaaaa" in files[0].name, files
    assert json.loads(files[0].read_text())["run"]["commit"] == "a" * 40
