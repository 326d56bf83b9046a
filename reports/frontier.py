"""Quality per bit: one point per (method × config) a run's perplexity suite scored, per backend.

A point is a row of the headline table (``reports.summary``), so it was measured through the same
records under the same protocol: the perplexity columns come from the table's one protocol (tokens,
chunk, mode: decode semantics where the suite scored it so); sinks and window are in each config
label. x is the bits per channel the cache held (the headline's "bits" cell: bytes held while
scoring, codes + norms + sinks + window) at the measured context, and projected to 4k and 32k
tokens as ``summary.projected_bits`` does; y is the mean KLD or ΔPPL against the uncompressed
cache of the same run, ± one standard error where the suite recorded one.

The Pareto front: a point is on it when no other point has both ≤ bits and ≤ KLD with one strictly
less (two identical points are both on it). A TurboQuant point (a label without ``<method>:``) that
a point of another method dominates so is listed as "beaten by" that point, with how many standard
errors the KLD difference is.

Imports neither torch nor mlx; draws with ``reports.charts``.
"""

from __future__ import annotations

import math
import re
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field

from . import charts, fmt, metrics, summary
from .charts import Series
from .plots import Figure
from .runs import Run
from .tables import show

DEFAULT_METHOD = "turboquant"  # the method of a label without "<method>:" (tq_core.config's grammar)
# Display names; a method not listed shows its label prefix. Peers (tq_core.methods): other projects' caches.
METHOD_NAMES = {DEFAULT_METHOD: "TurboQuant", "quanto": "transformers quanto", "hqq": "transformers HQQ",
                "mlxkv": "mlx-lm QuantizedKVCache"}
FRONT_COLOR = "#777777"
# the table's value columns: (headline key, title); the bits titles get the measured context
COLUMNS = (("bits", "Bits held"), ("bits4k", "Bits at 4k (projected)"), ("bits32k", "Bits at 32k (projected)"),
           ("dppl", "ΔPPL"), ("kld", "Mean KLD"), ("top1", "Same top-1"))
_METHOD = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*):(.+)$")


def method_of(label) -> tuple[str, str]:
    """``uniform:K4V2+s4w128`` -> (``uniform``, ``K4V2+s4w128``); ``K4V2+s4w128`` -> (``turboquant``, same)."""
    m = _METHOD.match(str(label))
    return (m.group(1), m.group(2)) if m else (DEFAULT_METHOD, str(label))


