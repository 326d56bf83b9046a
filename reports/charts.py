"""Inline SVG charts with no dependencies: xy (lines, points, error bars, log axes), bars, heat maps.

Every function returns one ``<svg>`` element as a string; all text in it is escaped here, so the
result can be inserted into an autoescaped template with ``|safe``. Hovering a point, bar or cell
shows its exact value (an SVG ``<title>``, no script).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from . import fmt

PALETTE = ["#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#7F3C8D", "#555555",
           "#B8860B", "#2F4F4F"]
# viridis, five stops: perceptually uniform and readable in grey
HEAT = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
CHAR_W = 6.1  # average glyph width of 11 px sans text, for layout estimates


def label_width(labels: list[str], cap: float) -> float:
    """Room for right-aligned row labels (generous: capitals and digits are wider than average)."""
    return min(cap, max([6.9 * len(s) for s in labels] + [30]) + 16)


def esc(s) -> str:
    return html.escape(str(s), quote=True)


@dataclass
class Series:
    """One line/point set. ``err`` are ± half-widths; ``labels`` annotate points; ``shape``: the point
    marker, one of ``SHAPES`` (circle unless said), so series differ by more than colour."""

    name: str
    x: list
    y: list
    err: list | None = None
    dash: str | None = None
    marker: bool = True
    line: bool = True
    color: str | None = None
    labels: list | None = None
    meta: dict | None = None  # the labels the series was selected by (for merging and naming)
    shape: str = "circle"


SHAPES = ("circle", "square", "triangle", "diamond")


def marker(shape: str, x: float, y: float, color: str, r: float = 3.2, tip: str | None = None) -> str:
    """One point marker centred on (x, y): a circle, square, triangle or diamond of about radius ``r``."""
    title = f"<title>{esc(tip)}</title>" if tip is not None else ""
    style = f'fill="{color}" stroke="#fff" stroke-width="0.8"'
    if shape == "square":
        a = r * 0.9
        return f'<rect x="{x - a:.1f}" y="{y - a:.1f}" width="{2 * a:.1f}" height="{2 * a:.1f}" {style}>{title}</rect>'
    if shape in ("triangle", "diamond"):
        a = r * 1.3
        pts = ([(x, y - a), (x + a, y + a * 0.75), (x - a, y + a * 0.75)] if shape == "triangle" else
               [(x, y - a), (x + a, y), (x, y + a), (x - a, y)])
        d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        return f'<polygon points="{d}" {style}>{title}</polygon>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {style}>{title}</circle>'


# ---- scales ------------------------------------------------------------------------------------
def nice_step(span: float, n: int = 5) -> float:
    raw = span / max(n, 1)
    base = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= base * m:
            return base * m
    return base * 10


def linear_ticks(lo: float, hi: float, n: int = 5) -> tuple[float, float, list[float]]:
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, n)
    a, b = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [a + i * step for i in range(int(round((b - a) / step)) + 1)]
    return a, b, [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    if a == b:
        a, b = a - 1, b + 1 if hi / lo > 3 else b
    ticks = [10.0 ** e for e in range(a, b + 1)]
    if b - a <= 2:
        ticks = sorted({t * m for t in ticks for m in (1, 2, 5) if 10.0 ** a <= t * m <= 10.0 ** b})
    return 10.0 ** a, 10.0 ** b, ticks


class Axis:
    def __init__(self, values: list[float], log: bool, p0: float, p1: float, ticks=None, pad=0.0):
        self.log = log
        vals = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
        if not vals:
            vals = [1.0]
        lo, hi = min(vals), max(vals)
        if ticks is not None:  # explicit ticks: the domain is the data, padded
            self.ticks = ticks
            lo, hi = min([lo] + [t for t, _ in ticks]), max([hi] + [t for t, _ in ticks])
            if log:
                span = math.log10(hi / lo) or 1.0
                self.lo, self.hi = lo / 10 ** (span * 0.06), hi * 10 ** (span * 0.06)
            else:
                span = (hi - lo) or abs(hi) or 1.0
                self.lo, self.hi = lo - span * 0.06, hi + span * 0.06
        elif log:
            self.lo, self.hi, t = log_ticks(lo, hi)
            self.ticks = [(v, tick_label(v, True)) for v in t]
        else:
            if pad:
                span = (hi - lo) or abs(hi) or 1.0
                lo, hi = lo - span * pad, hi + span * pad
            self.lo, self.hi, t = linear_ticks(lo, hi)
            self.ticks = [(v, tick_label(v, False)) for v in t]
        self.p0, self.p1 = p0, p1

    def __call__(self, v: float) -> float:
        if self.log:
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / ((self.hi - self.lo) or 1.0)
        return self.p0 + f * (self.p1 - self.p0)

    def ok(self, v) -> bool:
        return v is not None and math.isfinite(v) and (v > 0 or not self.log)


def tick_label(v: float, log: bool) -> str:
    if v == 0:
        return "0"
    if log and (abs(v) < 1e-2 or abs(v) >= 1e5):
        e = math.floor(math.log10(abs(v)) + 1e-9)
        m = v / 10 ** e
        return f"1e{e}" if abs(m - 1) < 1e-9 else f"{m:g}e{e}"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:.6g}"


# ---- pieces ------------------------------------------------------------------------------------
def _svg_open(width: float, height: float, title: str) -> str:
    return (f'<svg class="chart" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(title)}" '
            f'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif" font-size="11">'
            f'<title>{esc(title)}</title>')


def _legend(items: list[tuple], x0: float, y0: float, width: float) -> tuple[str, float]:
    """Legend rows (name, color, dash[, shape, line]) flowing left to right from (x0, y0); returns (svg,
    height). ``shape`` (default circle) is the series' marker, None for none; ``line`` False: no line.

    A name too long for one row is cut with an ellipsis; the full name is its tooltip.
    """
    out, x, y = [], x0, y0
    max_chars = int((width - 44) / CHAR_W)
    for name, color, dash, *rest in items:
        shape, line = (rest + ["circle", True][len(rest):])[:2]
        shown = name if len(name) <= max_chars else name[: max_chars - 1] + "…"
        w = 30 + CHAR_W * len(shown) + 14
        if x > x0 and x + w > x0 + width:
            x, y = x0, y + 16
        d = f' stroke-dasharray="{dash}"' if dash else ""
        stroke = (f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 22:.1f}" y2="{y:.1f}" stroke="{color}" '
                  f'stroke-width="2"{d}/>') if line else ""
        if shape == "circle":
            dot = f'<circle cx="{x + 11:.1f}" cy="{y:.1f}" r="2.6" fill="{color}"/>'
        else:
            dot = marker(shape, x + 11, y, color, 3.4) if shape else ""
        out.append(f'<g><title>{esc(name)}</title>{stroke}{dot}'
                   f'<text x="{x + 28:.1f}" y="{y + 3.8:.1f}" fill="#222">{esc(shown)}</text></g>')
        x += w
    return "".join(out), (y - y0 + 16 if items else 0)


def _legend_height(names: list[str], width: float) -> float:
    _, h = _legend([(n, "#000", None) for n in names], 0, 0, width)
    return h


def _place_label(text: str, px: float, py: float, x_max: float, y_max: float, placed: list) -> tuple:
    """Where a point's label goes: right of the point and above it (left of it near the right edge);
    where that overlaps a label already placed, below it, then on the other side. Returns (x, y,
    anchored at its end) and adds the label's box to ``placed``."""
    right_edge = px + 8 + 5.6 * len(text) > x_max
    w, h = 6.2 * len(text), 10.0  # generous: labels are mostly capitals and digits
    sides = (not right_edge, right_edge)
    options = [(side, dy) for side in sides for dy in (-5.0, 12.0) if py + dy <= y_max]
    options = options or [(not right_edge, -5.0)]

    def box(side, dy):
        x0 = px + 5 if side else px - 5 - w
        return x0, py + dy - h + 2, x0 + w, py + dy + 2

    def free(b):
        return all(b[2] <= o[0] or b[0] >= o[2] or b[3] <= o[1] or b[1] >= o[3] for o in placed)

    side, dy = next((o for o in options if free(box(*o))), options[0])
    placed.append(box(side, dy))
    return (px + 5 if side else px - 5), py + dy, not side


