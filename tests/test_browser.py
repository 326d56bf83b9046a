"""The rendered report and site in a real browser: headless Chromium, offline, fresh profile per page.

Fails on any console message (the pages carry no script), on a page that loads without its plots
(inline ``<svg>`` counted in the DOM after load), on external resources and on broken local links.
Screenshots are kept in ``$TQ_BROWSER_ARTIFACTS`` (default ``reports/results/_browser/``, ignored by git).
Skipped when no Chromium is installed (Debian/Ubuntu: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reports import browser, render, runs, sample, site, synthetic

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TQ_BROWSER_ARTIFACTS") or ROOT / "reports" / "results" / "_browser")

pytestmark = pytest.mark.skipif(browser.find() is None,
                                reason="no Chromium: apt-get install -y chromium (or set TQ_CHROMIUM to a Chrome)")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The report of a real run of the suites (``reports.sample``, the same session-wide folder the
    report tests use), and a report and a site from synthetic runs: every suite, two commits, a
    planted KLD regression, two targets."""
    tmp = tmp_path_factory.mktemp("browser")
    real = sample.run(tmp_path_factory.getbasetemp() / "real-results")
    real_report = render.write(tmp / "real" / "index.html", render.page(runs.load(real)))
    res = tmp / "results"
    for n, (commit, scale) in enumerate([("a" * 40, 1.0), ("b" * 40, 1.5)], start=1):
        synthetic.write(res, commit=commit, started=f"2026-11-0{n}T02:00:00+00:00", seed=n, kld_scale=scale)
    synthetic.write(res, commit="a" * 40, started="2026-11-01T02:00:00+00:00", target="mlx")
    report = render.write(tmp / "report" / "index.html", render.page(runs.newest(res, "cpu")))
    built = {str(p.relative_to(tmp / "site")): p for p in site.build(res, tmp / "site")}
    # the committed H200 results (a speed-only run, a recovered nightly run) beside the real CPU sample
    h200 = tmp / "h200-results"
    shutil.copytree(ROOT / "reports" / "results" / "cuda", h200 / "cuda")
    shutil.copytree(real.parent, h200 / "cpu")
    h = {f"h200:{p.relative_to(tmp / 'h200-site')}": p for p in site.build(h200, tmp / "h200-site")}
    return {"real": real_report, "report": report, **built, **h}


@pytest.mark.parametrize("name, min_svg", [
    ("real", 4), ("report", 10), ("index.html", 0), ("cpu/index.html", 5), ("cpu/latest.html", 10),
    ("mlx/index.html", 5), ("h200:index.html", 0), ("h200:cuda/index.html", 5),
    ("h200:cuda/runs/20261130T210711_abd0d88ea6.html", 4), ("h200:cuda/runs/20261130T210818_abd0d88ea6.html", 10)])
def test_page_loads_clean_with_its_plots(pages, name, min_svg):
    shot = ARTIFACTS / f"{name.replace('/', '_').replace(':', '_').removesuffix('.html')}.png"
    c = browser.check(pages[name], shot, height=3000)
    assert not c.problems(min_svg), c.problems(min_svg)
    assert c.screenshot is not None and c.screenshot.stat().st_size > 10_000


def test_the_checker_sees_console_errors_and_broken_links(tmp_path):
    """Negative control: the same check on a page that logs an error and links a missing file must fail."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><script>console.error("planted")</script>'
                   '<a href="missing.html">x</a><img src="https://example.invalid/x.png"></body></html>')
    problems = browser.check(bad).problems(min_svg=1)
    assert any("planted" in p for p in problems), problems
    assert any("broken link: missing.html" in p for p in problems)
    assert any("external resource" in p for p in problems)
    assert any("inline <svg>" in p for p in problems)


def test_latest_real_results_render_clean(tmp_path):
    """Whatever the suites last wrote here (reports/results/<target>/), rendered and opened."""
    root = runs.results_dir()
    targets = runs.targets(root) if root.is_dir() else []
    if not targets:
        pytest.skip(f"no results under {root}: run pytest suites/ first")
    for target in targets:
        page = render.write(tmp_path / f"{target}.html", render.page(runs.newest(root, target)))
        c = browser.check(page, ARTIFACTS / f"real_{target}.png", height=3000)
        # How many plots a real page has depends on which suites ran; it must load clean.
        assert not c.problems(0), (target, c.problems(0))


def test_h200_pages_say_what_each_run_was(pages):
    """The cuda target's headline is its newest complete nightly run (8ba78d2, 187 passed); its run history
    lists the older speed-only runs as partial and the recovered nightly run of abd0d88 as incomplete
    with its 60 tests; the speed run's page draws the speed section."""
    dom = browser.check(pages["h200:index.html"]).dom
    assert "8ba78d27d0" in dom and "187 passed" in dom and "tier nightly" in dom
    target = browser.check(pages["h200:cuda/index.html"]).dom
    assert "INCOMPLETE" in target and "PARTIAL" in target
    assert "incomplete (60 tests: memory, mse, perplexity, generation, needle)" in target
    speed = browser.check(pages["h200:cuda/runs/20261130T210711_abd0d88ea6.html"]).dom
    for text in ("Decode attention latency vs context (device time, CUDA graph)",
                 "Speed-up of attention over the codes vs context", "1,677,177 tokens"):
        assert text in speed, text
    nightly = browser.check(pages["h200:cuda/runs/20261130T210818_abd0d88ea6.html"]).dom
    assert "Speed was not measured in this run" in nightly and "60 passed" in nightly
