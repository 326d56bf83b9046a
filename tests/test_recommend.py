"""reports.recommend on the committed H200 nightly results (TurboQuant's six configs, 1024 tokens,
decode semantics): the fewest bits held that meet the bar, per backend and method."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from reports import recommend, runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
H200 = ROOT / "reports" / "results" / "cuda" / "20261201T000445_f1a4764.json"


def _only(picks):
    assert len(picks) == 1, picks
    return picks[0]


def test_the_default_bar_picks_the_fewest_bits_that_meet_it():
    pick = _only(recommend.picks(runs.load(H200)))
    assert (pick.backend, pick.method) == ("torch-cuda", "turboquant")
    # K4V2+s4w128: ΔPPL +0.96 %, KLD 0.0089 at 4.895 bits; every config with fewer bits misses the bar
    assert pick.point.config == "K4V2+s4w128" and pick.closest is None
    assert abs(pick.point.v("bits") - 4.895) < 1e-3


def test_a_stricter_bar_moves_up_and_an_impossible_one_names_the_closest():
    strict = _only(recommend.picks(runs.load(H200), kld_max=0.005))
    assert strict.point.config == "K4V3+s4w128"  # KLD 0.0044 at 5.33 bits; K4V4 (0.0034) holds 5.77
    none = _only(recommend.picks(runs.load(H200), kld_max=1e-4))
    assert none.point is None and none.closest.config == "K4V4+s4w128"  # the lowest KLD measured
    table = recommend.markdown([strict, none])
    assert "| K4V3+s4w128 | 5.331 |" in table and "none measured (closest: K4V4+s4w128)" in table


def test_cli_prints_the_table_and_refuses_a_missing_file(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "reports.recommend", str(H200)], capture_output=True, text=True,
                        cwd=ROOT)
    assert ok.returncode == 0 and "| smollm2-135m | torch-cuda | TurboQuant | K4V2+s4w128 |" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "reports.recommend", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.json" in bad.stderr


def test_all_lists_every_point_with_its_front():
    table = recommend.points_markdown(runs.load(H200))
    rows = [r for r in table.splitlines()[2:]]
    assert len(rows) == 7  # the nightly matrix (six configs) and the plain codes (K4V2+s0w0)
    assert "| smollm2-135m | torch-cuda | K4V2+s4w128 | 4.895 |" in table
    assert sum(r.endswith("| yes |") for r in rows) >= 1