# ---- charts ------------------------------------------------------------------------------------
def xy_chart(series: list[Series], *, title: str, x_label: str, y_label: str, log_x: bool = False,
             log_y: bool = False, x_ticks: list | None = None, hline: float | None = None,
             marks: list | None = None, x_names: dict | None = None, width: int = 560, height: int = 320) -> str:
    """Lines/points with optional error bars; log axes drop non-positive values.

    ``marks``: (x, text) vertical markers (e.g. a flagged regression); ``x_names``: x -> name in tooltips.
    """
    left, right, top = 66, 18, 30
    names = [s.name for s in series]
    leg_h = 0 if names == ["all"] else _legend_height(names, width - left - right)
    bottom = 44 + leg_h + 6
    total_h = height + leg_h + 6
    pw, ph = width - left - right, total_h - top - bottom
    xs = [v for s in series for v in s.x]
    ys = [v for s in series for i, v in enumerate(s.y) if v is not None
          for v in ([v] + ([v - s.err[i], v + s.err[i]] if s.err and s.err[i] else []))]
    if hline is not None:
        ys.append(hline)
    ax = Axis(xs, log_x, left, left + pw, ticks=x_ticks, pad=0.04)
    ay = Axis(ys, log_y, top + ph, top, pad=0.04)
    out = [_svg_open(width, total_h, title),
           f'<text x="{left}" y="18" font-size="13" font-weight="600" fill="#111">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>']
    for v, lab in ay.ticks:
        if ay.lo <= v <= ay.hi:
            y = ay(v)
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>'
                       f'<text x="{left - 5}" y="{y + 3.5:.1f}" text-anchor="end" fill="#444">{esc(lab)}</text>')
    for v, lab in ax.ticks:
        if ax.lo <= v <= ax.hi:
            x = ax(v)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>'
                       f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#888"/>'
                       f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle" fill="#444">{esc(lab)}</text>')
    if hline is not None and ay.ok(hline):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{ay(hline):.1f}" y2="{ay(hline):.1f}" '
                   f'stroke="#888" stroke-width="1"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 34}" text-anchor="middle" fill="#222">'
               f'{esc(x_label)}</text>'
               f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'fill="#222">{esc(y_label)}</text>')
    for mx, text in marks or []:
        if ax.ok(mx):
            out.append(f'<line x1="{ax(mx):.1f}" x2="{ax(mx):.1f}" y1="{top}" y2="{top + ph}" stroke="#cf222e" '
                       f'stroke-width="1.4" stroke-dasharray="4 3"><title>{esc(text)}</title></line>'
                       + (f'<text x="{ax(mx) - 3:.1f}" y="{top + 11}" fill="#cf222e" font-size="10" '
                          f'text-anchor="end">{esc(text)}</text>' if ax(mx) > left + pw / 2 else
                          f'<text x="{ax(mx) + 3:.1f}" y="{top + 11}" fill="#cf222e" font-size="10">'
                          f'{esc(text)}</text>'))
    legend = []
    placed: list = []  # boxes of the point labels drawn so far
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        legend.append((s.name, color, s.dash, s.shape if s.marker else None, s.line))
        pts = [(ax(x), ay(y), k) for k, (x, y) in enumerate(zip(s.x, s.y)) if ax.ok(x) and ay.ok(y)]
        if s.line and len(pts) > 1:
            d = " ".join(f"{'M' if j == 0 else 'L'}{px:.1f},{py:.1f}" for j, (px, py, _) in enumerate(pts))
            dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
            out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>')
        for px, py, k in pts:
            e = s.err[k] if s.err else None
            if e:
                lo_v, hi_v = s.y[k] - e, s.y[k] + e
                y1 = ay(hi_v) if ay.ok(hi_v) else py
                y0 = ay(lo_v) if ay.ok(lo_v) else top + ph
                out.append(f'<path d="M{px:.1f},{y0:.1f}V{y1:.1f}M{px - 3:.1f},{y0:.1f}h6M{px - 3:.1f},{y1:.1f}h6" '
                           f'stroke="{color}" stroke-width="1.1" fill="none"/>')
            if s.marker or len(pts) == 1:  # a lone point of a line-only series still shows
                xn = x_names.get(s.x[k], fmt.num(s.x[k])) if x_names else fmt.num(s.x[k])
                tip = f"{s.name}: {xn} → {fmt.pm(s.y[k], e)}"
                out.append(marker(s.shape, px, py, color, 3.2, tip))
            if s.labels and s.labels[k]:
                tx, ty, end = _place_label(str(s.labels[k]), px, py, left + pw, top + ph, placed)
                anchor = ' text-anchor="end"' if end else ""
                out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" fill="{color}" '
                           f'font-size="10"{anchor}>{esc(s.labels[k])}</text>')
    if not (len(legend) == 1 and legend[0][0] == "all"):  # one unnamed series needs no legend
        leg, _ = _legend(legend, left, top + ph + 52, pw)
        out.append(leg)
    out.append("</svg>")
    return "".join(out)


