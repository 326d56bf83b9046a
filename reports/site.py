"""The nightly site: a pure function of the results folder -> static HTML pages.

    tq report [--results DIR] [--out DIR] [--kld-regress 0.10] [--speed-regress 0.05]
    python -m reports.site [same options]

Pages (all self-contained, relative links only):
    index.html                  every target: latest status, headline numbers, flagged regressions
    <target>/index.html         trends of the key metrics across commits, regressions, run history
    <target>/latest.html        the full report of the target's latest run
    <target>/runs/<file>.html   the full report of each run a flagged regression points at (and the run before)
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from . import charts, fmt, plots, render, runs, summary, trends
from .charts import Series
from .runs import Run

MARKER = ".tq-site"  # a folder holding this file was written by build() and may be replaced by it
MAX_TICKS = 14


@dataclass
class TargetPage:
    name: str
    runs: list[Run]
    latest: Run
    gates: dict
    headline: dict | None
    regressions: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    groups: list = field(default_factory=list)  # [{"title", "runs", "figures"}]
    run_pages: dict = field(default_factory=dict)  # stem -> relative href from the target folder
    skipped: list = field(default_factory=list)  # [(file, why)] results files that could not be read


def run_groups(rs: list[Run]) -> list[tuple[tuple, list[Run]]]:
    """Runs split by (model, corpus sha256), the latest run's group first: trends never mix them."""
    out: dict[tuple, list[Run]] = {}
    for r in rs:
        out.setdefault((r.model, r.corpus_sha), []).append(r)
    latest = max(rs, key=lambda r: (r.started, r.path.name))
    return sorted(out.items(), key=lambda kv: kv[0] != (latest.model, latest.corpus_sha))


