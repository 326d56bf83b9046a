"""What the reports know about metric names: selection by name, baselines, and the registry's facts.

Which direction is better, the unit and the meaning of a metric come from ``reports.registry``
(declared beside the suites that record them), never from the name. Names are only used to choose
records for a figure: matched by regular expression (case-insensitive, from the start), so a plot
still finds its records when a suite adds a suffix; anything unmatched still appears in its
suite's generic table.
"""

from __future__ import annotations

import re

import pandas as pd

from . import registry

# What a number is compared against when its record has no ``baseline`` label.
DEFAULT_BASELINE = {
    "memory": "fp16 K/V cache of the same tokens, measured from its tensors",
    "mse": "Lloyd-Max optimum of the coordinate density, Shannon lower bound 4^-b",
    "attention": "attention over the uncompressed cache, same inputs",
    "perplexity": "uncompressed cache, same model, tokens and scoring protocol",
    "generation": "greedy generation with the uncompressed cache",
    "needle": "uncompressed cache, same prompts",
    "speed": "uncompressed cache / fp16 vectors on the same machine",
    "speed_attention": "the same tokens as 16-bit K/V (bf16 on a GPU, fp32 on torch's CPU), preallocated, read by "
                       "the backend's scaled-dot-product attention (flash kernel on CUDA), same run",
    "speed_graph": "a bf16 cache of the same tokens, preallocated, its step (write + SDPA, flash and torch's own "
                   "choice, the faster one) replayed as a CUDA graph like the compressed one, same run",
}


def better(metric: str) -> bool | None:
    """True when higher is better, False when lower is, None otherwise (target, a fact, not registered)."""
    m = registry.get(metric)
    return None if m is None or m.sign == 0 else m.sign > 0


def is_rate(metric: str) -> bool:
    """A registered throughput of the code under test (per-second unit, higher is better)."""
    m = registry.get(metric)
    return m is not None and m.is_rate


def meaning(metric: str) -> str:
    """``<meaning> (<which direction is better>)``, or a note that the metric is not registered."""
    m = registry.get(metric)
    if m is None:
        return f"not in {registry.FILE} (a name this version of the suites does not record)"
    return f"{m.meaning} ({m.better})"


def match(df: pd.DataFrame, *patterns: str, suite: str | None = None) -> pd.DataFrame:
    """Rows whose metric matches the first pattern (``re.match``, case-insensitive) that matches any."""
    if suite is not None:
        df = df[df["suite"] == suite]
    names = df["metric"].astype(str)
    for p in patterns:
        hit = df[names.str.match(p, case=False)]
        if not hit.empty:
            return hit
    return df.iloc[0:0]


def label(df: pd.DataFrame, *aliases: str) -> str | None:
    """The first of ``aliases`` that is a label column with values in ``df``."""
    for a in aliases:
        if a in df.columns and df[a].notna().any():
            return a
    return None


def config_of(df: pd.DataFrame) -> pd.Series:
    """What each record measured: its ``config`` label, else its ``cache`` label (speed suite), else None."""
    out = pd.Series([None] * len(df), index=df.index, dtype=object)
    for col in ("cache", "config"):
        if col in df:
            out = df[col].where(df[col].notna(), out)
    return out


def is_baseline_config(v) -> bool:
    return str(v).lower() in ("baseline", "fp16", "bf16", "none", "uncompressed", "dense")


BASE_SUFFIX = re.compile(r"(_baseline|_base|_fp16|_uncompressed)$|^(baseline|base)_", re.I)


def split_baseline(metric: str) -> tuple[str, bool]:
    """``prefill_tokens_per_s_baseline`` -> (``prefill_tokens_per_s``, True)."""
    stripped = BASE_SUFFIX.sub("", metric)
    return stripped, stripped != metric
