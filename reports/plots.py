"""The figures of each suite, drawn from its records with ``reports.charts``.

A figure whose records are missing is returned with ``svg=None`` and a note saying what was
missing: the page says the plot was omitted instead of drawing an empty frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from . import charts, fmt, metrics
from .charts import Series
from .tables import show, sort_key, split_labels

MAX_SERIES = 10


@dataclass
class Figure:
    title: str
    svg: str | None
    caption: str = ""
    note: str = ""
    through: list = None  # [(label, value)] the same for every plotted record
    metrics: list = None  # the metrics drawn: their meanings are shown under the figure


def through(df: pd.DataFrame) -> list[tuple[str, str]]:
    """Labels shared by every record of ``df`` (what a whole figure was measured through)."""
    const, _ = split_labels(df)
    return const


def omitted(title: str, why: str) -> Figure:
    return Figure(title, None, note=f"Plot omitted: {why}")


def groups(df: pd.DataFrame, cols: list[str]) -> list[tuple[dict, pd.DataFrame]]:
    """Split ``df`` by ``cols`` (missing values allowed): numeric keys sorted, others in order of appearance."""
    if df.empty:
        return []
    if not cols:
        return [({}, df)]
    keys = list(zip(*(df[c].map(show) for c in cols)))
    where: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        where.setdefault(k, []).append(i)
    order = sort_key(df, cols)
    out = []
    for pos in where.values():
        first = df.iloc[pos[0]]
        out.append((order(first), {c: first[c] for c in cols}, df.iloc[pos]))
    out.sort(key=lambda t: t[0])
    return [(labels, g) for _, labels, g in out]


def name_of(labels: dict, short: bool = True) -> str:
    parts = []
    for k, v in labels.items():
        if v is None or v != v:
            continue
        parts.append(show(v) if short and k in ("config", "backend", "model", "metric") else f"{k}={show(v)}")
    return " · ".join(parts) or "all"


def others(df: pd.DataFrame, exclude: list[str]) -> list[str]:
    """Labels that vary in ``df`` apart from ``exclude``."""
    _, vary = split_labels(df)
    return [c for c in vary if c not in exclude]


def line_series(df: pd.DataFrame, x: str, by: list[str], **style) -> list[Series]:
    out = []
    for labels, g in groups(df, by):
        g = g[pd.to_numeric(g[x], errors="coerce").notna()]
        g = g.assign(_x=pd.to_numeric(g[x])).sort_values("_x", kind="stable").drop_duplicates("_x")
        if g.empty:
            continue
        err = [None if e is None or e != e else e for e in g["error"]]
        out.append(Series(name_of(labels), list(g["_x"]), list(g["value"]),
                          err=err if any(err) else None, meta=dict(labels), **style))
    return out


def dedupe(series: list[Series], rel: float = 1e-9) -> list[Series]:
    """Merge series that draw the same points (e.g. two backends that agree exactly).

    The merged name keeps the shared labels once and joins the differing ones: ``K4V2 · torch-cpu = mlx``.
    """
    out: list[Series] = []
    for s in series:
        for o in out:
            if o.x == s.x and len(o.y) == len(s.y) and all(
                    abs(a - b) <= rel * max(abs(a), abs(b), 1e-300) for a, b in zip(o.y, s.y)):
                if o.meta is not None and s.meta is not None and o.meta.keys() == s.meta.keys():
                    o.meta = {k: o.meta[k] if show(o.meta[k]) == show(s.meta[k]) or show(s.meta[k]) in
                              show(o.meta[k]).split(" = ") else f"{show(o.meta[k])} = {show(s.meta[k])}"
                              for k in o.meta}
                    o.name = name_of(o.meta)
                else:
                    o.name = f"{o.name} = {s.name}"
                break
        else:
            out.append(s)
    return out


def names(*frames: pd.DataFrame) -> list[str]:
    """The metrics of ``frames``, in order of appearance."""
    return list(dict.fromkeys(m for f in frames if not f.empty for m in f["metric"]))


def cap(series: list[Series], caption: str) -> tuple[list[Series], str]:
    if len(series) <= MAX_SERIES:
        return series, caption
    return series[:MAX_SERIES], caption + f" First {MAX_SERIES} of {len(series)} series; all are in the table."


def x_ticks_at(values) -> list[tuple[float, str]]:
    vals = sorted({float(v) for v in values})
    return [(v, fmt.num(v)) for v in vals] if len(vals) <= 10 else None


# ---- memory ------------------------------------------------------------------------------------
def memory(df: pd.DataFrame) -> list[Figure]:
    held = metrics.match(df, r"^bytes_held")
    base = metrics.match(df, r"^bytes_fp16", r"^bytes_base")
    ctx = metrics.label(held, "context", "tokens", "length")
    title = "Bytes held vs context"
    if held.empty or ctx is None:
        return [omitted(title, "no bytes_held records with a context label in this run.")]
    figs = []
    models = [m for m, _ in groups(held, ["model"])] if "model" in held else [{}]
    for m in models:
        h = held[held["model"] == m["model"]] if m else held
        b = base[base["model"] == m["model"]] if m and not base.empty else base
        by = others(h, [ctx, "model", "spec"])
        s = line_series(h, ctx, by)
        ref = dedupe(line_series(b, ctx, [c for c in others(b, [ctx, "model", "spec", "config", "variant"])],
                                 dash="5 3", color="#777777"))
        for r in ref:
            r.name = "fp16 cache, measured" + (f" ({r.name})" if r.name != "all" else "")
        series, caption = cap(dedupe(s) + ref, "Measured from the tensors the cache holds; log-log axes.")
        figs.append(Figure(f"{title} — {name_of(m)}" if m else title,
                           charts.xy_chart(series, title=f"{title} — {name_of(m)}" if m else title,
                                           x_label=f"{ctx} [tokens]", y_label="bytes held [B]", log_x=True,
                                           log_y=True, x_ticks=x_ticks_at(h[ctx]), width=480, height=300),
                           caption, through=through(h), metrics=names(h, b)))
    ratio = metrics.match(df, r"^ratio_vs_fp16")
    if not ratio.empty and ctx in ratio:
        series, caption = cap(dedupe(line_series(ratio, ctx, others(ratio, [ctx, "spec"]))),
                              "Bytes held / bytes of an fp16 cache of the same tokens; full-precision "
                              "sinks and window are amortized as the context grows.")
        figs.append(Figure("Ratio to fp16 vs context", charts.xy_chart(
            series, title="Ratio to fp16 vs context", x_label=f"{ctx} [tokens]", y_label="bytes held / fp16",
            log_x=True, x_ticks=x_ticks_at(ratio[ctx]), width=480, height=300), caption, metrics=names(ratio)))
    return figs


# ---- mse ---------------------------------------------------------------------------------------
def mse(df: pd.DataFrame) -> list[Figure]:
    title = "D_mse vs bits"
    d = metrics.match(df, r"^d_mse$", r"^dmse$", r"^mse$")
    bits = metrics.label(d, "bits", "b")
    if d.empty or bits is None:
        return [omitted(title, "no d_mse records with a bits label in this run.")]
    dim = metrics.label(d, "dim", "d", "head_dim")
    series = dedupe(line_series(d, bits, others(d, [bits])))
    opt = metrics.match(df, r"^d_mse_opt", r"^optimum")
    ref = dedupe(line_series(opt, bits, [dim] if dim and dim in opt else [], dash="6 3"))
    for r in ref:
        r.name = "Lloyd-Max optimum" + (f" ({r.name})" if r.name != "all" else "")
    bs = sorted({int(b) for b in pd.to_numeric(d[bits], errors="coerce").dropna()})
    shannon = Series("Shannon bound 4⁻ᵇ", bs, [4.0 ** -b for b in bs], dash="2 3", color="#222222", marker=False)
    series, caption = cap(series + ref + [shannon],
                          "Mean squared error of unit vectors after encode/decode (± SE); the optimum is the "
                          "exact Lloyd-Max value of the coordinate density, 4⁻ᵇ the Shannon lower bound.")
    figs = [Figure(title, charts.xy_chart(series, title=title, x_label="bits per coordinate",
                                          y_label="D_mse (log)", log_y=True, x_ticks=x_ticks_at(bs)), caption,
                   through=through(d), metrics=names(d, opt))]
    return figs + layer_heatmaps(df, (r".*unit_vs_optimum$", r".*vs_optimum$", r"^real_d_mse"), limit=2)


# ---- per-layer heat maps (attention, real K/V) -----------------------------------------------
def layer_heatmaps(df: pd.DataFrame, prefer: tuple = (), limit: int = 4) -> list[Figure]:
    """One heat map per metric that has a ``layer`` label: rows = the other labels, columns = layers."""
    if "layer" not in df or df["layer"].isna().all():
        return []
    per_layer = df[df["layer"].notna()]
    names = list(dict.fromkeys(per_layer["metric"]))
    chosen = []
    for p in prefer:
        hit = metrics.match(per_layer[~per_layer["metric"].isin(chosen)], p)
        chosen += list(dict.fromkeys(hit["metric"]))[: limit - len(chosen)]
    chosen = (chosen or names)[:limit]
    figs = []
    for m in chosen:
        g = per_layer[per_layer["metric"] == m]
        layers = sorted({int(v) for v in pd.to_numeric(g["layer"], errors="coerce").dropna()})
        rows = groups(g, others(g, ["layer"]))
        vals, errs, names_ = [], [], []
        for labels, rg in rows:
            by_layer = {int(i): (v, e if e == e else None) for i, v, e in zip(rg["layer"], rg["value"], rg["error"])}
            names_.append(name_of(labels))
            vals.append([by_layer.get(i, (None, None))[0] for i in layers])
            errs.append([by_layer.get(i, (None, None))[1] for i in layers])
        unit = g["unit"].iloc[0]
        t = f"{m} per layer"
        figs.append(Figure(t, charts.heatmap(names_, [str(i) for i in layers], vals, errors=errs, title=t,
                                             col_title="layer", value_label=m + (f" [{unit}]" if unit else ""),
                                             higher_is_better=metrics.better(m)),
                           "Hover a cell for its value ± SE. Colors span the min..max of this map.",
                           through=through(g), metrics=[m]))
    return figs


# ---- attention ---------------------------------------------------------------------------------
def attention(df: pd.DataFrame) -> list[Figure]:
    figs = layer_heatmaps(df, (r"^(attn_)?cos", r"^(attn_)?kl", r"^(attn_)?top", r"^(attn_)?rel_err"), limit=5)
    return figs or [omitted("Attention fidelity per layer", "no attention records with a layer label in this run.")]


# ---- perplexity: the quality-per-bit frontier -------------------------------------------------
def bits_for(df: pd.DataFrame, rows: pd.DataFrame, bits_map: dict) -> list:
    """Bits per channel held for each row: same test's record, else the headline's for its config."""
    bpc = metrics.match(df, r"^bits_per_ch")
    by_test = {t: v for t, v in zip(bpc["test"], bpc["value"])}
    return [by_test.get(t, bits_map.get((c, b))) for t, c, b in
            zip(rows["test"], rows.get("config", [None] * len(rows)), rows.get("backend", [None] * len(rows)))]


def frontier(df: pd.DataFrame, pattern: tuple, title: str, y_label: str, log_y: bool, bits_map: dict,
             hline=None) -> Figure:
    rows = metrics.match(df, *pattern)
    if rows.empty or "config" not in rows:
        return omitted(title, f"no {pattern[0].strip('^$')} records with a config label in this run.")
    rows = rows.assign(_bits=bits_for(df, rows, bits_map)).dropna(subset=["_bits"])
    if rows.empty:
        return omitted(title, "no bits-per-channel record (perplexity or memory suite) for these configs.")
    series = []
    for labels, g in groups(rows, others(rows, ["config", "spec", "bits", "sinks", "window"])):
        g = g.sort_values("_bits", kind="stable")
        err = [None if e is None or e != e else e for e in g["error"]]
        series.append(Series(name_of(labels), list(g["_bits"]), list(g["value"]), err=err if any(err) else None,
                             labels=[show(c) for c in g["config"]]))
    series, caption = cap(series, "Each point is one config, at the bits per channel its cache held while "
                                  "scoring (norms, sinks and window included); ± SE over tokens.")
    return Figure(title, charts.xy_chart(series, title=title, x_label="bits per channel held", y_label=y_label,
                                         log_y=log_y, hline=hline), caption, through=through(rows),
                  metrics=names(rows))


def perplexity(df: pd.DataFrame, bits_map: dict) -> list[Figure]:
    return [frontier(df, (r"^kld_mean", r"^kld$"), "Mean KLD vs bits held", "mean KLD [nats] (log)", True, bits_map),
            frontier(df, (r"^d_?ppl",), "ΔPPL vs bits held", "ΔPPL [%]", False, bits_map, hline=0.0)]


# ---- generation --------------------------------------------------------------------------------
def bars_by_config(df: pd.DataFrame, pattern: tuple, title: str, x_label: str, ref=None) -> Figure:
    rows = metrics.match(df, *pattern)
    if rows.empty or "config" not in rows:
        return omitted(title, f"no {pattern[0].strip('^$')} records with a config label in this run.")
    series_by = others(rows, ["config", "spec"])
    cats = [show(c) for c in dict.fromkeys(rows["config"])]
    series = []
    for labels, g in groups(rows, series_by):
        vals = {show(c): (v, e) for c, v, e in zip(g["config"], g["value"], g["error"])}
        series.append((name_of(labels), [vals.get(c, (None, None))[0] for c in cats],
                       [vals.get(c, (None, None))[1] if vals.get(c, (None, None))[1] == vals.get(c, (None, None))[1]
                        else None for c in cats]))
    return Figure(title, charts.bar_chart(cats, series[:MAX_SERIES], title=title, x_label=x_label, ref=ref),
                  metrics=names(rows))


def generation(df: pd.DataFrame) -> list[Figure]:
    return [bars_by_config(df, (r"^match_rate_mean$", r"^match_rate$", r"^token_match"),
                           "Token match rate vs the baseline",
                           "fraction of greedy tokens equal to the baseline's", ref=1.0)]


# ---- needle ------------------------------------------------------------------------------------
NEEDLE_GROUPS = ("config", "backend", "model", "variant", "mode", "cache")  # one map per value of these


def needle(df: pd.DataFrame) -> list[Figure]:
    title = "Needle retrieval: length × depth"
    acc = None
    for p in (r"^passkey_found", r"^found", r"^acc", r"^needle", r"^retriev"):
        rows = metrics.match(df, p)
        length, depth = metrics.label(rows, "length", "context", "tokens"), metrics.label(rows, "depth", "position")
        if length and depth:
            rows = rows[rows[length].notna() & rows[depth].notna()]
            if not rows.empty:
                acc = rows
                break
    if acc is None:
        return [omitted(title, "no retrieval records with both length and depth labels in this run.")]
    figs = []
    lo, hi = acc["value"].min(), acc["value"].max()  # one color scale for every map: baseline and compressed compare
    lo = min(lo, 0.0) if lo == hi else lo
    by = [c for c in others(acc, [length, depth]) if c in NEEDLE_GROUPS]
    maps = sorted(groups(acc, by), key=lambda lg: not metrics.is_baseline_config(lg[0].get("config")))
    for labels, g in maps[:MAX_SERIES]:
        ls = sorted({v for v in g[length] if v == v}, key=lambda v: (not isinstance(v, (int, float)), v))
        ds = sorted({v for v in g[depth] if v == v}, key=lambda v: (not isinstance(v, (int, float)), v))
        cells: dict = {}
        for n, dd, v in zip(g[length], g[depth], g["value"]):
            cells.setdefault((n, dd), []).append(v)  # repeated cases of one cell are averaged
        vals = [[sum(cells[n, dd]) / len(cells[n, dd]) if (n, dd) in cells else None for n in ls] for dd in ds]
        t = f"{title} — {name_of(labels)}" if labels else title
        figs.append(Figure(t, charts.heatmap([f"depth {show(dd)}" for dd in ds], [fmt.num(n) for n in ls], vals,
                                             title=t, col_title=length, value_label=g["metric"].iloc[0],
                                             higher_is_better=metrics.better(g["metric"].iloc[0]), width=560,
                                             vmin=lo, vmax=hi),
                           through=through(g), metrics=names(g)))
    return figs


# ---- speed -------------------------------------------------------------------------------------
def speed(df: pd.DataFrame) -> list[Figure]:
    rate = df[[metrics.is_rate(m) for m in df["metric"]]]
    if rate.empty:
        return [omitted("Throughput", "no throughput records (a registered rate, unit …/s) in this run.")]
    figs = []
    bits = metrics.label(rate, "bits")
    with_bits = rate[rate[bits].notna()] if bits else rate.iloc[0:0]
    for unit, g in with_bits.groupby("unit", sort=False):
        t = f"Codec throughput vs bits [{unit}]"
        series, caption = cap(dedupe(line_series(g, bits, ["metric"] + others(g, [bits, "metric", "spec"]))),
                              "Encode/decode rate of the codec alone; log y.")
        figs.append(Figure(t, charts.xy_chart(series, title=t, x_label="bits per coordinate", y_label=unit,
                                              log_y=True, x_ticks=x_ticks_at(g[bits])), caption, metrics=names(g)))
    rest = rate.drop(with_bits.index)
    if not rest.empty:
        figs.append(speed_vs_baseline(rest))
    return figs


def speed_vs_baseline(g: pd.DataFrame) -> Figure:
    """Compressed throughput / baseline throughput per metric (1 = as fast); absolute rates in the tooltips."""
    title = "Throughput relative to the baseline"
    configs = metrics.config_of(g).fillna("compressed")
    split = [metrics.split_baseline(m) for m in g["metric"]]
    g = g.assign(_metric=[s[0] for s in split],
                 _base=[s[1] or metrics.is_baseline_config(c) for s, c in zip(split, configs)],
                 _config=[show(c) for c in configs])
    cats, base, comp = [], {}, {}
    for labels, cg in groups(g, ["_metric"] + others(g, ["config", "cache", "spec", "metric"])):
        cat = name_of({("metric" if k == "_metric" else k): v for k, v in labels.items()})
        cats.append(cat)
        for b, c, v, e, u in zip(cg["_base"], cg["_config"], cg["value"], cg["error"], cg["unit"]):
            if b:
                base[cat] = (v, e if e == e else None, u)
            else:
                comp.setdefault(c, {})[cat] = (v, e if e == e else None, u)
    if not base or not comp:
        return omitted(title, "no throughput pair of a baseline (config=baseline or a *_baseline metric) and a "
                              "compressed config in this run; the absolute rates are in the table.")
    series, tips = [], []
    for config, vals in comp.items():
        ratios, errs, tip = [], [], []
        for cat in cats:
            if cat not in vals or cat not in base or not base[cat][0]:
                ratios.append(None), errs.append(None), tip.append("")
                continue
            (v, e, u), (bv, be, _) = vals[cat], base[cat]
            r = v / bv
            rel = ((e or 0) / v) ** 2 + ((be or 0) / bv) ** 2 if v else 0
            ratios.append(r)
            errs.append(r * rel ** 0.5 if rel else None)
            tip.append(f"{cat} · {config}: {fmt.pm(v, e)} {u} vs baseline {fmt.pm(bv, be)} {u} = {r:.3f}×")
        series.append((config, ratios, errs))
        tips.append(tip)
    return Figure(title, charts.bar_chart(cats, series[:MAX_SERIES], title=title, ref=1.0, tips=tips, width=760,
                                         x_label="compressed / baseline throughput (1 = as fast)",
                                         value_fmt=lambda r: f"{r:.2f}×"),
                  "Same machine, same run; ± from both SEs. Hover a bar for the absolute rates.", through=through(g),
                  metrics=names(g))


def generic(df: pd.DataFrame) -> list[Figure]:
    return layer_heatmaps(df)


# ---- speed_attention: decode attention over the codes vs the baseline -------------------------
def _batch_color(batches: list) -> dict:
    return {b: charts.PALETTE[i % len(charts.PALETTE)] for i, b in enumerate(batches)}


def _by_batch(rows: pd.DataFrame, x: str) -> list[tuple]:
    """(batch, rows of that batch sorted by ``x``) with numeric batch order."""
    out = []
    for labels, g in groups(rows, ["batch"] if "batch" in rows else []):
        g = g.assign(_x=pd.to_numeric(g[x], errors="coerce")).dropna(subset=["_x"]).sort_values("_x", kind="stable")
        out.append((labels.get("batch"), g.drop_duplicates("_x")))
    return out


def _context_ticks(values) -> list | None:
    vals = sorted({float(v) for v in values})
    return [(v, f"{v / 1024:g}k" if v >= 1024 else fmt.num(v)) for v in vals] if len(vals) <= 12 else None


def attention_latency(df: pd.DataFrame, metric: str, clock: str) -> Figure | None:
    rows = metrics.match(df, rf"^{metric}$")
    if rows.empty or "context" not in rows or "cache" not in rows:
        return None
    title = f"Decode attention latency vs context ({clock})"
    batches = [b for b, _ in _by_batch(rows, "context")]
    color = _batch_color(batches)
    series = []
    for cache, cg in groups(rows, ["cache"]):
        base = metrics.is_baseline_config(cache["cache"])
        for b, g in _by_batch(cg, "context"):
            name = f"{'baseline' if base else show(cache['cache'])} · batch {show(b)}"
            series.append(Series(name, list(g["_x"]), list(g["value"]), dash="5 3" if base else None,
                                 color=color.get(b), meta={"cache": cache["cache"], "batch": b}))
    series.sort(key=lambda s: (metrics.is_baseline_config(s.meta["cache"]), batches.index(s.meta["batch"])
                               if s.meta["batch"] in batches else len(batches)))
    series, caption = cap(series, "One layer's decode attention per call, log-log; one colour per batch: solid "
                                  "the compressed cache (attention over the codes), dashed the baseline on the same "
                                  "tokens. "
                                  "Time per call should grow with context.")
    return Figure(title, charts.xy_chart(series, title=title, x_label="context [tokens]", y_label=f"{metric} [µs]",
                                         log_x=True, log_y=True, x_ticks=_context_ticks(rows["context"]),
                                         width=560, height=330),
                  caption, through=through(rows.drop(columns=["cache", "batch", "context"], errors="ignore")),
                  metrics=[metric])


def attention_speedup(df: pd.DataFrame) -> Figure | None:
    rows = metrics.match(df, r"^attention_speedup$")
    if rows.empty or "context" not in rows:
        return None
    bound = metrics.match(df, r"^attention_speedup_bound$")
    clock = ", ".join(dict.fromkeys(show(c) for c in rows["clock"])) if "clock" in rows else "wall"
    title = "Speed-up of attention over the codes vs context"
    batches = [b for b, _ in _by_batch(rows, "context")]
    color = _batch_color(batches)
    series = [Series(f"batch {show(b)}", list(g["_x"]), list(g["value"]), color=color.get(b),
                     meta={"batch": b}) for b, g in _by_batch(rows, "context")]
    limit = []
    if not bound.empty and "context" in bound:
        for b, g in _by_batch(bound, "context"):
            limit.append(Series(f"memory-bound limit (bytes ratio) · batch {show(b)}", list(g["_x"]), list(g["value"]),
                                dash="2 3", color="#222222", marker=False, meta={"batch": b}))
        limit = dedupe(limit)
        if len(limit) == 1:
            limit[0].name = "memory-bound limit: baseline bytes / compressed bytes held"
    series, caption = cap(series + limit, f"Baseline time / compressed time per call ({clock} clock), one line per "
                                          "batch; above 1 the compressed cache is faster. Dotted: the limit reading "
                                          "fewer bytes allows (attention_speedup_bound); the line at 1 is as fast.")
    return Figure(title, charts.xy_chart(series, title=title, x_label="context [tokens]",
                                         y_label="speed-up vs baseline [×] (log)", log_x=True, log_y=True, hline=1.0,
                                         x_ticks=_context_ticks(rows["context"]), width=560, height=330),
                  caption, through=through(rows.drop(columns=["batch", "context", "clock"], errors="ignore")),
                  metrics=names(rows, bound))


def longest_context(df: pd.DataFrame) -> Figure | None:
    rows = metrics.match(df, r"^max_context_tokens$")
    if rows.empty or "cache" not in rows:
        return None
    ratio = metrics.match(df, r"^max_context_ratio$")
    cats = [show(c) for c in rows["cache"]]
    budget = rows["budget_bytes"].dropna() if "budget_bytes" in rows else pd.Series(dtype=object)
    what = f"{fmt.bytes_h(budget.iloc[0])} KV budget" if not budget.empty else "the KV budget"
    model = show(rows["model"].iloc[0]) if "model" in rows else ""
    title = f"Longest context in {what}" + (f" ({model})" if model else "")
    text = ", ".join(f"{c}: {fmt.num(v)} tokens" for c, v in zip(cats, rows["value"]))
    if not ratio.empty:
        text += f" — {ratio['value'].iloc[0]:.2f}× as many compressed"
    svg = charts.bar_chart(cats, [("all", list(rows["value"]), None)], title=title, x_label="tokens held",
                           width=560, value_fmt=lambda v: fmt.num(v))
    return Figure(title, svg, f"Measured by allocating every layer's cache at that length: {text}.",
                  through=through(rows.drop(columns=["cache", "bytes_held"], errors="ignore")),
                  metrics=names(rows, ratio))


def speed_attention(df: pd.DataFrame) -> list[Figure]:
    figs = [attention_latency(df, "attention_gpu_us", "device time, CUDA graph"),
            attention_latency(df, "attention_us", "wall clock per call"),
            attention_speedup(df), longest_context(df)]
    figs = [f for f in figs if f is not None]
    return figs or [omitted("Decode attention speed", "no attention_us / attention_speedup / max_context_tokens "
                                                      "records with context and cache labels in this run.")]
