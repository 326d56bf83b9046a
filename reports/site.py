"""The nightly site: a pure function of the results folder -> static HTML pages.

    tq report [--results DIR] [--out DIR] [--kld-regress 0.10] [--speed-regress 0.05]
    python -m reports.site [same options] [--dppl-regress 0.5] [--noise-k 3] [--se-k 2]

Pages (all self-contained, relative links only):
    index.html                  every target: its headline (the latest complete run), runs newer than it
                                (partial or incomplete, said as such), flagged regressions
    <target>/index.html         the headline table per config, regressions judged against the noise, trends
                                (one line per series: protocol, device and weights in the key), run history
    <target>/latest.html        the full report of the target's latest *complete* run (none when no run is)
    <target>/runs/<file>.html   the full report of every run (a permanent link)

Which run is complete: ``reports.coverage``; series keys and the noise model: ``reports.trends``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from . import charts, coverage, fmt, frontier, plots, render, runs, summary, trends
from .charts import Series
from .runs import Run

MARKER = ".tq-site"  # a folder holding this file was written by build() and may be replaced by it
MAX_TICKS = 14
INDEX_KEYS = ("bits", "bits32k", "saved", "dppl", "kld", "top1", "needle", "speed")  # headline columns on the index


@dataclass
class TargetPage:
    name: str
    runs: list[Run]  # trend order
    latest: Run | None  # the latest complete run: the target's headline and latest.html (None: no complete run)
    gates: dict | None  # of ``latest``
    headline: dict | None  # the first row of ``head`` (the index shows it)
    regressions: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    groups: list = field(default_factory=list)  # [{"model", "corpus", "source", "runs", "figures"}]
    run_pages: dict = field(default_factory=dict)  # stem -> relative href from the target folder
    skipped: list = field(default_factory=list)  # [(file, why)] results files that could not be read
    head: summary.HeadlineTable | None = None
    newest: Run | None = None  # the run that started last, whatever it covered
    coverage: dict = field(default_factory=dict)  # path -> coverage.Coverage
    newer: list = field(default_factory=list)  # runs started after ``latest`` (partial or incomplete)
    speed_from: list = field(default_factory=list)  # speed runs of the headline's commit feeding its speed column
    frontiers: list = field(default_factory=list)  # frontier.Frontier per backend of the headline run
    frontier_error: str = ""  # why the frontier is missing, when it failed on the records

    @property
    def unconfirmed(self) -> list:
        return [r for r in self.regressions if not r.confirmed]

    @property
    def confirmed(self) -> list:
        return [r for r in self.regressions if r.confirmed]


def run_groups(rs: list[Run]) -> list[tuple[tuple, list[Run]]]:
    """Runs split by (model, corpus sha256), the latest run's group first: sections of the trend page."""
    out: dict[tuple, list[Run]] = {}
    for r in rs:
        out.setdefault((r.model, r.corpus_sha), []).append(r)
    latest = coverage.latest(rs)
    return sorted(out.items(), key=lambda kv: kv[0] != (latest.model, latest.corpus_sha))


