"""A target's latest complete results file -> one self-contained HTML page (inline CSS and SVG, no script).

    python -m reports.render --target cpu [--results reports/results] [--out reports/cpu/index.html]
    python -m reports.render --file reports/results/cuda/<file>.json [--out ...]   # one given run

The run rendered for a target is its latest complete run (``reports.coverage``); where none is
complete, the newest run, and the page says what it covered (partial) or why it stopped (incomplete).

Imports neither torch nor mlx: pages can be rendered on any machine from the results files alone.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import urllib.parse

import jinja2

from . import coverage, fmt, frontier, metrics, runs, sections, stream, summary
from .runs import Run

TEMPLATES = pathlib.Path(__file__).resolve().parent / "templates"
REPORTS = pathlib.Path(__file__).resolve().parent
# provenance keys shown in this order (then any other key the run carries)
PROVENANCE = ["target", "tier", "started", "commit", "commit_time", "dirty", "model", "weights_sha256", "corpus",
              "seed", "backends", "skipped_backends", "machine", "versions"]


SAVED_MEANING = summary.SAVED_MEANING


def href(path) -> str:
    """A link between the site's pages: a relative path, percent-encoded. Anything else (a scheme such
    as ``javascript:``, an absolute or protocol-relative path) is refused, not written into an ``href``."""
    path = str(path)
    if not path or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path) or path.startswith(("/", "\\")):
        raise ValueError(f"refusing to link {path!r}: site links are relative paths")
    return urllib.parse.quote(path, safe="/#")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt.num, pm=fmt.pm, date=fmt.date, bytes=fmt.bytes_h, short_commit=fmt.short_commit,
                       href=href, meaning=metrics.meaning, status=summary.status, coverage=coverage.of)
    return env


def provenance(run: Run) -> list[tuple[str, object]]:
    """(key, value) rows for the page foot; nested dicts stay dicts (rendered as nested lists)."""
    keys = PROVENANCE + sorted(k for k in run.run if k not in PROVENANCE)
    return [(k, run.run[k]) for k in keys if k in run.run and run.run[k] not in (None, {}, [])]


def context(run: Run, speed_from: list[Run] | None = None) -> dict:
    """Everything the report template needs, computed from one results file (``speed_from``: runs of
    the same commit whose speed records fill the headline's speed column)."""
    gates = summary.gates(run)
    head = summary.table(run, speed_from)
    bits_map = {(r["config"], r["backend"]): r["cells"]["bits"].value for r in head if r["cells"]["bits"]}
    secs = sections.build(run.frame(), gates["suites"], bits_map, run.run.get("speed"), gates["suite_status"],
                          gates["uncalibrated"]) if run.records or run.run.get("speed") else []
    frontiers, frontier_error = frontier.build(run, head)
    return {"run": run, "gates": gates, "head": head, "headline_defs": summary.HEADLINES,
            "frontiers": frontiers, "frontier_error": frontier_error,
            "schema": runs.SCHEMA, "coverage": coverage.of(run),
            "sections": secs, "section_ids": {s.suite for s in secs}, "provenance": provenance(run),
            "source": run.path.name}


def page(run: Run, links: dict | None = None, speed_from: list[Run] | None = None) -> str:
    """The HTML report of one run; ``links`` adds a navigation bar (used by the site)."""
    return environment().get_template("report.html.j2").render(**context(run, speed_from), links=links or {})


def write(path: pathlib.Path, html: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.render", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="results folder name: cpu, cuda, metal, mlx, ...")
    p.add_argument("--file", default=None, help="render this results file instead of a target's latest complete run")
    p.add_argument("--results", default=None, help="results root (default: $TQ_RESULTS_DIR or reports/results)")
    p.add_argument("--out", default=None, help="output file (default: reports/<target>/index.html)")
    args = p.parse_args(argv)
    if (args.target is None) == (args.file is None):
        print("reports.render: error: give --target (its latest complete run) or --file (one results file)",
              file=sys.stderr)
        return 2
    try:
        if args.file:
            run = runs.load(args.file)
            target = stream.check_target(run.target)
        else:
            target = stream.check_target(args.target)  # it names a folder under reports/: no path may climb out
            run = pick_run(runs.results_dir(args.results), target)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"reports.render: error: {e}", file=sys.stderr)
        return 2
    out = write(pathlib.Path(args.out) if args.out else REPORTS / target / "index.html", page(run))
    cov = coverage.of(run)
    print(f"reports.render: {run.path.name} ({len(run.records)} records, {cov.kind}) -> {out}")
    return 0


def pick_run(root: pathlib.Path, target: str) -> Run:
    """A target's latest complete run; the newest run when none is complete (said on stderr)."""
    good, bad = runs.scan(root, target)
    if not good:
        runs.newest(root, target)  # raises FileNotFoundError naming what is there
    run = coverage.headline_run(good)
    if run is None:
        run = coverage.latest(good)
        print(f"reports.render: no complete run of target {target!r}: rendering the newest, "
              f"{run.path.name} ({coverage.of(run).text})", file=sys.stderr)
    return run


if __name__ == "__main__":
    sys.exit(main())
