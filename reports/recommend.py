"""Recommended configs: per model, backend and method, the fewest bits held that meet a quality bar.

    python -m reports.recommend RESULTS.json [...]      # a Markdown table on stdout
    python -m reports.recommend --all RESULTS.json      # every point (config, bits, ΔPPL, KLD, top-1, front)

The points are the quality-per-bit frontier's (``reports.frontier``: the perplexity suite's headline
rows, decode semantics where the run scored it so, against the uncompressed cache of the same run).
A config qualifies when its mean ΔPPL is at most ``DPPL_MAX`` percent and its mean KLD at most
``KLD_MAX`` nats (the measured means; their standard errors are shown beside them); the row gives,
for each method, the qualifying config with the fewest bits held at the measured context (ties: the
lower KLD), or says that none of the configs the run measured qualifies and which came closest.

Imports neither torch nor mlx.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from . import fmt, frontier, runs

DPPL_MAX = 1.0  # percent
KLD_MAX = 0.01  # nats


@dataclass
class Pick:
    model: str | None
    backend: str | None
    method: str
    point: frontier.Point | None  # the qualifying config with the fewest bits, or None
    closest: frontier.Point | None  # without one: the config with the lowest KLD
    tokens: object = None  # the measured context


def qualifies(p: frontier.Point, dppl_max: float = DPPL_MAX, kld_max: float = KLD_MAX) -> bool:
    dppl, kld = p.v("dppl"), p.v("kld")
    return dppl is not None and kld is not None and dppl <= dppl_max and kld <= kld_max


def picks(run: runs.Run, dppl_max: float = DPPL_MAX, kld_max: float = KLD_MAX) -> list[Pick]:
    """One pick per (backend, method) of ``run``'s frontier points, methods in the order they appear
    (TurboQuant first when present)."""
    out = []
    for f in frontier.of(run):
        methods = sorted(dict.fromkeys(p.method for p in f.points), key=lambda m: m != frontier.DEFAULT_METHOD)
        for m in methods:
            pts = [p for p in f.points if p.method == m]
            good = sorted((p for p in pts if qualifies(p, dppl_max, kld_max)), key=lambda p: (p.v("bits"), p.v("kld")))
            closest = min(pts, key=lambda p: p.v("kld"))
            out.append(Pick(run.model, f.backend, m, good[0] if good else None, None if good else closest, f.tokens))
    return out


def _cell(p: frontier.Point, key: str, unit: str = "") -> str:
    return fmt.pm(p.v(key), p.e(key)) + unit if p.v(key) is not None else fmt.DASH


def markdown(all_picks: list[Pick], dppl_max: float = DPPL_MAX, kld_max: float = KLD_MAX) -> str:
    lines = [f"| model | backend | method | fewest bits with ΔPPL ≤ {fmt.num(dppl_max)} % and KLD ≤ {fmt.num(kld_max)} "
             f"| bits held | ΔPPL | mean KLD | same top-1 |", "|---|---|---|---|---|---|---|---|"]
    for k in all_picks:
        name = frontier.method_name(k.method)
        p = k.point or k.closest
        config = k.point.config if k.point else f"none measured (closest: {k.closest.config})"
        lines.append(f"| {k.model or fmt.DASH} | {k.backend or fmt.DASH} | {name} | {config} | {fmt.num(p.v('bits'))} "
                     f"| {_cell(p, 'dppl', ' %')} | {_cell(p, 'kld')} | {_cell(p, 'top1', ' %')} |")
    return "\n".join(lines)


def points_markdown(run: runs.Run) -> str:
    """Every frontier point of ``run``: model, backend, config, bits held, ΔPPL, KLD, same top-1, and
    whether it meets the bar and is on the Pareto front (bits held, KLD)."""
    lines = ["| model | backend | config | bits held | ΔPPL | mean KLD | same top-1 | on the front |",
             "|---|---|---|---|---|---|---|---|"]
    for f in frontier.of(run):
        for p in f.points:
            lines.append(f"| {run.model or fmt.DASH} | {f.backend or fmt.DASH} | {p.config} | {fmt.num(p.v('bits'))} "
                         f"| {_cell(p, 'dppl', ' %')} | {_cell(p, 'kld')} | {_cell(p, 'top1', ' %')} "
                         f"| {'yes' if p.front else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reports.recommend", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results files (reports/results/<target>/*.json)")
    ap.add_argument("--dppl-max", type=float, default=DPPL_MAX, help=f"ΔPPL bar in percent (default {DPPL_MAX})")
    ap.add_argument("--kld-max", type=float, default=KLD_MAX, help=f"mean KLD bar in nats (default {KLD_MAX})")
    ap.add_argument("--all", action="store_true", help="every point of the runs instead (the frontier's table)")
    args = ap.parse_args(argv)
    try:
        loaded = [runs.load(path) for path in args.results]
        if args.all:
            print("\n".join(points_markdown(r) if i == 0 else points_markdown(r).split("\n", 2)[2]
                            for i, r in enumerate(loaded)))
            return 0
        all_picks = [k for r in loaded for k in picks(r, args.dppl_max, args.kld_max)]
    except (OSError, ValueError) as e:
        print(f"reports.recommend: error: {e}", file=sys.stderr)
        return 2
    print(markdown(all_picks, args.dppl_max, args.kld_max))
    return 0


if __name__ == "__main__":
    sys.exit(main())