def bar_chart(categories: list[str], series: list[tuple[str, list, list | None]], *, title: str,
              x_label: str, ref: float | None = None, width: int = 560, value_fmt=None,
              tips: list[list] | None = None) -> str:
    """Horizontal grouped bars: one group per category, one bar per series (name, values, errors)."""
    label_w = label_width(categories, width * 0.42)
    left, right, top = label_w, 70, 30
    n = max(len(series), 1)
    bar_h, gap = 12, 10
    group_h = n * bar_h + gap
    names = [s[0] for s in series]
    show_legend = names != ["all"]
    leg_h = _legend_height(names, width - left - right) if show_legend else 0
    ph = group_h * len(categories)
    total_h = top + ph + 40 + leg_h
    vals = [v + (e[i] or 0 if e else 0) for _, vs, e in series for i, v in enumerate(vs) if v is not None]
    ax = Axis([0.0] + vals + ([ref] if ref is not None else []), False, left, width - right)
    out = [_svg_open(width, total_h, title),
           f'<text x="8" y="18" font-size="13" font-weight="600" fill="#111">{esc(title)}</text>']
    for v, lab in ax.ticks:
        x = ax(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#e6e6e6"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle" fill="#444">{esc(lab)}</text>')
    for ci, cat in enumerate(categories):
        gy = top + ci * group_h + gap / 2
        short = cat if len(cat) * 6.9 < label_w - 10 else cat[: int((label_w - 20) / 6.9)] + "…"
        out.append(f'<text x="{left - 6}" y="{gy + n * bar_h / 2 + 4:.1f}" text-anchor="end" fill="#222">'
                   f'<title>{esc(cat)}</title>{esc(short)}</text>')
        for si, (name, vs, errs) in enumerate(series):
            v = vs[ci]
            if v is None:
                continue
            color = PALETTE[si % len(PALETTE)]
            y = gy + si * bar_h
            x0, x1 = ax(0), ax(v)
            e = errs[ci] if errs else None
            tip = tips[si][ci] if tips else f"{cat} · {name}: {fmt.pm(v, e)}"
            out.append(f'<rect x="{min(x0, x1):.1f}" y="{y:.1f}" width="{abs(x1 - x0):.1f}" height="{bar_h - 2}" '
                       f'fill="{color}"><title>{esc(tip)}</title></rect>')
            if e:
                out.append(f'<path d="M{ax(v - e):.1f},{y + bar_h / 2 - 1:.1f}H{ax(v + e):.1f}" stroke="#222"/>')
            out.append(f'<text x="{max(x0, x1) + 4:.1f}" y="{y + bar_h - 3:.1f}" fill="#333" font-size="10">'
                       f'{esc(value_fmt(v) if value_fmt else fmt.num(v, 3))}</text>')
    out.append(f'<line x1="{ax(0):.1f}" x2="{ax(0):.1f}" y1="{top}" y2="{top + ph}" stroke="#666"/>')
    if ref is not None:
        out.append(f'<line x1="{ax(ref):.1f}" x2="{ax(ref):.1f}" y1="{top - 4}" y2="{top + ph}" stroke="#222" '
                   f'stroke-dasharray="4 3"/>')
    out.append(f'<text x="{(left + width - right) / 2:.1f}" y="{top + ph + 30}" text-anchor="middle" '
               f'fill="#222">{esc(x_label)}</text>')
    if show_legend:
        leg, _ = _legend([(nm, PALETTE[i % len(PALETTE)], None) for i, nm in enumerate(names)],
                         left, top + ph + 46, width - left - right)
        out.append(leg)
    out.append("</svg>")
    return "".join(out)


def heat_color(f: float) -> str:
    f = min(1.0, max(0.0, f))
    i = min(int(f * (len(HEAT) - 1)), len(HEAT) - 2)
    t = f * (len(HEAT) - 1) - i
    a, b = HEAT[i], HEAT[i + 1]
    return "#%02x%02x%02x" % tuple(round(a[k] + (b[k] - a[k]) * t) for k in range(3))


def heatmap(rows: list[str], cols: list[str], values: list[list], *, title: str, col_title: str,
            value_label: str, higher_is_better: bool | None = None, width: int = 900,
            errors: list[list] | None = None, vmin: float | None = None, vmax: float | None = None) -> str:
    """Cells colored on viridis between the min and max shown (bright = high); values in cells when they fit."""
    flat = [v for r in values for v in r if v is not None]
    vmin = (min(flat) if flat else 0.0) if vmin is None else vmin
    vmax = (max(flat) if flat else 1.0) if vmax is None else vmax
    label_w = label_width(rows, width * 0.4)
    left, right, top = label_w, 70, 44
    pw = width - left - right
    better = "" if higher_is_better is None else (" · higher is better" if higher_is_better else
                                                  " · lower is better: colors inverted, bright = better")
    flip = higher_is_better is False
    cw = pw / max(len(cols), 1)
    ch = 22 if cw >= 30 else 16
    ph = ch * len(rows)
    bh = max(ph, 70)  # color bar height
    total_h = top + bh + 46
    show_vals = cw >= 38
    out = [_svg_open(width, total_h, title),
           f'<text x="8" y="18" font-size="13" font-weight="600" fill="#111">{esc(title)}</text>'
           f'<text x="8" y="33" fill="#57606a">{esc(value_label + better)}</text>']
    step = max(1, math.ceil(28 / cw))
    for ci, c in enumerate(cols):
        if ci % step == 0:
            out.append(f'<text x="{left + (ci + 0.5) * cw:.1f}" y="{top + ph + 14}" text-anchor="middle" '
                       f'fill="#444">{esc(c)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32}" text-anchor="middle" fill="#222">'
               f'{esc(col_title)}</text>')
    for ri, r in enumerate(rows):
        y = top + ri * ch
        short = r if len(r) * 6.9 < label_w - 10 else r[: int((label_w - 20) / 6.9)] + "…"
        out.append(f'<text x="{left - 6}" y="{y + ch / 2 + 4:.1f}" text-anchor="end" fill="#222">'
                   f'<title>{esc(r)}</title>{esc(short)}</text>')
        for ci, v in enumerate(values[ri]):
            x = left + ci * cw
            if v is None:
                out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cw:.1f}" height="{ch}" fill="#f2f2f2" '
                           f'stroke="#fff"><title>{esc(r)} · {esc(cols[ci])}: no record</title></rect>')
                continue
            f = (v - vmin) / (vmax - vmin) if vmax > vmin else 1.0
            f = 1 - f if flip and vmax > vmin else f
            e = errors[ri][ci] if errors else None
            tip = f"{r} · {col_title} {cols[ci]}: {fmt.pm(v, e)}"
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cw:.1f}" height="{ch}" fill="{heat_color(f)}" '
                       f'stroke="#fff" stroke-width="0.5"><title>{esc(tip)}</title></rect>')
            if show_vals:
                tc = "#fff" if f < 0.55 else "#111"
                out.append(f'<text x="{x + cw / 2:.1f}" y="{y + ch / 2 + 3.5:.1f}" text-anchor="middle" '
                           f'font-size="10" fill="{tc}">{esc(fmt.num(v, 3))}</text>')
    # color bar
    bx = width - right + 14
    grad = "".join(f'<rect x="{bx}" y="{top + bh * (1 - (k + 1) / 20):.1f}" width="12" height="{bh / 20 + 0.5:.1f}" '
                   f'fill="{heat_color((k + 0.5) / 20)}"/>' for k in range(20))
    hi_lab, lo_lab = (vmin, vmax) if flip else (vmax, vmin)  # the bright end is labelled at the top
    out.append(grad + f'<text x="{bx + 16}" y="{top + 8}" fill="#444" font-size="10">{esc(fmt.num(hi_lab, 3))}</text>'
               f'<text x="{bx + 16}" y="{top + bh}" fill="#444" font-size="10">{esc(fmt.num(lo_lab, 3))}</text>')
    out.append("</svg>")
    return "".join(out)
