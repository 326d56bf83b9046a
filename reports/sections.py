"""One report section per suite: what it measures, against what, its figures, tables and texts.

Known suites get their figures from ``reports.plots``; every suite, known or not, gets one table
per test function (rows by the labels that vary, one column per metric), so a metric the
report does not know still shows up.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field

import pandas as pd

from . import fmt, metrics, plots, registry
from .plots import Figure
from .runs import CORE
from .tables import Table, blank_repeats, html_table, metric_titles, pivot, show, split_labels, usable_labels

SUITES = {
    "memory": ("Memory", "Bytes the compressed cache holds, measured from its tensors, against the layout "
                         "formula and an fp16 cache of the same tokens."),
    "mse": ("Reconstruction error (D_mse)", "Encode/decode error of the codec against the exact Lloyd-Max "
                                            "optimum and the Shannon bound; inner-product bias and spread; "
                                            "real K/V per layer."),
    "attention": ("Attention fidelity", "Attention through the compressed cache against the uncompressed one, "
                                        "per layer."),
    "perplexity": ("Perplexity and KLD", "Next-token distributions through the compressed cache against the "
                                         "uncompressed cache on the same tokens."),
    "generation": ("Generation parity", "Greedy generation with the compressed cache against the uncompressed "
                                        "cache: token match rate and the first divergence."),
    "needle": ("Needle in a haystack", "Retrieval of a planted fact by context length and depth."),
    "speed": ("Speed", "Throughput of the codec and of prefill/decode, compressed against the baseline, on the "
                       "same machine in the same run."),
    "speed_attention": ("Speed: decode attention over the codes",
                        "One layer's decode attention (Llama-3-8B geometry) over the compressed cache — the query "
                        "rotated once, history scored from its codes — against the baseline's attention over the "
                        "same tokens, by context and batch; and the longest context a fixed KV memory budget "
                        "holds, by allocating it."),
    "speed_graph": ("Speed: a decode step replayed as a CUDA graph",
                    "All 32 layers of the Llama-3-8B geometry, each step captured once and replayed as serving "
                    "stacks run it (no host time): the compressed cache's static step (device-side lengths, "
                    "window ring) against the bf16 cache's, by context and batch."),
}
FIGURES = {"memory": plots.memory, "mse": plots.mse, "attention": plots.attention, "generation": plots.generation,
           "needle": plots.needle, "speed": plots.speed, "speed_attention": plots.speed_attention}
SPEED_SUITES = ("speed", "speed_attention", "speed_graph")


@dataclass
class Section:
    suite: str
    title: str
    blurb: str
    baseline: str
    baseline_labelled: bool
    outcomes: dict
    n_records: int
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    details: list[Table] = field(default_factory=list)  # long tables, shown folded
    texts: list[dict] = field(default_factory=list)
    glossary: list[dict] = field(default_factory=list)  # every metric of the section: unit, better, meaning
    note: str = ""  # e.g. speed not measured
    gate: str = ""  # PASS | FAIL | UNCALIBRATED | NO TESTS (summary.gates' suite_status)
    uncalibrated: list = field(default_factory=list)  # [{"config", "backend", "model"}] gates without a band


def test_function(nodeid: str) -> str:
    """``suites/test_x.py::test_y[a=1]`` -> ``test_y``."""
    return nodeid.split("::")[-1].split("[")[0]


def safe(builder, title: str, *args) -> list[Figure]:
    """Figures from ``builder``; a builder that fails on unexpected records costs its plots, not the page."""
    try:
        return builder(*args)
    except Exception as e:  # noqa: BLE001 - the report must render whatever the records are
        traceback.print_exc(file=sys.stderr)
        return [plots.omitted(title, f"plot failed on these records ({type(e).__name__}: {e}); see the tables.")]


def layer_summary(df: pd.DataFrame, title: str) -> Table:
    """Per-layer metrics folded to mean, min and max over layers (with the layer of each extreme)."""
    rows = []
    _, vary = split_labels(df)
    keys = [c for c in vary if c != "layer"]
    for labels, g in plots.groups(df, keys + ["metric"]):
        lo, hi = g.loc[g["value"].idxmin()], g.loc[g["value"].idxmax()]
        unit = g["unit"].iloc[0]
        rows.append({**{k: labels[k] for k in keys}, "metric": labels["metric"] + (f" [{unit}]" if unit else ""),
                     "layers": len(g), "mean": g["value"].mean(),
                     "min (layer)": f"{lo['value']:.4g} ({show(lo['layer'])})",
                     "max (layer)": f"{hi['value']:.4g} ({show(hi['layer'])})"})
    frame = pd.DataFrame(rows)
    frame["mean"] = frame["mean"].map(lambda v: f"{v:.4g}")
    frame = blank_repeats(frame.astype(str), keys)
    through, _ = split_labels(df)
    units = dict(zip(df["metric"], df["unit"]))
    html = html_table(frame, ["data", f"lab{len(keys) + 1}"], metric_titles(units, units))
    return Table(title, html, [t for t in through if t[0] != "layer"])


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def texts(df: pd.DataFrame) -> list[dict]:
    """Baseline and compressed texts (labels ``text_base`` / ``text_tq``), split where they first differ.

    The first-divergence and match-rate records of the same test and labels are looked up beside them.
    """
    tcols = [c for c in df.columns if c.startswith("text")]
    if not tcols:
        return []
    keys = [c for c in df.columns if c not in CORE and c not in tcols and not c.startswith("_")]
    out = []
    for _, rec in df[df[tcols].notna().any(axis=1)].iterrows():
        own = {k: rec[k] for k in keys if show(rec[k]) != "—" and k not in ("diverged",)}
        same = df[df["test"] == rec["test"]]
        for k, v in own.items():
            same = same[same[k].map(show) == show(v)]
        fd = metrics.match(same, r"^first_div")
        mr = metrics.match(same, r"^match_rate$", r"^token_match")
        base, tq = show(rec.get("text_base")), show(rec.get("text_tq"))
        n = common_prefix(base, tq)
        diverged = None if fd.empty or "diverged" not in fd else fd["diverged"].iloc[0]
        out.append({"labels": [(k, show(v)) for k, v in own.items() if k in ("config", "backend", "model", "prompt")
                               or k not in ("config_name", "spec")],
                    "same": base[:n], "base_rest": base[n:], "tq_rest": tq[n:], "identical": base == tq,
                    "first_divergence": None if fd.empty else int(fd["value"].iloc[0]),
                    "diverged": None if diverged is None or diverged != diverged else bool(diverged),
                    "match_rate": None if mr.empty else float(mr["value"].iloc[0])})
    return out


def partitions(df: pd.DataFrame) -> list[pd.DataFrame]:
    """Records of one test function split by which labels they carry, so each table is rectangular.

    A part whose labels are a subset of a bigger part's (and whose metrics are not in it) joins that
    part: its values do not depend on the extra labels and are repeated in each row (e.g. an optimum
    per bits beside measurements per bits and norm correction).
    """
    labels = usable_labels(df)
    sigs = [frozenset(c for c in labels if show(row[c]) != fmt.DASH) for _, row in df[labels].iterrows()]
    parts: dict[frozenset, list[int]] = {}
    for i, sig in enumerate(sigs):
        parts.setdefault(sig, []).append(i)
    metrics_of = {sig: set(df["metric"].iloc[pos]) for sig, pos in parts.items()}
    for sig in sorted(parts, key=len):
        hosts = [q for q in parts if q > sig and not (metrics_of[q] & metrics_of[sig])]
        if hosts:
            host = max(hosts, key=lambda q: len(parts[q]))
            parts[host] += parts.pop(sig)
            metrics_of[host] |= metrics_of.pop(sig)
    return [df.iloc[sorted(pos)] for pos in parts.values()]


def tables(df: pd.DataFrame) -> tuple[list[Table], list[Table]]:
    """Tables per test function (one per label signature); per-layer records summarized, full table folded."""
    main, folded = [], []
    for fn, g in df.groupby(df["test"].map(test_function), sort=False):
        flat = g[g["layer"].isna()] if "layer" in g else g
        layered = g.drop(flat.index)
        if not flat.empty:
            parts = partitions(flat)
            for part in parts:
                _, vary = split_labels(part)
                title = fn if len(parts) == 1 else f"{fn} · by {', '.join(vary)}" if vary else f"{fn} · overall"
                main.append(pivot(part, title))
        if not layered.empty:
            main.append(layer_summary(layered, f"{fn}: per-layer metrics over layers"))
            folded.append(pivot(layered, f"{fn}: every layer"))
    return main, folded


def glossary(df: pd.DataFrame) -> list[dict]:
    """The section's metrics in order of appearance: unit, which direction is better, meaning (registry)."""
    units: dict = {}
    for m, u in zip(df["metric"], df["unit"]):
        units.setdefault(m, u)
    out = []
    for m, unit in units.items():
        reg = registry.get(m)
        out.append({"name": m, "unit": unit or fmt.DASH, "better": reg.better if reg else "unknown",
                    "meaning": reg.meaning if reg else metrics.meaning(m)})
    return out


