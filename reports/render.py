"""The newest results file of a target -> one self-contained HTML page (inline CSS and SVG, no script).

    python -m reports.render --target cpu [--results reports/results] [--out reports/cpu/index.html]

Imports neither torch nor mlx: pages can be rendered on any machine from the results files alone.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import urllib.parse

import jinja2

from . import fmt, metrics, runs, sections, stream, summary
from .runs import Run

TEMPLATES = pathlib.Path(__file__).resolve().parent / "templates"
REPORTS = pathlib.Path(__file__).resolve().parent
# provenance keys shown in this order (then any other key the run carries)
PROVENANCE = ["target", "tier", "started", "commit", "commit_time", "dirty", "model", "weights_sha256", "corpus",
              "seed", "backends", "skipped_backends", "machine", "versions"]


SAVED_MEANING = ("1 − bytes_held / bytes_fp16_cache of the same memory test: the share of an fp16 cache's bytes "
                 "the compressed cache does not hold (higher is better)")


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
                       href=href, meaning=metrics.meaning, status=summary.status)
    return env


def provenance(run: Run) -> list[tuple[str, object]]:
    """(key, value) rows for the page foot; nested dicts stay dicts (rendered as nested lists)."""
    keys = PROVENANCE + sorted(k for k in run.run if k not in PROVENANCE)
    return [(k, run.run[k]) for k in keys if k in run.run and run.run[k] not in (None, {}, [])]


def column_baselines(heads: list[dict]) -> dict[str, str]:
    """Per headline column, the distinct baselines of its cells († where only the suite default is known)."""
    out = {}
    for h in summary.HEADLINES:
        seen = dict.fromkeys(c.baseline + ("" if c.baseline_labelled else " †")
                             for r in heads if (c := r["cells"][h.key]))
        out[h.key] = "; ".join(seen) or fmt.DASH
    return out


def column_meanings(heads: list[dict]) -> dict[str, str]:
    """Per headline column, what its numbers mean (from the registry), for the column's tooltip."""
    out = {}
    for h in summary.HEADLINES:
        names = dict.fromkeys(c.metric for r in heads if (c := r["cells"][h.key]))
        out[h.key] = "; ".join(f"{m}: {metrics.meaning(m)}" if m else SAVED_MEANING for m in names) or fmt.DASH
    return out


def column_vias(heads: list[dict]) -> dict[str, str]:
    """Per headline column, the most common measured-through line; cells repeat theirs only when it differs."""
    out = {}
    for h in summary.HEADLINES:
        vias = [c.via for r in heads if (c := r["cells"][h.key])]
        out[h.key] = max(dict.fromkeys(vias), key=vias.count) if vias else fmt.DASH
    return out


def context(run: Run) -> dict:
    """Everything the report template needs, computed from one results file."""
    gates = summary.gates(run)
    heads = summary.headlines(run)
    bits_map = {(r["config"], r["backend"]): r["cells"]["bits"].value for r in heads if r["cells"]["bits"]}
    secs = sections.build(run.frame(), gates["suites"], bits_map) if run.records else []
    return {"run": run, "gates": gates, "headlines": heads, "headline_defs": summary.HEADLINES,
            "head_baselines": column_baselines(heads), "head_meanings": column_meanings(heads),
            "head_vias": column_vias(heads), "schema": runs.SCHEMA,
            "sections": secs, "section_ids": {s.suite for s in secs}, "provenance": provenance(run),
            "source": run.path.name,
            "unlabelled_baselines": any(not c.baseline_labelled for r in heads for c in r["cells"].values() if c)}


def page(run: Run, links: dict | None = None) -> str:
    """The HTML report of one run; ``links`` adds a navigation bar (used by the site)."""
    return environment().get_template("report.html.j2").render(**context(run), links=links or {})


def write(path: pathlib.Path, html: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.render", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="results folder name: cpu, cuda, metal, mlx, ...")
    p.add_argument("--results", default=None, help="results root (default: $TQ_RESULTS_DIR or reports/results)")
    p.add_argument("--out", default=None, help="output file (default: reports/<target>/index.html)")
    args = p.parse_args(argv)
    try:
        stream.check_target(args.target)  # it names a folder under reports/: no path may climb out
        run = runs.newest(runs.results_dir(args.results), args.target)
    except (FileNotFoundError, ValueError) as e:
        print(f"reports.render: error: {e}", file=sys.stderr)
        return 2
    out = write(pathlib.Path(args.out) if args.out else REPORTS / args.target / "index.html", page(run))
    print(f"reports.render: {run.path.name} ({len(run.records)} records) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