def dominates(a: tuple, b: tuple) -> bool:
    """(x, y) ``a`` is at least as good as ``b`` in both (lower is better) and strictly better in one."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def front(xy: list[tuple]) -> list[bool | None]:
    """Per point (x, y), lower both better: on the Pareto front (no other point dominates it); None for
    a point without both values (it neither is on the front nor pushes others off it)."""
    ok = [_ok(x) and _ok(y) for x, y in xy]
    return [None if not ok[i] else not any(ok[j] and j != i and dominates(xy[j], p) for j in range(len(xy)))
            for i, p in enumerate(xy)]


@dataclass
class Beat:
    by: "Point"
    text: str


@dataclass
class Point:
    config: str  # the label as recorded
    method: str
    name: str  # the label without its method prefix
    backend: str | None
    cells: dict  # headline key -> summary.Cell | None
    front: bool = False  # (bits held at the measured context, mean KLD)
    front32k: bool | None = None  # (bits projected to 32k tokens, mean KLD measured at the measured context)
    beaten_by: list = field(default_factory=list)  # [Beat]: another method's points that dominate this one

    @property
    def turboquant(self) -> bool:
        return self.method == DEFAULT_METHOD

    def v(self, key: str):
        c = self.cells.get(key)
        return None if c is None else c.value

    def e(self, key: str):
        c = self.cells.get(key)
        return None if c is None else c.error


@dataclass
class Frontier:
    backend: str | None
    model: str | None
    points: list  # [Point], sorted by bits held at the measured context, then KLD
    facts: list = field(default_factory=list)  # [(name, value)] stated once above the plots
    tokens: object = None  # the measured context (tokens scored)
    columns: list = field(default_factory=list)  # [(key, title)] with a value in some point
    vias: dict = field(default_factory=dict)  # key -> the most common measured-through line
    baselines: dict = field(default_factory=dict)
    meanings: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)
    left_out: list = field(default_factory=list)  # ["config: why"] configs the suite scored, not plotted
    others: bool = False  # a method other than TurboQuant has a point

    @property
    def has32k(self) -> bool:
        return any(p.front32k is not None for p in self.points)

    @property
    def title(self) -> str:
        return " · ".join(str(v) for v in (self.model, self.backend) if v) or "this run"


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _beat_text(q: Point, p: Point) -> str:
    """Why ``q`` beats TurboQuant point ``p``: both coordinates, and the KLD gap in standard errors."""
    qe, pe = q.e("kld"), p.e("kld")
    gap = p.v("kld") - q.v("kld")
    se = math.hypot(qe or 0.0, pe or 0.0)
    if gap == 0:
        sig = "equal KLD"
    elif se > 0 and qe is not None and pe is not None:
        sig = f"KLD lower by {gap / se:.1f} SE"
    else:
        sig = "KLD lower (no SE recorded for both)"
    return (f"{q.config}: {fmt.num(q.v('bits'))} vs {fmt.num(p.v('bits'))} bit, KLD {fmt.pm(q.v('kld'), qe)} "
            f"vs {fmt.pm(p.v('kld'), pe)} ({sig})")


def points_of(rows: list[dict]) -> tuple[list[Point], list[str]]:
    """Points from headline rows (one backend), and the configs the perplexity suite scored that are not
    points, with why."""
    pts, left = [], []
    for row in rows:
        if metrics.is_baseline_config(row["config"]):
            continue
        c = row["cells"]
        if c.get("bits") is None or c.get("kld") is None:
            scored = row.get("note") or any(c.get(k) for k in ("dppl", "kld", "top1"))
            if scored:
                why = row.get("note") or ("no bits-held record" if c.get("bits") is None else "no mean KLD record")
                left.append(f"{row['config']}: {why}")
            continue
        method, name = method_of(row["config"])
        pts.append(Point(str(row["config"]), method, name, row.get("backend"),
                         {k: c.get(k) for k, _ in COLUMNS}))
    pts.sort(key=lambda p: (p.v("bits"), p.v("kld")))
    for p, on in zip(pts, front([(p.v("bits"), p.v("kld")) for p in pts])):
        p.front = bool(on)
    if any(p.v("bits32k") is not None for p in pts):
        for p, on in zip(pts, front([(p.v("bits32k"), p.v("kld")) for p in pts])):
            p.front32k = on
    for p in pts:
        if p.turboquant:
            p.beaten_by = [Beat(q, _beat_text(q, p)) for q in pts if not q.turboquant and
                           dominates((q.v("bits"), q.v("kld")), (p.v("bits"), p.v("kld")))]
    return pts, left


def protocol(rec: dict) -> tuple:
    """(tokens, chunk, mode) of a record, as text: what the perplexity columns of one table share."""
    return tuple(show(rec.get(k)) for k in summary.PROTOCOL)


def _common(texts: list[str]) -> str:
    return max(dict.fromkeys(texts), key=texts.count) if texts else fmt.DASH


def _staircase(pts: list[tuple]) -> tuple[list, list]:
    """The front's points (sorted by x) joined as the boundary of what they attain: across, then down."""
    xs, ys = [], []
    for i, (x, y) in enumerate(sorted(pts)):
        if i:
            xs.append(x), ys.append(ys[-1])
        xs.append(x), ys.append(y)
    return xs, ys


def chart(points: list[Point], xkey: str, ykey: str, *, title: str, x_label: str, y_label: str,
          front_name: str) -> tuple[str, bool]:
    """One panel: a series per method (TurboQuant circles, others other shapes and colours), points
    labelled with their config, ± SE bars, the Pareto front of (x, y) dashed. Log y unless a value is
    ≤ 0 (then linear with a line at 0; ``y_label`` gets " (log)" when log). Returns (svg, log_y)."""
    drawn = [p for p in points if _ok(p.v(xkey)) and _ok(p.v(ykey))]
    log_y = all(p.v(ykey) > 0 for p in drawn)
    methods = sorted({p.method for p in drawn}, key=lambda m: (m != DEFAULT_METHOD, m))
    series = []
    for i, m in enumerate(methods):
        mine = [p for p in drawn if p.method == m]
        err = [p.e(ykey) for p in mine]
        series.append(Series(method_name(m), [p.v(xkey) for p in mine], [p.v(ykey) for p in mine],
                             err=err if any(e for e in err) else None, line=False,
                             color=charts.PALETTE[i % len(charts.PALETTE)],
                             shape=charts.SHAPES[i % len(charts.SHAPES)], labels=[p.config for p in mine]))
    on = [(p.v(xkey), p.v(ykey)) for p, f in zip(drawn, front([(p.v(xkey), p.v(ykey)) for p in drawn])) if f]
    if len(on) > 1:
        xs, ys = _staircase(on)
        series.append(Series(front_name, xs, ys, dash="5 3", color=FRONT_COLOR, marker=False))
    svg = charts.xy_chart(series, title=title, x_label=x_label, y_label=y_label + (" (log)" if log_y else ""),
                          log_y=log_y,
                          hline=None if log_y else 0.0, width=540, height=360)
    return svg, log_y


