"""Records -> HTML tables (escaped): rows by the labels that vary, one column per metric.

Labels that are the same for every row are not columns: they are returned as ``through`` and
shown above the table, so every number still says what it was measured through. A metric's
header (or its cell, where metrics are rows) carries its registered meaning as a tooltip.
"""

from __future__ import annotations

import html
import numbers
from dataclasses import dataclass, field

import pandas as pd

from . import fmt, metrics
from .runs import label_columns

# label columns first in this order, then the rest in order of appearance
LABEL_ORDER = ["model", "config", "backend", "variant", "mode", "chunk", "baseline", "source", "kind", "dim", "d",
               "bits", "norm_correction", "context", "tokens", "length", "depth", "prompt", "layer"]
TEXT_MAX = 60  # longer string labels are texts (shown elsewhere), not table keys


@dataclass
class Table:
    title: str
    html: str
    through: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""


def is_num(v) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def show(v) -> str:
    return fmt.DASH if v is None or (isinstance(v, float) and v != v) else str(v)


def determined(df: pd.DataFrame, by: str, col: str) -> bool:
    """Every value of ``by`` goes with one value of ``col`` (``config_name`` adds nothing beside ``config``)."""
    seen: dict = {}
    for a, b in zip(df[by].map(show), df[col].map(show)):
        if seen.setdefault(a, b) != b:
            return False
    return True


def usable_labels(df: pd.DataFrame) -> list[str]:
    """Label columns with a value somewhere, no long texts, no duplicate of an earlier label (spec == model),
    none determined by the label it is named after (config_name by config)."""
    rank = {k: i for i, k in enumerate(LABEL_ORDER)}
    cands = label_columns(df)
    cols = []
    for c in sorted(cands, key=lambda c: (rank.get(c, len(rank)), cands.index(c))):
        s = df[c]
        present = s.dropna()
        if present.empty or any(isinstance(v, str) and len(v) > TEXT_MAX for v in present):
            continue
        if any(df[k].astype(str).equals(s.astype(str)) or (k in c and determined(df, k, c)) for k in cols):
            continue
        cols.append(c)
    return cols