def raw_table(df: pd.DataFrame, title: str) -> Table:
    """One row per record: metric, value ± error, unit, and its labels as text."""
    labels = [c for c in df.columns if c not in CORE and not str(c).startswith("_")]
    frame = pd.DataFrame({
        "metric": df["metric"], "value": [fmt.pm(v, e) for v, e in zip(df["value"], df["error"])], "unit": df["unit"],
        "labels": [" · ".join(f"{c}={show(r[c])}" for c in labels if show(r[c]) != fmt.DASH)
                   for _, r in df.iterrows()]})
    return Table(title, html_table(frame, ["data", "lab1"], metric_titles(dict.fromkeys(df["metric"]))))


def baseline(df: pd.DataFrame, suite: str) -> tuple[str, bool]:
    if "baseline" in df and df["baseline"].notna().any():
        return ", ".join(dict.fromkeys(show(v) for v in df["baseline"].dropna())), True
    return metrics.DEFAULT_BASELINE.get(suite, "not recorded"), False


def build(df: pd.DataFrame, outcomes: dict, bits_map: dict, speed: str | None = None,
          suite_status: dict | None = None, uncalibrated: dict | None = None) -> list[Section]:
    """Sections in a fixed order for known suites, then any other suite alphabetically.

    ``speed``: the run's ``speed`` fact ("not measured: ..."): said in the speed sections, and a speed
    section stands even when no speed suite recorded anything."""
    suite_status, uncalibrated = suite_status or {}, uncalibrated or {}
    suites = list(dict.fromkeys(df["suite"])) if "suite" in df else []
    if speed and str(speed).startswith("not measured") and not any(s in suites for s in SPEED_SUITES):
        title, blurb = SUITES["speed"]
        sec = Section("speed", title, blurb, metrics.DEFAULT_BASELINE["speed"], False, outcomes.get("speed", {}), 0,
                      note=f"Speed was not measured in this run: {speed_reason(speed)}")
        out = build(df, outcomes, bits_map, None, suite_status, uncalibrated) if suites else []
        return out + [sec]
    order = [s for s in SUITES if s in suites] + sorted(s for s in suites if s not in SUITES)
    out = []
    for suite in order:
        sdf = df[df["suite"] == suite]
        sdf = sdf[[c for c in sdf.columns if c in CORE or sdf[c].notna().any()]]  # labels other suites use
        title, blurb = SUITES.get(suite, (suite.replace("_", " ").capitalize(),
                                          "Suite without a dedicated layout: every record in generic tables."))
        base, labelled = baseline(sdf, suite)
        if suite == "perplexity":
            figs = safe(plots.perplexity, title, sdf, bits_map)
        else:
            figs = safe(FIGURES.get(suite, plots.generic), title, sdf)
        try:
            main, folded = tables(sdf)
        except Exception as e:  # noqa: BLE001 - never lose the numbers: fall back to one row per record
            traceback.print_exc(file=sys.stderr)
            main, folded = [raw_table(sdf, f"{suite}: every record ({type(e).__name__} in the pivot: {e})")], []
        note = f"Speed was not measured in this run: {speed_reason(speed)}" if speed and suite in SPEED_SUITES \
            and str(speed).startswith("not measured") else ""
        out.append(Section(suite, title, blurb, base, labelled, outcomes.get(suite, {}), len(sdf),
                           figs, main, folded, texts(sdf), glossary(sdf), note, suite_status.get(suite, ""),
                           uncalibrated.get(suite, [])))
    return out


def speed_reason(speed) -> str:
    """``not measured: pytest-benchmark is off ...`` -> ``pytest-benchmark is off ...``."""
    text = str(speed)
    return text.split(":", 1)[1].strip() if text.startswith("not measured") and ":" in text else text