def ticks(rs: list[Run]) -> tuple[list, dict]:
    step = max(1, -(-len(rs) // MAX_TICKS))
    names = {i: f"{fmt.short_commit(r.commit, r.dirty)} · {fmt.date(r.started)}" for i, r in enumerate(rs)}
    return [(i, (r.commit or "none")[:7]) for i, r in enumerate(rs) if i % step == 0 or i == len(rs) - 1], names


def headline_trends(rs: list[Run], flags: list, cache: dict) -> list:
    """One chart per headline metric: a line per (config, backend) across the runs of one group."""
    figs = []
    x_ticks, x_names = ticks(rs)
    for h in summary.HEADLINES:
        lines: dict[tuple, Series] = {}
        for i, r in enumerate(rs):
            for row in cache[r.path]:
                c = row["cells"][h.key]
                if c is None:
                    continue
                meta = {"config": row["config"], "backend": row["backend"]}
                s = lines.setdefault((row["config"], row["backend"]),
                                     Series(plots.name_of(meta), [], [], [], meta=meta))
                s.x.append(i)
                s.y.append(c.value)
                s.err.append(c.error)
        if not lines:
            continue
        cells = [c for r in rs for row in cache[r.path] if (c := row["cells"][h.key])]
        unit = cells[0].unit
        marks = [(rs.index(f.at.run), f"{f.rule.name} ↑ {f.at.run.commit[:7] if f.at.run.commit else ''}")
                 for f in flags if f.at.run in rs and h.key == "kld" and f.rule.metric == "kld_mean"]
        series = plots.dedupe(list(lines.values()))[: len(charts.PALETTE)]
        names = [m for m in dict.fromkeys(c.metric for c in cells) if m]
        figs.append(plots.Figure(h.title, charts.xy_chart(
            series, title=h.title, x_label="commit (trend order)", y_label=f"{h.title} [{unit}]" if unit else h.title,
            x_ticks=x_ticks, x_names=x_names, marks=sorted(set(marks)), width=560, height=280),
            "" if names else render.SAVED_MEANING[:1].upper() + render.SAVED_MEANING[1:] + ".", metrics=names))
    return figs


def throughput_trends(rs: list[Run], flags: list, rules: list) -> list:
    """One chart per throughput metric and unit: a line per label set, across the runs of one group."""
    rule = next((r for r in rules if r.metric is None), None)
    if rule is None:
        return []
    index = {r.path: i for i, r in enumerate(rs)}
    by_metric: dict[tuple, list] = {}
    for key, pts in trends.series(rs).items():
        if rule.applies(key.metric, pts[0].unit):
            by_metric.setdefault((key.suite, key.metric, pts[0].unit), []).append((key, pts))
    x_ticks, x_names = ticks(rs)
    figs = []
    flagged_keys = {f.key for f in flags}
    for (suite, metric, unit), items in by_metric.items():
        items = sorted(items, key=lambda kp: kp[0] not in flagged_keys)  # flagged series are drawn first
        merged = plots.dedupe([Series(k.label_text, [index[p.run.path] for p in pts], [p.value for p in pts],
                                      [p.error for p in pts], meta=dict(k.labels)) for k, pts in items])
        series = merged[: len(charts.PALETTE)]
        marks = [(index[f.at.run.path], f"−{100 * f.rule.threshold:g}% ↓ {(f.at.run.commit or '')[:7]}")
                 for f in flags if f.key.metric == metric and f.at.run.path in index]
        more = f" ({len(series)} of {len(merged)} series)" if len(merged) > len(series) else ""
        figs.append(plots.Figure(f"{suite}: {metric}", charts.xy_chart(
            series, title=f"{suite}: {metric}{more}", x_label="commit (trend order)", y_label=unit, x_ticks=x_ticks,
            x_names=x_names, marks=sorted(set(marks)), width=560, height=280), metrics=[metric]))
    return figs


def target_page(name: str, rs: list[Run], rules: list, skipped: list | None = None) -> TargetPage:
    latest = max(rs, key=lambda r: (r.started, r.path.name))
    cache = {r.path: summary.headlines(r) for r in rs}
    regs = trends.regressions(rs, rules)
    flags = trends.flagged(regs)
    heads = cache[latest.path]
    page = TargetPage(name, rs, latest, summary.gates(latest), heads[0] if heads else None, regs, flags,
                      skipped=[(p.name, why) for p, why in skipped or []])
    for (model, corpus), grs in run_groups(rs):
        source = (grs[-1].run.get("corpus") or {}).get("source", "")
        figs = headline_trends(grs, flags, cache) + throughput_trends(grs, flags, rules)
        page.groups.append({"model": model, "corpus": corpus, "source": source, "runs": grs, "figures": figs})
    for f in flags:
        for r in (f.before.run, f.at.run):
            page.run_pages[r.stem] = f"runs/{r.stem}.html"
    return page


def build(results: str | pathlib.Path | None = None, out: str | pathlib.Path | None = None,
          kld_regress: float = 0.10, speed_regress: float = 0.05) -> list[pathlib.Path]:
    """Write the site for every target under ``results`` into ``out``; returns the pages written."""
    root = runs.results_dir(results)
    out = pathlib.Path(out) if out else render.REPORTS / "site"
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} is not empty and was not written by tq report: refusing to replace it")
    rules = trends.default_rules(kld_regress, speed_regress)
    scans = {n: runs.scan(root, n) for n in runs.targets(root)}
    scans = {n: sc for n, sc in scans.items() if sc[0]}
    if not scans:
        raise FileNotFoundError(f"no readable results files under {root}/<target>/ (run the suites first)")
    pages = [target_page(n, good, rules, bad) for n, (good, bad) in scans.items()]
    env = render.environment()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=".site-"))
    written = []
    try:
        def put(rel: str, html: str):
            written.append(render.write(tmp / rel, html))

        put("index.html", env.get_template("index.html.j2").render(
            targets=pages, rules=rules, results=root.name, headline_defs=summary.HEADLINES))
        for p in pages:
            put(f"{p.name}/index.html", env.get_template("target.html.j2").render(
                t=p, rules=rules, headline_defs=summary.HEADLINES))
            put(f"{p.name}/latest.html", render.page(p.latest, links={"← all targets": "../index.html",
                                                                      f"{p.name} trends": "index.html"}))
            for r in p.runs:
                if r.stem in p.run_pages:
                    put(f"{p.name}/{p.run_pages[r.stem]}", render.page(r, links={
                        "← all targets": "../../index.html", f"{p.name} trends": "../index.html"}))
        (tmp / MARKER).write_text("written by tq report (reports/site.py); replaced on every build\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / p.relative_to(tmp) for p in written]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=None, help="results folder (default: $TQ_RESULTS_DIR or reports/results)")
    p.add_argument("--out", default=None, help="site folder (default: reports/site)")
    p.add_argument("--kld-regress", type=float, default=0.10,
                   help="flag mean KLD up by more than this fraction vs the previous run (default 0.10)")
    p.add_argument("--speed-regress", type=float, default=0.05,
                   help="flag throughput down by more than this fraction vs the previous run (default 0.05)")


def run(args) -> int:
    """``tq report`` / ``python -m reports.site``: build, then list the pages and flagged regressions."""
    for name in ("kld_regress", "speed_regress"):
        if not 0 < getattr(args, name) < 10:
            raise ValueError(f"--{name.replace('_', '-')} must be a fraction > 0, got {getattr(args, name)}")
    pages = build(args.results, args.out, args.kld_regress, args.speed_regress)
    site = pages[0].parent
    print(f"tq report: {len(pages)} pages in {site}")
    for p in pages:
        print(f"  {p.relative_to(site)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.site", description="static site from the results folder")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"reports.site: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