def split_labels(df: pd.DataFrame, labels: list[str] | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """(labels constant over ``df`` as (name, value), labels that vary)."""
    labels = usable_labels(df) if labels is None else labels
    const, vary = [], []
    for c in labels:
        vals = {show(v) for v in df[c]}
        (const.append((c, vals.pop())) if len(vals) == 1 else vary.append(c))
    return [(k, v) for k, v in const if v != fmt.DASH], vary


def sort_key(df: pd.DataFrame, cols: list[str]):
    """Numeric labels sort numerically, others by first appearance; missing values last."""
    keys = {}
    for c in cols:
        vals = [v for v in df[c] if v is not None and v == v]
        if vals and all(is_num(v) for v in vals):
            keys[c] = lambda v: (1, 0) if v is None or v != v else (0, float(v))
        else:
            order = {}
            for v in df[c]:
                order.setdefault(show(v), len(order))
            keys[c] = (lambda o: lambda v: (1, 0) if show(v) == fmt.DASH else (0, o[show(v)]))(order)
    return lambda row: tuple(keys[c](row[c]) for c in cols)


def cell(metric: str, value, error, unit) -> str:
    if unit == "bool" or metric.startswith(("goal", "passed")):
        return "yes" if value else "no"
    if unit == "B" and error is None:
        return fmt.num(value)
    return fmt.pm(value, error)


def header(metric: str, unit) -> str:
    return f"{metric} [{unit}]" if unit and unit != "bool" else metric


def html_table(frame: pd.DataFrame, classes: list[str], titles: dict[str, str] | None = None) -> str:
    """``frame`` (cells as text) as an HTML table, everything escaped.

    ``titles`` maps a header, or a cell of the ``metric`` column, to its tooltip.
    """
    titles = titles or {}

    def cell(tag: str, text, tip: str | None) -> str:
        text = fmt.DASH if text is None or (isinstance(text, float) and text != text) else str(text)
        tip = titles.get(text) if tip is None else tip
        attr = f' title="{html.escape(tip, quote=True)}"' if tip else ""
        return f"<{tag}{attr}>{html.escape(text, quote=False)}</{tag}>"

    cols = [str(c) for c in frame.columns]
    out = [f'<table class="{html.escape(" ".join(classes), quote=True)}">', "<thead><tr>"]
    out += [cell("th", c, None) for c in cols]
    out.append("</tr></thead><tbody>")
    for row in frame.itertuples(index=False):
        out.append("<tr>" + "".join(cell("td", v, None if c == "metric" else "") for c, v in zip(cols, row))
                   + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def metric_titles(names, units: dict | None = None) -> dict[str, str]:
    """Tooltip text for each metric, keyed by its header ``name [unit]`` (by its name when ``units`` is None)."""
    return {m if units is None else header(m, units.get(m)): f"{m}: {metrics.meaning(m)}" for m in names}


def blank_repeats(table: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Blank a label equal to the row above's when every label before it is equal too (reads as a tree)."""
    if not cols or len(table) < 2:
        return table
    orig = [list(table[c]) for c in cols]
    shown = [col[:] for col in orig]
    for i in range(1, len(table)):
        for j in range(len(cols)):
            if orig[j][i] != orig[j][i - 1]:
                break
            shown[j][i] = ""
    return table.assign(**{c: shown[j] for j, c in enumerate(cols)})


def pivot(df: pd.DataFrame, title: str, *, metrics: list[str] | None = None, note: str = "") -> Table:
    """One row per combination of varying labels, one column per metric (first-appearance order).

    A metric whose records never carry one of the varying labels does not depend on it: its value
    is repeated in every row that matches it on the other labels (e.g. an optimum that depends on
    bits but not on norm correction), instead of getting rows of its own.
    """
    if metrics is not None:
        df = df[df["metric"].isin(metrics)]
    through, vary = split_labels(df)
    units = {}
    for m, u in zip(df["metric"], df["unit"]):
        units.setdefault(m, u)
    order = metrics or list(units)
    recs = df.to_dict("records")
    absent = {m: {c for c in vary if all(show(r[c]) == fmt.DASH for r in recs if r["metric"] == m)} for m in units}
    full = [r for r in recs if not absent[r["metric"]]] or recs
    rows: dict[tuple, dict] = {}
    for rec in full:
        rows.setdefault(tuple(show(rec[c]) for c in vary), {c: rec[c] for c in vary})
    for rec in recs:
        own = {c: show(rec[c]) for c in vary if c not in absent[rec["metric"]]}
        col = header(rec["metric"], units[rec["metric"]])
        text = cell(rec["metric"], rec["value"], rec["error"], rec["unit"])
        if len(own) == len(vary):  # the common case: the row is the record's own
            rows[tuple(own[c] for c in vary)].setdefault(col, text)
            continue
        for key, row in rows.items():
            if all(key[vary.index(c)] == v for c, v in own.items()):
                row.setdefault(col, text)
    body = list(rows.values())
    if vary:
        body.sort(key=sort_key(pd.DataFrame(body, columns=vary), vary))
    cols = vary + [header(m, units[m]) for m in order if m in units]
    table = pd.DataFrame(body, columns=cols, dtype=object).map(lambda v: show(v) if not isinstance(v, str) else v)
    table = blank_repeats(table, vary)
    if not vary and len(table) == 1:  # a single row reads better as metric | value
        table = pd.DataFrame({"metric": cols, "value": list(table.iloc[0])})
        vary = ["metric"]
    html_ = html_table(table, ["data", f"lab{min(len(vary), 9)}"], metric_titles(units, units))
    return Table(title, html_, through, note)