def figures(points: list[Point], through: list, tokens) -> list[Figure]:
    """KLD and ΔPPL against the bits held at the measured context; KLD against the bits projected to 32k."""
    at = f"{fmt.num(tokens)} tokens" if tokens is not None else "the measured context"
    x_label = f"bits per channel held at {at} (codes, norms, sinks, window)"
    common = ("One point per config; labels are the config labels (sinks and window in +s…w…). "
              "Bars: ± one standard error over the scored tokens. Dashed: the Pareto front — no other point "
              "has both fewer bits and a lower {y}.")
    figs = []
    for ykey, what, unit, y_short in (("kld", "Mean KLD", "nats", "mean KLD"), ("dppl", "ΔPPL", "%", "ΔPPL")):
        if not any(_ok(p.v(ykey)) for p in points):
            figs.append(Figure(f"{what} vs bits held", None, note=f"Plot omitted: no {y_short} record under "
                                                                  "this protocol."))
            continue
        title = f"{what} vs bits held"
        svg, log_y = chart(points, "bits", ykey, title=title, x_label=x_label, y_label=f"{what} [{unit}]",
                           front_name=f"Pareto front (bits, {y_short})")
        scale = "Log y." if log_y else f"Linear y: a {y_short} ≤ 0 cannot be drawn on a log axis."
        figs.append(Figure(title, svg, common.format(y=y_short) + " " + scale, through=through,
                           metrics=_metric_names(points, ("bits", ykey))))
    if any(_ok(p.v("bits32k")) for p in points):
        title = "Mean KLD vs bits held at 32k tokens (projected)"
        svg, log_y = chart(points, "bits32k", "kld", title=title,
                           x_label="bits per channel held at 32,768 tokens, projected (sinks and window amortized)",
                           y_label="Mean KLD [nats]",
                           front_name="Pareto front (bits at 32k, mean KLD)")
        figs.append(Figure(title, svg, "x: the bytes held per part at the measured context projected to 32k tokens "
                                       "(sinks and window fixed, codes and norms per encoded token); y: the KLD "
                                       f"measured at {at}, not at 32k. " + common.format(y="mean KLD"),
                           through=through, metrics=_metric_names(points, ("kld",))))
    return figs


def _metric_names(points: list[Point], keys: tuple) -> list[str]:
    cells = [p.cells.get(k) for p in points for k in keys]
    return [m for m in dict.fromkeys(c.metric for c in cells if c is not None) if m]


def of(run: Run, head: summary.HeadlineTable | None = None) -> list[Frontier]:
    """One frontier per backend of ``run`` that has a point, in the order of the headline table's rows;
    ``head``: the run's headline table, when already built (``summary.table``)."""
    head = head if head is not None else summary.table(run)
    by_backend: dict = {}
    for row in head.rows:
        by_backend.setdefault(row.get("backend"), []).append(row)
    out = []
    for backend, rows in by_backend.items():
        pts, left = points_of(rows)
        if not pts:
            continue
        f = Frontier(backend, run.model, pts, left_out=left, others=any(not p.turboquant for p in pts))
        recs = [c.rec for p in pts if (c := p.cells["kld"]) is not None and c.rec is not None]
        protos = Counter(protocol(r) for r in recs)
        proto = protos.most_common(1)[0][0] if protos else ()
        f.tokens = next((r.get("tokens") for r in recs if protocol(r) == proto), None)
        f.facts = [(k, v) for k, v in head.facts if k != "perplexity"] + \
            [("backend", backend), ("perplexity", summary.protocol_text(proto) or None),
             ("sinks, window", "from each config label (+s<sinks>w<window>)")]
        f.facts = [(k, v) for k, v in f.facts if v]
        for key, title in COLUMNS:
            cells = [c for p in pts if (c := p.cells.get(key))]
            if not cells:
                continue
            if key == "bits" and f.tokens is not None:
                title = f"{title} at {fmt.num(f.tokens)} tokens (measured)"
            f.columns.append((key, title))
            f.vias[key] = _common([c.via for c in cells])
            f.baselines[key] = "; ".join(dict.fromkeys(c.baseline + ("" if c.baseline_labelled else " †")
                                                       for c in cells))
            names = dict.fromkeys(c.metric for c in cells)
            f.meanings[key] = "; ".join(f"{m}: {metrics.meaning(m)}" if m else summary.MEANINGS.get(key, "")
                                        for m in names)
        through = [(k, str(v)) for k, v in (("backend", backend),) if v] + \
            [(k, v) for k, v in zip(summary.PROTOCOL, proto) if v != fmt.DASH]
        f.figures = figures(pts, through, f.tokens)
        out.append(f)
    return out


def build(run: Run, head: summary.HeadlineTable | None = None) -> tuple[list[Frontier], str]:
    """``of``, for a page: a failure on unexpected records costs this section (said), not the page."""
    try:
        return of(run, head), ""
    except Exception as e:  # noqa: BLE001 - the report must render whatever the records are
        traceback.print_exc(file=sys.stderr)
        return [], f"The quality-per-bit frontier failed on these records ({type(e).__name__}: {e})."