def ticks(rs: list[Run]) -> tuple[list, dict]:
    step = max(1, -(-len(rs) // MAX_TICKS))
    names = {i: f"{fmt.short_commit(r.commit, r.dirty)} · {fmt.date(r.started)}" for i, r in enumerate(rs)}
    return [(i, (r.commit or "none")[:7]) for i, r in enumerate(rs) if i % step == 0 or i == len(rs) - 1], names


def _as_record(rec: dict) -> dict:
    """A flat headline record (labels merged) back in the results file's shape."""
    return {**{k: rec.get(k) for k in summary.CORE},
            "labels": {k: v for k, v in rec.items() if k not in summary.CORE}}


def cell_key(run: Run, key: str, cell) -> trends.Key:
    """The series of a headline cell: its record's series (model, weights, corpus, device, tier and
    every input label), named after the headline column (a projection or a computed share has its own)."""
    k = trends.key_of(run, _as_record(cell.rec))
    return dataclasses.replace(k, metric=f"headline:{key}")


def _marks(flags: list, rs: list[Run], pred) -> list:
    index = {r.path: i for i, r in enumerate(rs)}
    return sorted({(index[f.at.run.path], f"{f.rule.name} {f.change_text} at {(f.at.run.commit or '')[:7]}")
                   for f in flags if f.at.run.path in index and pred(f)})


def headline_trends(rs: list[Run], flags: list, cache: dict) -> list:
    """One chart per headline column: one line per series (config, backend and the protocol: tier,
    tokens, chunk, ..., device, weights): points measured differently never share a line; the
    legend names what tells the lines apart."""
    figs = []
    x_ticks, x_names = ticks(rs)
    for h in summary.HEADLINES:
        pts: dict[trends.Key, list] = {}
        units = []
        for i, r in enumerate(rs):
            for row in cache[r.path]:
                c = row["cells"][h.key]
                if c is None or c.rec is None:
                    continue
                pts.setdefault(cell_key(r, h.key, c), []).append((i, c))
                units.append(c.unit)
        if not pts:
            continue
        names = trends.differing(list(pts))
        series = [Series(names[k], [i for i, _ in v], [c.value for _, c in v], [c.error for _, c in v],
                         meta=k.fields()) for k, v in pts.items()]
        shown = series[: len(charts.PALETTE)]
        more = f" ({len(shown)} of {len(series)} series)" if len(series) > len(shown) else ""
        unit = units[0] if units else ""
        metric_names = [m for m in dict.fromkeys(c.metric for v in pts.values() for _, c in v) if m]
        marks = _marks(flags, rs, lambda f: f.rule.metric is not None and f.rule.metric in metric_names
                       and f.key.label("config") in {k.label("config") for k in pts})
        figs.append(plots.Figure(h.title, charts.xy_chart(
            shown, title=h.title + more, x_label="run (trend order: commit time, then start)",
            y_label=f"{h.title} [{unit}]" if unit else h.title, x_ticks=x_ticks, x_names=x_names, marks=marks,
            width=560, height=280),
            "One line per series: runs that measured under another protocol (tier, tokens, chunk, mode, device, "
            "weights) are another line, never joined." + ("" if metric_names else " " + summary.MEANINGS.get(
                h.key, "")), metrics=metric_names))
    return figs


def throughput_trends(rs: list[Run], flags: list, rules: list) -> list:
    """One chart per throughput metric and unit: a line per series, across the runs of one group."""
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
        names = trends.differing([k for k, _ in items], always=())
        merged = plots.dedupe([Series(names[k], [index[p.run.path] for p in pts], [p.value for p in pts],
                                      [p.error for p in pts], meta=k.fields()) for k, pts in items])
        series = merged[: len(charts.PALETTE)]
        marks = _marks(flags, rs, lambda f: f.key.metric == metric)
        more = f" ({len(series)} of {len(merged)} series)" if len(merged) > len(series) else ""
        figs.append(plots.Figure(f"{suite}: {metric}", charts.xy_chart(
            series, title=f"{suite}: {metric}{more}", x_label="run (trend order: commit time, then start)",
            y_label=unit, x_ticks=x_ticks, x_names=x_names, marks=marks, width=560, height=280), metrics=[metric]))
    return figs


def target_page(name: str, rs: list[Run], rules: list, skipped: list | None = None,
                noise: trends.Noise | None = None) -> TargetPage:
    cov = {r.path: coverage.of(r) for r in rs}
    head_run = coverage.headline_run(rs)
    newest = coverage.latest(rs)
    speed_from = [r for r in coverage.speed_runs(rs, head_run.commit) if r is not head_run] if head_run else []
    cache = {r.path: summary.headlines(r) for r in rs}
    regs = trends.regressions(rs, rules, noise)
    flags = trends.flagged(regs)
    head = summary.table(head_run, speed_from) if head_run else None
    page = TargetPage(name, rs, head_run, summary.gates(head_run) if head_run else None,
                      head.rows[0] if head else None, regs, flags, skipped=[(p.name, why) for p, why in skipped or []],
                      head=head, newest=newest, coverage=cov, speed_from=speed_from,
                      newer=[r for r in rs if head_run is None or (r.started, r.path.name) > (head_run.started,
                                                                                                 head_run.path.name)])
    page.newer.sort(key=lambda r: (r.started, r.path.name), reverse=True)
    if head_run is not None:
        page.frontiers, page.frontier_error = frontier.build(head_run, head)
    for (model, corpus), grs in run_groups(rs):
        source = (grs[-1].run.get("corpus") or {}).get("source", "")
        figs = headline_trends(grs, flags, cache) + throughput_trends(grs, flags, rules)
        page.groups.append({"model": model, "corpus": corpus, "source": source, "runs": grs, "figures": figs})
    for r in rs:
        page.run_pages[r.stem] = f"runs/{r.stem}.html"  # a permanent link; latest.html is the headline run's copy
    return page


def build(results: str | pathlib.Path | None = None, out: str | pathlib.Path | None = None,
          kld_regress: float = 0.10, speed_regress: float = 0.05, dppl_regress: float = 0.5,
          noise: trends.Noise | None = None) -> list[pathlib.Path]:
    """Write the site for every target under ``results`` into ``out``; returns the pages written."""
    root = runs.results_dir(results)
    out = pathlib.Path(out) if out else render.REPORTS / "site"
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} is not empty and was not written by tq report: refusing to replace it")
    rules = trends.default_rules(kld_regress, speed_regress, dppl_regress)
    noise = noise or trends.Noise()
    scans = {n: runs.scan(root, n) for n in runs.targets(root)}
    scans = {n: sc for n, sc in scans.items() if sc[0]}
    if not scans:
        raise FileNotFoundError(f"no readable results files under {root}/<target>/ (run the suites first)")
    pages = [target_page(n, good, rules, bad, noise) for n, (good, bad) in scans.items()]
    env = render.environment()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=".site-"))
    written = []
    try:
        def put(rel: str, html: str):
            written.append(render.write(tmp / rel, html))

        put("index.html", env.get_template("index.html.j2").render(
            targets=pages, rules=rules, noise=noise, results=root.name, headline_defs=summary.HEADLINES,
            index_keys=INDEX_KEYS))
        for p in pages:
            put(f"{p.name}/index.html", env.get_template("target.html.j2").render(
                t=p, rules=rules, noise=noise, headline_defs=summary.HEADLINES))
            if p.latest is not None:
                put(f"{p.name}/latest.html", render.page(p.latest, links={"← all targets": "../index.html",
                                                                          f"{p.name} trends": "index.html"},
                                                         speed_from=p.speed_from))
            for r in p.runs:
                put(f"{p.name}/{p.run_pages[r.stem]}", render.page(r, links={
                    "← all targets": "../../index.html", f"{p.name} trends": "../index.html"},
                    speed_from=p.speed_from if r is p.latest else None))
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
                   help="minimum effect: mean KLD up by more than this fraction of its reference (default 0.10)")
    p.add_argument("--speed-regress", type=float, default=0.05,
                   help="minimum effect: throughput down by more than this fraction (default 0.05)")
    p.add_argument("--dppl-regress", type=float, default=0.5,
                   help="minimum effect: ΔPPL up by more than this many percentage points (default 0.5)")
    p.add_argument("--noise-k", type=float, default=3.0,
                   help="flag only beyond this many sd of the runs' scatter or the timed rounds' spread (default 3)")
    p.add_argument("--se-k", type=float, default=2.0,
                   help="flag only beyond this many recorded standard errors (default 2)")


def run(args) -> int:
    """``tq report`` / ``python -m reports.site``: build, then list the pages and flagged regressions."""
    for name in ("kld_regress", "speed_regress"):
        if not 0 < getattr(args, name) < 10:
            raise ValueError(f"--{name.replace('_', '-')} must be a fraction > 0, got {getattr(args, name)}")
    noise = trends.Noise(k=getattr(args, "noise_k", None) or 3.0, k_se=getattr(args, "se_k", None) or 2.0)
    pages = build(args.results, args.out, args.kld_regress, args.speed_regress,
                  getattr(args, "dppl_regress", None) or 0.5, noise)
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
